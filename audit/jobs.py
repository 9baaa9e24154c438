"""The attack jobs of the audit grid, as pure functions: a job spec and its inputs in, one output out.

A job fits one attack at one cut on the activations of one defense (``fit``: from scratch;
``extend``: the base fit resumed for the epochs the budget's ledger granted it; ``refine``: warm-started
from the base attack of the same cut, extended or not), then scores it on the evaluation activations of
one or more defenses. Everything random in a job is drawn from generators seeded by
(seed, cut, defense, attack, kind), so neither the order of jobs nor the place they run (a thread
here, a Ray worker elsewhere) changes a number.

:func:`plan_cut` is the job graph of one cut, a pure function of the cut, the attacks, the defenses
and the profile; :mod:`splitaudit.scheduler` runs it.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

import splitaudit.attacks  # noqa: F401  (registers attacks and modalities)
import splitaudit.defenses  # noqa: F401  (registers defenses)
from splitaudit.attacks.base import ATTACKS, AttackContext, make_attack
from splitaudit.attacks.modality import get_modality
from splitaudit.cuts import head_forward
from splitaudit.defenses.base import Defense, Fitted, make_defense
from splitaudit.metrics import most_recognizable
from splitaudit.seeding import job_generator  # noqa: F401  (re-exported: jobs draw from it)

N_GRID = 8  # fixed eval samples shown in every image grid
N_WORST = 5  # most recognizable samples shown


@dataclass(frozen=True)
class JobSpec:
    cut: str
    attack: str
    defense: str  # canonical spec of the defense whose activations the attacker trains on ("none": clean)
    # "fit": from scratch | "extend": the base fit resumed for a granted budget | "refine": warm start from the
    # base ("fit") job of the same cut and attack, or from its extension
    kind: str
    profile: str
    seed: int
    epochs: int | None = None  # a refinement's budget, an extension's grant; None: the attack's own
    ledgered: bool = False  # a base fit whose extension the audit's ledger decides: it never extends itself
    score: tuple[str, ...] = ()  # defenses whose evaluation activations the fitted attack is scored on
    label: str = ""  # what the progress bar says
    device: str = "cpu"  # where the job computes (a Ray worker moves its inputs there)
    modality: str = "image"  # how reconstructions are scored (a registered Modality)

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
    fitted: dict[str, Fitted] = field(default_factory=dict)  # defense spec -> its transform at this cut (none: absent)
    head: nn.Module | None = None  # the model the training defense runs, for white-box attacks only
    base_state: dict | None = None  # a refine or extend job's starting point
    # An adaptive job's other candidate: the undefended attacker. An attacker who knows the defense
    # keeps whichever of the two rebuilds its own defended held-out aux data better, so adapting can
    # never do worse than not adapting because a short refinement had not settled yet.
    candidate_state: dict | None = None
    candidate_converged: bool = True
    start_state: dict | None = None  # the fitted state of the attack it starts from (``starts_from``) for this (cut, defense)
    start_converged: bool = True  # whether that attack's fit converged
    cached: dict | None = None  # {"state", "report"}: the fitted attack from the cache; the job only scores
    judge: nn.Module | None = None  # the independent classifier that labels reconstructions (None: no labels)
    judge_features: torch.Tensor | None = None  # its features of the evaluation originals
    y_eval: torch.Tensor | None = None  # the evaluation labels, for the attack accuracy
    prior_scores: torch.Tensor | None = None  # the no-information guess's headline score per evaluation sample (None: computed here)


@dataclass
class Scores:
    values: dict[str, torch.Tensor]  # metric -> per evaluation sample (the modality's metrics)
    recon_idx: torch.Tensor  # evaluation indices whose reconstructions come back (the grid's samples)
    recon: torch.Tensor

    def __getattr__(self, name):  # scores.ssim: the values of one metric
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class JobOutput:
    spec: JobSpec
    report: dict[str, Any]
    state: dict | None = None  # the fitted attack (for the cache and for refine jobs), when it can be saved
    scores: dict[str, Scores] = field(default_factory=dict)
    seconds: float = 0.0


def defended(fitted: Fitted | None, acts: Activations, *, seed: int, cut: str, which: str, modality, x: torch.Tensor) -> torch.Tensor:
    """The activations ``which`` (aux | eval, of the inputs ``x``) as the fitted defense sends them (None: as
    they are), with the noise drawn from a generator of their own: a job that only scores draws exactly what
    the job that trained drew. Of a transform's output only what crosses the wire is kept (the modality's
    ``on_wire``: a text's padding is never sent); undefended activations were captured as sent."""
    z = acts.aux if which == "aux" else acts.eval
    if fitted is None:
        return z
    return modality.on_wire(fitted(z, generator=job_generator(seed, cut, fitted.spec, "defense", which)), x)


