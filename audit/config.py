"""The audit's configuration: one validated :class:`AuditConfig` and its profiles.

The CLI, the gate and the pytest plugin all build an ``AuditConfig``; :meth:`AuditConfig.validate` is
the only place its values are checked. The gate's TOML parser reuses :func:`check_choice` for the
same fields, so a value the CLI refuses is refused there too, with the same allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from splitaudit.errors import SpecError, UserError

PROFILES: dict[str, dict[str, Any]] = {
    # max_aux caps the attacker's data; draws: how many draws of a stochastic defense utility averages
    "quick": {"n_eval": 1000, "max_aux": 1000, "latency_repeats": 7, "draws": 2, "adaptive_epochs": 2},
    "standard": {"n_eval": 1000, "max_aux": 2000, "latency_repeats": 15, "draws": 3, "adaptive_epochs": 2},
    "thorough": {"n_eval": 1000, "max_aux": None, "latency_repeats": 30, "draws": 5, "adaptive_epochs": 0},
}

CHOICES: dict[str, tuple[str, ...]] = {
    "profile": tuple(PROFILES),
    "device": ("auto", "cpu", "cuda"),
    "aux_queries": ("data", "noise"),
    "executor": ("local", "ray"),
}


def check_choice(name: str, value: str, *, where: str = "") -> str:
    """``value`` if it is one of the allowed values of the config field ``name``, else a SpecError. Named as
    the key (``aux_queries``) in a config file (``where``), as the flag (``--aux-queries``) otherwise."""
    allowed = CHOICES[name]
    if value not in allowed:
        key = f"{name} {value!r} in {where}" if where else f"{'--' + name.replace('_', '-') if '_' in name else name} {value!r}"
        choose = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise SpecError(f"unknown {key}; choose {choose}")
    return value


@dataclass(frozen=True)
class AuditConfig:
    model: str
    data: str
    weights: str | None = None
    cuts: tuple[str, ...] = ()
    defenses: tuple[str, ...] = ("none",)
    attacks: tuple[str, ...] = ("decoder",)
    profile: str = "standard"
    device: str = "auto"
    seed: int = 0
    out: str | None = None  # where the writer puts results.json, the report and the images (the runner writes none)
    threshold: float = 0.3
    reid_threshold: float = 0.05  # a re-identified share above which a pair is recognizable whatever its SSIM
    cache_dir: str | None = None
    use_cache: bool = True
    command: str | None = None  # the command line, for the reproducibility section
    aux_data: str | None = None  # the attacker's own data, when it is not the evaluation distribution
    aux_queries: str = "data"  # data | noise: query the head with the aux images or with random inputs
    executor: str = "local"  # local | ray: where the attack jobs run
    workers: int = 0  # parallel attack jobs; 0 picks by device (CPU cores, capped at 4; 1 on CUDA)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local runtime
    output: str | None = None  # the tensor of the model's output that accuracy and agreement use (None: the first)
    input_norm: str | None = None  # MEAN,STD applied between the data and the model (the attacker works in data space)

    def validate(self) -> None:
        from splitaudit.attacks.base import ATTACKS

        for name in CHOICES:
            check_choice(name, getattr(self, name))
        if self.workers < 0:
            raise SpecError(f"--workers must be 0 (auto) or positive, got {self.workers}")
        if not self.attacks:
            raise SpecError("no attack given; known attacks: " + ", ".join(sorted(ATTACKS)))
        if self.executor == "ray":
            from splitaudit.ray_executor import require_ray

            require_ray()
        if not 0 < self.threshold <= 1:
            raise SpecError(f"threshold {self.threshold} is out of range; allowed: (0, 1]")
        from splitaudit.outputs import parse_input_norm

        parse_input_norm(self.input_norm)
        if not 0 < self.reid_threshold <= 1:
            raise SpecError(f"reid threshold {self.reid_threshold} is out of range; allowed: (0, 1]")

    @property
    def settings(self) -> dict[str, Any]:
        """The profile's budgets (evaluation size, aux cap, latency repeats, utility draws, refinement epochs)."""
        return PROFILES[self.profile]


def resolve_device(name: str) -> torch.device:
    """The one place a device is chosen (STYLE habit 5): library code follows its input tensors."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available on this machine")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
