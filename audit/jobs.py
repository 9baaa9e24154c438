"""The attack jobs of the audit grid, as pure functions: a job spec and its inputs in, one output out.

A job fits one attack at one cut on the activations of one defense (``fit``: from scratch;
``refine``: warm-started from the base attack of the same cut), then scores it on the evaluation
activations of one or more defenses. Everything random in a job is drawn from generators seeded by
(seed, cut, defense, attack, kind), so neither the order of jobs nor the place they run (a thread
here, a Ray worker elsewhere) changes a number.

The driver (``splitaudit.runner``) builds the specs, resolves cache hits, and turns outputs into rows.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import splitaudit.attacks  # noqa: F401  (registers attacks)
import splitaudit.defenses  # noqa: F401  (registers defenses)
from splitaudit.attacks.base import AttackContext, make_attack
from splitaudit.cuts import head_forward
from splitaudit.metrics import most_recognizable, psnr, ssim
from splitaudit.defenses.base import make_defense

N_GRID = 8  # fixed eval samples shown in every image grid
N_WORST = 5  # most recognizable samples shown


def job_generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 62) - 1))


@dataclass(frozen=True)
class JobSpec:
    cut: str
    attack: str
    defense: str  # canonical spec of the defense whose activations the attacker trains on ("none": clean)
    kind: str  # "fit": from scratch | "refine": warm start from the base ("fit") job of the same cut and attack
    profile: str
    seed: int
    epochs: int | None = None  # a refinement's budget; None: the attack's own
    score: tuple[str, ...] = ()  # defenses whose evaluation activations the fitted attack is scored on
    label: str = ""  # what the progress bar says
    device: str = "cpu"  # where the job computes (a Ray worker moves its inputs there)

    @property
    def id(self) -> str:
        return f"{self.cut}|{self.attack}|{self.defense}|{self.kind}"


@dataclass
class Activations:
    """A (cut, model) pair's activations: the attacker's aux queries and the evaluation inputs."""

    aux: torch.Tensor
    eval: torch.Tensor


@dataclass
class JobInputs:
    x_aux: torch.Tensor
    x_eval: torch.Tensor
    acts: dict[str, Activations]  # defense spec -> activations of the model that defense runs (train + score)
    head: nn.Module | None = None  # the model the training defense runs, for white-box attacks only
    base_state: dict | None = None  # a refine job's starting point
    # An adaptive job's other candidate: the undefended attacker. An attacker who knows the defense
    # keeps whichever of the two rebuilds its own defended held-out aux data better, so adapting can
    # never do worse than not adapting because a short refinement had not settled yet.
    candidate_state: dict | None = None
    candidate_converged: bool = True
    cached: dict | None = None  # {"state", "report"}: the fitted attack from the cache; the job only scores


@dataclass
class Scores:
    ssim: torch.Tensor  # per evaluation sample
    psnr: torch.Tensor
    recon_idx: torch.Tensor  # evaluation indices whose reconstructions come back (the grid's samples)
    recon: torch.Tensor


@dataclass
class JobOutput:
    spec: JobSpec
    report: dict[str, Any]
    state: dict | None = None  # the fitted attack (for the cache and for refine jobs), when it can be saved
    scores: dict[str, Scores] = field(default_factory=dict)
    seconds: float = 0.0


def defended(defense_spec: str, acts: Activations, *, seed: int, cut: str, which: str) -> torch.Tensor:
    """The activations ``which`` (aux | eval) as the defense sends them, with the noise drawn from a
    generator of their own: a job that only scores draws exactly what the job that trained drew."""
    if defense_spec == "none":
        return acts.aux if which == "aux" else acts.eval
    d = make_defense(defense_spec)
    d.fit(acts.aux)
    z = acts.aux if which == "aux" else acts.eval
    return d.apply(z, generator=job_generator(seed, cut, defense_spec, "defense", which))


def run_job(spec: JobSpec, inputs: JobInputs, *, on_epoch: Callable[[int, int, float], None] | None = None) -> JobOutput:
    """Fit (or load) the attack of ``spec`` and score it. Raises on failure; the driver records it."""
    start = time.perf_counter()
    # A refinement continues a fitted attack for exactly its budget: no restart, no extension (every
    # refinement of a cut gets the same training, so none looks leakier from training alone).
    params = {"epochs": spec.epochs or 0, "restarts": 0, "extensions": 0} if spec.kind == "refine" else {}
    attack = make_attack(spec.attack, profile=spec.profile, params=params)
    x_aux, x_eval = inputs.x_aux, inputs.x_eval
    z_train = defended(spec.defense, inputs.acts[spec.defense], seed=spec.seed, cut=spec.cut, which="aux")
    if inputs.cached is not None:
        attack.load_state(inputs.cached["state"], tuple(z_train.shape[1:]), tuple(x_aux.shape[1:]), device=z_train.device)
        report = dict(inputs.cached["report"]) | {"cached": True}
    else:
        if spec.kind == "refine":
            base = make_attack(spec.attack, profile=spec.profile)
            base.load_state(inputs.base_state, tuple(z_train.shape[1:]), tuple(x_aux.shape[1:]), device=z_train.device)
            attack.warm_start_from(base)
        white_box = getattr(attack, "white_box", False)
        if white_box and inputs.head is None:
            raise RuntimeError(f"{spec.attack} is a white-box attack and its job was given no head")
        ctx = AttackContext(
            input_shape=tuple(x_aux.shape[1:]),
            act_shape=tuple(z_train.shape[1:]),
            profile=spec.profile,
            generator=job_generator(spec.seed, spec.cut, spec.defense, spec.attack, spec.kind),
            on_epoch=on_epoch,
            # Only white-box attacks see the head; black-box ones get activations and nothing else.
            head=functools.partial(head_forward, inputs.head, spec.cut) if white_box else None,
        )
        rep = attack.fit(z_train, x_aux, ctx)
        report = {
            "converged": rep.converged, "restarts": rep.restarts, "epochs": rep.epochs, "seconds": round(rep.seconds, 2),
            "val_loss": rep.val_loss, "baseline_loss": rep.baseline_loss, "notes": list(rep.notes),
        }
        if inputs.candidate_state is not None and getattr(attack, "holdout", None) is not None:
            attack = _select(attack, inputs.candidate_state, spec, z_train, x_aux, report, inputs.candidate_converged)
    scores = {d: _score(attack, defended(d, inputs.acts[d], seed=spec.seed, cut=spec.cut, which="eval"), x_eval) for d in spec.score}
    state = attack.state() if hasattr(attack, "state") else None
    return JobOutput(spec=spec, report=report, state=state, scores=scores, seconds=time.perf_counter() - start)


def _score(attack, z_eval: torch.Tensor, x_eval: torch.Tensor) -> Scores:
    recon = attack.reconstruct(z_eval).clamp(0, 1)
    s = ssim(recon, x_eval)
    p = psnr(recon, x_eval, max_db=100.0)
    fixed = torch.arange(min(N_GRID, x_eval.shape[0]), device=s.device)
    idx = torch.unique(torch.cat([fixed, most_recognizable(s, N_WORST).to(s.device)]))
    return Scores(ssim=s, psnr=p, recon_idx=idx, recon=recon[idx])


def _select(attack, candidate_state: dict, spec: JobSpec, z_aux: torch.Tensor, x_aux: torch.Tensor, report: dict, candidate_converged: bool):
    """The better (by SSIM; by MSE for images under 11x11) of ``attack`` and the candidate on the defended
    held-out aux samples ``attack`` kept aside."""
    other = make_attack(spec.attack, profile=spec.profile)
    other.load_state(candidate_state, tuple(z_aux.shape[1:]), tuple(x_aux.shape[1:]), device=z_aux.device)
    idx = attack.holdout

    by_ssim = min(x_aux.shape[-2:]) >= 11  # the SSIM window needs 11x11; smaller images compare by MSE

    def score(a) -> float:  # the audit's own metric, on data the attacker has
        rec = a.reconstruct(z_aux[idx]).clamp(0, 1)
        return float(ssim(rec, x_aux[idx]).mean()) if by_ssim else -float((rec - x_aux[idx]).square().mean())

    mine, theirs = score(attack), score(other)
    metric = "ssim" if by_ssim else "neg_mse"
    report["selection"] = {f"refined_holdout_{metric}": round(mine, 5), f"undefended_holdout_{metric}": round(theirs, 5)}
    if not mine >= theirs:  # a NaN refinement loses too
        report["notes"] = list(report["notes"]) + [
            f"kept the undefended attacker: on defended held-out aux data its {metric} {theirs:.4g} beats the refinement's {mine:.4g}"
        ]
        report["converged"] = candidate_converged
        return other
    return attack
