"""The defense protocol and registry.

A defense is what the device does before it sends the activation (``transform``: noise, dropout,
quantization) and/or a change to the model itself (``prepare_model``: DP-SGD or NoPeek fine-tuning).
Construction only validates the config; ``fit`` learns statistics from the attacker-visible aux
activations (noise scale) and returns an immutable :class:`Fitted` transform, which is called with an
explicit generator.

Adding a defense touches its own module, one import line in ``defenses/__init__.py`` and one test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from splitaudit.errors import SpecError
from splitaudit.specs import build_config, canonical_spec, parse_plugin_spec


@dataclass
class ModelChange:
    """What ``prepare_model`` did, for the report."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareContext:
    """What a model-changing defense may use: the victim's own training split and a budget."""

    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_eval: torch.Tensor
    y_eval: torch.Tensor | None
    profile: str
    generator: torch.Generator
    on_epoch: Callable[[int, int, float], None] | None = None


@dataclass(frozen=True)
class Fitted:
    """A defense fitted at one cut: what the device applies before sending. Immutable (scikit-learn's
    ``fitted = defense.fit(...)``): the same defense fitted at another cut is another ``Fitted``, and
    nothing is ever re-fitted in place. ``state`` holds what ``fit`` learnt (a noise scale, a range)."""

    defense: Defense
    state: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return self.defense.spec

    def __call__(self, z: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        return self.defense.transform(z, self.state, generator=generator)

    def info(self) -> dict[str, Any]:
        return self.defense.describe(self.state)


class Defense:
    """A configured defense. Construction only validates; :meth:`fit` returns a :class:`Fitted` transform.

    Declared abilities (the runner reads these, never probes for methods):

    - ``transforms_activation``: the device changes the activation before sending (``transform``);
    - ``stochastic``: that change draws random numbers (utility is averaged over draws);
    - ``changes_model``: the defense changes the model itself (``prepare_model``: DP-SGD, NoPeek);
    - ``per_cut_model``: that changed model depends on the cut (NoPeek).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    transforms_activation: ClassVar[bool] = False
    stochastic: ClassVar[bool] = False
    changes_model: ClassVar[bool] = False
    per_cut_model: ClassVar[bool] = False

    def __init__(self, config):
        self.config = config

    @property
    def spec(self) -> str:
        """The canonical spec: name plus every config value, so equal defenses compare equal."""
        return canonical_spec(self.name, asdict(self.config))

    def fit(self, z_aux: torch.Tensor) -> Fitted:
        """The transform fitted on aux activations (clean, as the device would see them)."""
        return Fitted(self, self.fit_state(z_aux) if self.transforms_activation else {})

    def fit_state(self, z_aux: torch.Tensor) -> dict[str, Any]:
        """What ``transform`` needs, learnt from aux activations (default: nothing)."""
        return {}

    def transform(self, z: torch.Tensor, state: Mapping[str, Any], *, generator: torch.Generator | None) -> torch.Tensor:
        return z

    def describe(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """What the fitted transform is, for the report (default: nothing)."""
        return {}

    def noise_fisher(self, state: Mapping[str, Any]) -> float | None:
        """The Fisher information about its location that the noise the transform adds leaves per activation
        coordinate (``1/σ²`` for Gaussian noise of absolute std ``σ``), for the dFIL reference
        (:mod:`splitaudit.dfil`); None (the default) for a transform that is not additive noise of known
        density, or adds none."""
        return None

    def prepare_model(
        self, model: nn.Module, *, cut: str | None, ctx: PrepareContext, state: dict[str, torch.Tensor] | None = None
    ) -> ModelChange:
        """Return the model the device and server would run with this defense (default: unchanged).

        With ``state`` (a state dict from the cache), rebuild the changed model's structure and load
        it instead of training; ``ModelChange.info`` may then be empty (the runner keeps the cached info).
        """
        return ModelChange(model)

    def wire_bytes(self, shape: tuple[int, ...]) -> int:
        n = 1
        for s in shape:
            n *= s
        return 4 * n


DEFENSES: dict[str, type[Defense]] = {}


def register_defense(name: str):
    def deco(cls):
        cls.name = name
        DEFENSES[name] = cls
        return cls

    return deco


def make_defense(spec: str) -> Defense:
    parsed = parse_plugin_spec(spec, what="defense")
    if parsed.name not in DEFENSES:
        raise SpecError(f"unknown defense {parsed.name!r}; known defenses: {', '.join(sorted(DEFENSES))}")
    cls = DEFENSES[parsed.name]
    config = build_config(cls.Config, parsed.params, what=f"defense {parsed.name}")
    return cls(config)


def noise_like(z: torch.Tensor, generator: torch.Generator | None, kind: str = "gaussian") -> torch.Tensor:
    """Noise drawn from ``generator`` on ``z``'s device (a CPU generator draws on the CPU, then moves)."""
    gen_device = generator.device if generator is not None else z.device
    if kind == "laplace":
        u = torch.rand(z.shape, generator=generator, device=gen_device, dtype=z.dtype) - 0.5
        u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
        sample = -torch.sign(u) * torch.log1p(-2 * u.abs()) / (2**0.5)  # unit variance
    else:
        sample = torch.randn(z.shape, generator=generator, device=gen_device, dtype=z.dtype)
    return sample.to(z.device)