@dataclass(frozen=True)
class PlannedJob:
    role: str  # "base" (the clean fit a refinement starts from) | "clean" (the undefended attacker) | a defense spec
    spec: JobSpec
    after: str | None = None  # the role of the job whose output it waits for (None: it can start at once)
    after_attack: str | None = None  # that job's attack (None: its own); set for an attack that starts from another


def plan_cut(cut: str, *, attacks: Sequence[str], defenses: Sequence[Defense], profile: str, seed: int, device: str = "cpu",
             modality: str = "image", adaptive_epochs: int | None = None) -> list[PlannedJob]:
    """The job graph of one cut, in submission order.

    Per learned attack that can warm-start: a base job fits on clean activations; for an attack whose
    budget the ledger moves between cuts (``budgeted``), an ``extend`` job then resumes it for the epochs
    it is granted (none when its curve had flattened: the driver then passes the base on as it is); then,
    with equal budgets and from the same start, the undefended attacker refines it on clean activations
    for as many epochs as each adaptive attacker refines it on defended ones (otherwise extra training
    alone would make a defended cut look leakier than the undefended one). An adaptive job waits for the undefended one: it is its
    other candidate. The undefended attacker is also scored on every defended activation (the
    non-adaptive rows). An attack that cannot warm-start (rMLE) is fitted afresh per defense; one that
    learns nothing from aux data is not re-fitted for an activation defense, only scored. An attack that
    starts from another (the hybrid, from the decoder) waits, when that one is in ``attacks`` too, for its
    job of the same defense (its "clean" job when it has none there), and starts from what it fitted.
    """
    specs = tuple(d.spec for d in defenses)
    out: list[PlannedJob] = []
    for name in attacks:
        cls = ATTACKS[name]
        common = dict(cut=cut, attack=name, profile=profile, seed=seed, device=device, modality=modality)
        if cls.warm_start:
            out.append(PlannedJob("base", JobSpec(defense="none", kind="fit", label=f"{cut}: {name} on clean activations",
                                                  ledgered=cls.budgeted, **common)))
            start = "base"
            if cls.budgeted:
                out.append(PlannedJob("extend", JobSpec(defense="none", kind="extend", label=f"{cut}: {name} extended on clean activations",
                                                        **common), after="base"))
                start = "extend"
            out.append(PlannedJob("clean", JobSpec(defense="none", kind="refine", epochs=adaptive_epochs, score=specs,
                                                   label=f"{cut}: {name} refined on clean activations", **common), after=start))
        else:
            out.append(PlannedJob("clean", JobSpec(defense="none", kind="fit", score=specs, label=f"{cut}: {name} on clean activations",
                                                   **common)))
        for d in defenses:
            if d.spec == "none" or not (cls.needs_fit or d.changes_model):
                continue
            spec = JobSpec(defense=d.spec, kind="refine" if cls.warm_start else "fit", epochs=adaptive_epochs if cls.warm_start else None,
                           score=(d.spec,), label=f"{cut}: {name} adapted to {d.spec}", **common)
            out.append(PlannedJob(d.spec, spec, after="clean" if cls.warm_start else None))
    roles = {(j.spec.attack, j.role) for j in out}
    for i, job in enumerate(out):
        source = ATTACKS[job.spec.attack].starts_from
        if source in attacks and job.after is None and source != job.spec.attack:
            role = job.role if (source, job.role) in roles else "clean"
            out[i] = replace(job, after=role, after_attack=source)
    return out


