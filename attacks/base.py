"""The attack protocol and registry.

An attack is constructed with a validated config (construction only validates), fitted on the
attacker's auxiliary data (``fit``), and then rebuilds inputs from activations (``reconstruct``).
Adding an attack touches its own module, one import line in ``attacks/__init__.py`` and one test.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from splitaudit.errors import SpecError


@dataclass(frozen=True)
class AttackContext:
    """What the attacker is given (the scenario), kept apart from the attack itself.

    ``head`` is only set for white-box attacks; a black-box attack must not touch it.
    """

    input_shape: tuple[int, ...]  # (C, H, W) of the inputs
    act_shape: tuple[int, ...]  # per-sample activation shape
    profile: str
    generator: torch.Generator
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    on_epoch: Callable[[int, int, float], None] | None = None  # (epoch, max_epochs, val loss)
    modality: Any = None  # the audit's Modality (scores, prior, decoder network); None: images
    embeddings: torch.Tensor | None = None  # a text model's token embedding table, for white-box attacks only

    def __post_init__(self):
        if self.modality is None:
            from splitaudit.attacks.modality import get_modality

            object.__setattr__(self, "modality", get_modality("image"))


@dataclass
class FitReport:
    converged: bool
    restarts: int
    epochs: int
    seconds: float
    val_loss: float
    baseline_loss: float  # val loss of the no-information guess (the mean aux image)
    notes: list[str] = field(default_factory=list)
    # Why its training stopped (attacks.training.TrainResult.stop: "budget" means still improving when its
    # epochs ended; "schedule": a learning-rate schedule ran to its end); None where it does not say.
    stop: str | None = None


class Attack:
    """What every attack is and declares. The runner reads these abilities; it never probes for methods.

    - ``white_box``: it needs the head's weights (``ctx.head`` is set for it, and only for it);
    - ``needs_fit``: it learns from aux data, so it can adapt to an activation defense (refitted on defended
      activations for the adaptive rows); one that learns nothing is only scored;
    - ``warm_start``: it can start from another fitted instance of itself (``warm_start_from``) and save and
      load its fitted state (``state``, ``load_state``), so the runner refines one base fit per cut instead of
      fitting every defense from scratch, and caches what it fitted;
    - ``holds_out``: ``fit`` keeps a held-out part of the aux data (``holdout``, indices) on which an adaptive
      attacker compares its refinement with the undefended attack;
    - ``budgeted``: a warm-starting attack whose fit stops once its validation curve has flattened and reports
      why it stopped (``FitReport.stop``; "budget": still improving), so the audit's ledger can move epochs
      between cuts: it says its ``allotment`` and what an epoch costs (``epoch_flops``), and resumes a fitted
      instance for granted epochs (``extend_from``);
    - ``starts_from``: the name of another attack whose fitted instance it starts from (``start_from``), as
      the hybrid starts its optimization from the decoder's reconstruction. Where that attack runs in the same
      audit, the runner hands it that attack's fitted instance for the same (cut, defense), adaptive where
      that one is, instead of fitting it twice; otherwise ``fit`` fits its own.

    ``fit`` returns a :class:`FitReport`; ``reconstruct`` rebuilds inputs from activations.
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("image", "text")  # the kinds of data it can attack
    white_box: ClassVar[bool] = False
    needs_fit: ClassVar[bool] = True
    warm_start: ClassVar[bool] = False
    holds_out: ClassVar[bool] = False
    budgeted: ClassVar[bool] = False
    starts_from: ClassVar[str | None] = None
    holdout: torch.Tensor | None = None
    # What ``fit`` found against the no-information guess: "beaten", "not beaten after a restart" (a finding:
    # nothing usable in the activation) or "not beaten, no restart" (no conclusion yet); None: not checked.
    prior_outcome: str | None = None

    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport:
        raise NotImplementedError

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def warm_start_from(self, other: Attack) -> None:
        raise NotImplementedError(f"attack {self.name} cannot warm-start")

    def extend_from(self, other: Attack) -> None:
        """Resume ``other``'s training on the same data for the epochs this instance was made with."""
        raise NotImplementedError(f"attack {self.name} cannot be extended")

    def allotment(self, modality) -> tuple[int, float] | None:
        """(nominal epochs per cut, cap as a multiple of them) for the audit's ledger; None: not ledgered."""
        return None

    def epoch_flops(self, act_shape: tuple[int, ...], x_aux: torch.Tensor, modality) -> float | None:
        """Training FLOPs of one epoch on ``x_aux`` at an activation of ``act_shape`` (None: not counted)."""
        return None

    def start_from(self, other: Attack, *, converged: bool = True) -> None:
        """Start from ``other``, fitted (``converged``: whether its fit converged, as its own row says)."""
        raise NotImplementedError(f"attack {self.name} starts from no other attack")

    def state(self) -> dict:
        raise NotImplementedError(f"attack {self.name} has no state to save")

    def load_state(self, state: dict, act_shape, input_shape, device: torch.device | str = "cpu") -> None:
        raise NotImplementedError(f"attack {self.name} cannot load a state")


ATTACKS: dict[str, type[Attack]] = {}


def register_attack(name: str):
    def deco(cls):
        if not issubclass(cls, Attack):
            raise TypeError(f"attack {name!r}: {cls.__name__} must subclass splitaudit.attacks.base.Attack")
        cls.name = name
        ATTACKS[name] = cls
        return cls

    return deco


def make_attack(name: str, *, profile: str = "standard", params: dict | None = None) -> Attack:
    if name not in ATTACKS:
        raise SpecError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name](profile=profile, params=params or {})


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ZeroLinear(nn.Linear):
    """A linear layer that starts at zero (weight and bias): a residual branch that begins switched off,
    so the network starts as the one without it (:func:`build_module` keeps it at zero)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def build_module(factory: Callable[[], nn.Module], generator: torch.Generator, device: torch.device | str = "cpu") -> nn.Module:
    """``factory()`` with PyTorch's default initialization drawn from ``generator``, never from the
    global generator: attack jobs run in threads beside other work (a defense's fine-tuning with
    dropout, say), so a draw from the shared generator would make both depend on timing.

    The module is built on the meta device (no draws), materialized on the CPU and initialized here:
    convolutions and linear layers as ``reset_parameters`` does (weight and bias uniform in
    +-1/sqrt(fan_in)), a :class:`ZeroLinear` and batch norms by their own ``reset_parameters`` (zeros;
    ones and zeros). Other layers with parameters are refused.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ZeroLinear):
                m.reset_parameters()
            elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                bound = 1 / math.sqrt(max(1, m.weight[0].numel()))  # weight[0]: fan_in, as torch computes it
                m.weight.uniform_(-bound, bound, generator=generator)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()
            elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
                raise TypeError(f"build_module cannot initialize {type(m).__name__}")
    return module.to(device)


def fast_autocast(t: torch.Tensor):
    """bfloat16 autocast where the hardware multiplies in it (a CPU with AVX-512 BF16 or AMX, a CUDA GPU), for a
    decoder's matmuls and convolutions; float32 elsewhere. Callers keep their outputs and losses in float32.
    Measured on this project's machines: the text inverter's matmuls 2-5x faster; the image decoder within 0.007
    SSIM of float32 at every LeNet cut for 17% less CPU time (AMD EPYC with AVX-512 BF16, one thread)."""
    if t.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if t.device.type == "cpu" and cpu_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
