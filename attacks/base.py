"""The attack protocol and registry.

An attack is constructed with a validated config (construction only validates), fitted on the
attacker's auxiliary data (``fit``), and then rebuilds inputs from activations (``reconstruct``).
Adding an attack touches its own module, one import line in ``attacks/__init__.py`` and one test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from audit.errors import SpecError


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


@dataclass
class FitReport:
    converged: bool
    restarts: int
    epochs: int
    seconds: float
    val_loss: float
    baseline_loss: float  # val loss of the no-information guess (the mean aux image)
    notes: list[str] = field(default_factory=list)


class Attack(Protocol):
    name: str
    needs_fit: bool

    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport: ...

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor: ...


ATTACKS: dict[str, Callable[..., Attack]] = {}


def register_attack(name: str):
    def deco(cls):
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


# Module initialization draws from torch's global generator. Seeding it gives the same weights only
# when no other thread does the same at the same moment (jobs run in threads), hence the lock.
_INIT_LOCK = threading.Lock()


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules under ``seed`` without touching the global generator's state outside the block."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA's too
        yield