def run_job(spec: JobSpec, inputs: JobInputs, *, on_epoch: Callable[[int, int, float], None] | None = None) -> JobOutput:
    """Fit (or load) the attack of ``spec`` and score it. Raises on failure; the driver records it."""
    start = time.perf_counter()
    # A refinement continues a fitted attack for exactly its budget: no restart, no extension (every
    # refinement of a cut gets the same training, so none looks leakier from training alone). An extension
    # runs exactly its grant; a ledgered base fit never extends itself (the ledger decides).
    if spec.kind in ("refine", "extend"):
        params = {"epochs": spec.epochs or 0, "restarts": 0, "extensions": 0}
    else:
        params = {"extensions": 0} if spec.ledgered else {}
    attack = make_attack(spec.attack, profile=spec.profile, params=params)
    modality = get_modality(spec.modality)
    x_aux, x_eval = inputs.x_aux, inputs.x_eval
    fitted = functools.partial(_fitted, inputs)
    z_train = defended(fitted(spec.defense), inputs.acts[spec.defense], seed=spec.seed, cut=spec.cut, which="aux", modality=modality, x=x_aux)
    if inputs.cached is not None:
        attack.load_state(inputs.cached["state"], tuple(z_train.shape[1:]), tuple(x_aux.shape[1:]), device=z_train.device)
        report = dict(inputs.cached["report"]) | {"cached": True}
    else:
        if spec.kind in ("refine", "extend"):
            base = make_attack(spec.attack, profile=spec.profile)
            base.load_state(inputs.base_state, tuple(z_train.shape[1:]), tuple(x_aux.shape[1:]), device=z_train.device)
            (attack.extend_from if spec.kind == "extend" else attack.warm_start_from)(base)
        if inputs.start_state is not None:  # the fitted attack it starts from, for this (cut, defense)
            source = make_attack(attack.starts_from, profile=spec.profile)
            source.load_state(inputs.start_state, tuple(z_train.shape[1:]), tuple(x_aux.shape[1:]), device=z_train.device)
            attack.start_from(source, converged=inputs.start_converged)
        white_box = attack.white_box
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
            embeddings=_input_embeddings(inputs.head) if white_box else None,
            modality=modality,
        )
        rep = attack.fit(z_train, x_aux, ctx)
        if spec.kind == "refine" and not rep.converged and attack.warm_start:
            # A refinement that never beat the no-information guess gets the restart it had no budget for: a
            # fresh fit on the same defended activations. Where that fails too, the defense holds.
            fresh = make_attack(spec.attack, profile=spec.profile)
            frep = fresh.fit(z_train, x_aux, replace(ctx, generator=job_generator(spec.seed, spec.cut, spec.defense, spec.attack, "restart")))
            notes = list(rep.notes) + [f"the refinement did not beat the no-information guess; restarted from scratch ({frep.epochs} epochs)"]
            kept = fresh if frep.val_loss < rep.val_loss else attack
            if fresh.prior_outcome != "beaten":  # two starts, neither beat the guess: that is the finding
                kept.prior_outcome = "not beaten after a restart"
                notes.append("neither the refinement nor a fresh fit beat the no-information guess")
            attack = kept
            rep = replace(frep if kept is fresh else rep, converged=math.isfinite(frep.val_loss) or math.isfinite(rep.val_loss),
                          notes=notes + list(frep.notes), epochs=rep.epochs + frep.epochs, seconds=rep.seconds + frep.seconds, restarts=1)
        report = {
            "converged": rep.converged, "restarts": rep.restarts, "epochs": rep.epochs, "seconds": round(rep.seconds, 2),
            "val_loss": rep.val_loss, "baseline_loss": rep.baseline_loss, "notes": list(rep.notes),
            "prior": attack.prior_outcome, "stop": rep.stop,
        }
        if spec.kind == "extend":
            report["grant_epochs"] = spec.epochs
        if inputs.candidate_state is not None and attack.holds_out and attack.holdout is not None:
            attack = _select(attack, inputs.candidate_state, spec, z_train, x_aux, report, inputs.candidate_converged, modality)
    prior = inputs.prior_scores
    if prior is None and spec.score:
        prior = modality.score(modality.prior(x_aux).expand_as(x_eval), x_eval)[modality.headline]
    scores = {d: _score(attack, defended(fitted(d), inputs.acts[d], seed=spec.seed, cut=spec.cut, which="eval", modality=modality, x=x_eval),
                        inputs, modality, prior)
              for d in spec.score}
    state = attack.state() if attack.warm_start else None
    return JobOutput(spec=spec, report=report, state=state, scores=scores, seconds=time.perf_counter() - start)


def _input_embeddings(model) -> torch.Tensor | None:
    """A text model's token embedding table (``input_embeddings``), which a white-box attacker knows; None for others."""
    table = getattr(model, "input_embeddings", None)
    return table().detach() if callable(table) else None


def _fitted(inputs: JobInputs, spec: str) -> Fitted | None:
    """The transform of defense ``spec`` given to the job; never silently none for a defense that has one."""
    f = inputs.fitted.get(spec)
    if f is None and spec != "none" and make_defense(spec).transforms_activation:
        raise RuntimeError(f"the job was given no fitted transform for defense {spec}")
    return f


@torch.no_grad()
def _score(attack, z_eval: torch.Tensor, inputs: JobInputs, modality, prior: torch.Tensor) -> Scores:
    """Per-sample scores of the reconstructions of ``z_eval``: the modality's metrics, re-identification
    (``reid_top1``; with a judge also in its feature space, ``reid_top1_features``) and the judge's verdict
    (``attack_correct``), plus the reconstructions of the fixed samples and of those that gain most over
    the no-information guess ``prior`` (per sample), the examples worth looking at."""
    from splitaudit.judge import reidentified

    x_eval = inputs.x_eval
    recon = modality.clip(attack.reconstruct(z_eval))
    values = modality.score(recon, x_eval)
    values["reid_top1"] = reidentified(*modality.reid_features(recon, x_eval))
    judge = inputs.judge
    if judge is not None:
        judge.eval()
        feats_r, feats_x = judge.features(recon), inputs.judge_features.to(recon.device)
        values["reid_top1_features"] = reidentified(feats_r, feats_x)
        if inputs.y_eval is not None:
            values["attack_correct"] = (judge.classify(feats_r).argmax(dim=1) == inputs.y_eval.to(recon.device)).float()
    gain = values[modality.headline] - prior.to(recon.device)
    fixed = torch.arange(min(N_GRID, x_eval.shape[0]), device=gain.device)
    idx = torch.unique(torch.cat([fixed, most_recognizable(gain, N_WORST).to(gain.device)]))
    return Scores(values=values, recon_idx=idx, recon=recon[idx])


def _select(attack, candidate_state: dict, spec: JobSpec, z_aux: torch.Tensor, x_aux: torch.Tensor, report: dict,
            candidate_converged: bool, modality):
    """The better, by the modality's selection score (SSIM for images), of ``attack`` and the candidate on
    the defended held-out aux samples ``attack`` kept aside."""
    other = make_attack(spec.attack, profile=spec.profile)
    other.load_state(candidate_state, tuple(z_aux.shape[1:]), tuple(x_aux.shape[1:]), device=z_aux.device)
    idx = attack.holdout
    metric = ""

    def score(a) -> float:  # the audit's own metric, on data the attacker has
        nonlocal metric
        metric, values = modality.selection(modality.clip(a.reconstruct(z_aux[idx])), x_aux[idx])
        return float(values.mean())

    mine, theirs = score(attack), score(other)
    report["selection"] = {f"refined_holdout_{metric}": round(mine, 5), f"undefended_holdout_{metric}": round(theirs, 5)}
    if not mine >= theirs:  # a NaN refinement loses too
        what, data = ("its start (the base fit, extended where granted)", "held-out") if spec.defense == "none" else ("the undefended attacker", "defended held-out")
        report["notes"] = list(report["notes"]) + [
            f"kept {what}: on {data} aux data its {metric} {theirs:.4g} beats the refinement's {mine:.4g}"
        ]
        report["converged"] = candidate_converged
        return other
    return attack
