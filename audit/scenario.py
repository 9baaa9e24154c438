"""The scenario of an audit: who has what (breaching's "case"), settled once before any attack runs.

One frozen :class:`Scenario` holds the model and its hash, the data and its disjoint splits, the
attacker's queries, the cuts to audit, the defenses, the undefended predictions, the bootstrap
resamples every interval shares, and the modality that scores reconstructions. The stages after it
(activations, prepared models, jobs, rows, costs) read it and never change it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from splitaudit.attacks.modality import Modality, modality_for
from splitaudit.cache import Cache
from splitaudit.config import AuditConfig, resolve_device
from splitaudit.cuts import CutPoint, Discovery, discover_cuts, predict
from splitaudit.data import Dataset, Splits, data_hash, make_splits
from splitaudit.defenses.base import Defense, make_defense
from splitaudit.errors import DataError, ModelError, SpecError, UserError
from splitaudit.metrics import Resamples
from splitaudit.models import load_model
from splitaudit.outputs import parse_input_norm
from splitaudit.progress import Reporter
from splitaudit.seeding import job_generator


@dataclass(frozen=True, eq=False)
class Scenario:
    config: AuditConfig
    device: torch.device
    modality: Modality
    dataset: Dataset
    splits: Splits
    data_hash: str
    model: nn.Module
    model_info: dict[str, Any]
    x_aux: torch.Tensor  # what the attacker queries the head with
    attacker: str  # a sentence saying what those queries are
    aux_key: tuple  # what the queries depend on beyond the data (for cache keys)
    x_eval: torch.Tensor
    y_eval: torch.Tensor | None
    discovery: Discovery
    cuts: tuple[CutPoint, ...]
    defenses: tuple[Defense, ...]  # "none" first when it was added
    clean_pred: torch.Tensor | None  # the undefended model's top-1 on the evaluation inputs
    resamples: Resamples  # every row's intervals come from these (a paired bootstrap)
    baseline: dict[str, torch.Tensor]  # per-sample scores of the no-information guess, per metric
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # what the data's size does to the intervals, when it is small

    @property
    def model_hash(self) -> str:
        return self.model_info["hash"]

    @property
    def settings(self) -> dict[str, Any]:
        return self.config.settings

    @property
    def n_eval(self) -> int:
        return int(self.x_eval.shape[0])

    def defense(self, spec: str) -> Defense:
        return next(d for d in self.defenses if d.spec == spec)

    def cut(self, name: str) -> CutPoint:
        return next(c for c in self.cuts if c.name == name)


def _defenses(config: AuditConfig, notes: list[str]) -> tuple[Defense, ...]:
    ds = [make_defense(s) for s in config.defenses]
    specs = [d.spec for d in ds]
    if len(set(specs)) != len(specs):
        raise SpecError(f"a defense is given twice: {', '.join(specs)}")
    if "none" not in specs:  # the baseline every defense is compared with, and adaptive attacks start from
        ds.insert(0, make_defense("none"))
        notes.append("defense 'none' added: the undefended model is the baseline every defense is compared with")
    return tuple(ds)


def split_policy(config: AuditConfig, defenses, notes: list[str]) -> str:
    """``victim`` when a model is trained here (a built-in victim without ``--weights``, or a defense that
    fine-tunes the model on its owner's data), else ``trained``: no victim split, so the evaluation and
    the attacker get the data a victim split would have taken."""
    from splitaudit.specs import parse_model_spec

    from splitaudit.text_models import is_text_model

    if parse_model_spec(config.model).kind == "builtin" and not config.weights and not is_text_model(config.model):
        return "victim"
    changing = [d.spec for d in defenses if d.changes_model]
    if changing:
        notes.append(f"a victim split is kept for the owner's training data, which {', '.join(changing)} fine-tunes on")
        return "victim"
    return "trained"


def _attacker_data(config: AuditConfig, modality: Modality, dataset: Dataset, splits: Splits) -> tuple[torch.Tensor, str, tuple]:
    """The inputs the attacker queries the head with, a sentence saying what they are, and their cache key part."""
    aux, key = splits.aux, ("split", config.aux_queries)
    if config.aux_data:
        if config.aux_data == config.data:
            raise UserError("--aux-data is the evaluation data itself; leave it out to use a disjoint split of it")
        other = modality.load_data(config.aux_data, model=config.model)
        key = (data_hash(other), config.aux_queries)
        if other.shape != dataset.shape:
            raise DataError(
                f"--aux-data {config.aux_data!r} has images of shape {other.shape}, but the model's inputs are {dataset.shape}"
            )
        n = min(other.n, config.settings["max_aux"] or other.n)
        aux = other.subset(torch.randperm(other.n, generator=job_generator(config.seed, "aux-data"))[:n])
        what = f"{n} images from {config.aux_data} (another distribution than the evaluation data)"
    else:
        what = f"{aux.n} images from a split of {config.data} disjoint from the victim's training and evaluation images"
    if config.aux_queries == "noise":
        x = torch.rand(aux.x.shape, generator=job_generator(config.seed, "aux-noise"))
        return x, f"{aux.n} uniform random inputs (the attacker has no data of its own)", key
    return aux.x, what, key


def _cuts_as_asked(discovery: Discovery, asked: tuple[str, ...]) -> tuple[CutPoint, ...]:
    """The cuts to audit under the names the user wrote (``stem``, not the ``stem.2`` that discovery
    found first for the same tensor); the other names stay in ``aliases``. A cut named twice, or by two
    of its names, is audited once, under the first."""
    if not asked:
        return discovery.cuts
    out: dict[str, CutPoint] = {}
    for name in asked:  # keyed by the name discovery found: every name of one tensor resolves to it
        found = discovery.get(name)
        if found.name not in out:
            out[found.name] = found if found.name == name else replace(
                found, name=name, aliases=tuple(n for n in (found.name, *found.aliases) if n != name))
    return tuple(out.values())


def _predict(model: nn.Module, x: torch.Tensor, notes: list[str]) -> torch.Tensor | None:
    try:
        return predict(model, x)
    except ModelError as exc:
        notes.append(f"accuracy not measured: {exc}")
        return None


SMALL_EVAL, SMALL_AUX = 200, 500


def small_data_warnings(n_eval: int, n_aux: int, baseline: torch.Tensor) -> list[str]:
    """Warnings for an evaluation set under 200 or an aux set under 500 samples, with the interval widths
    that follow: about 2 x 1.96 sd / sqrt(n) for a mean score (sd: the no-information guess's spread over the
    evaluation samples), and for a share near 0 (re-identification) a resolution of 1/n."""
    out = []
    if n_eval < SMALL_EVAL:
        sd = float(baseline.std()) if baseline.numel() > 1 else 0.0
        width = 2 * 1.96 * sd / max(n_eval, 1) ** 0.5
        out.append(f"only {n_eval} evaluation samples (fewer than {SMALL_EVAL}): a 95% interval of a mean score is about "
                   f"{width:.3f} wide, and re-identification is resolved in steps of 1/{n_eval} = {1 / max(n_eval, 1):.3f}")
    if n_aux < SMALL_AUX:
        out.append(f"only {n_aux} aux samples for the attacker (fewer than {SMALL_AUX}): a learned attack trained on so few is "
                   "likely weaker than a real attacker's, so its numbers read as lower bounds")
    return out


def build_scenario(config: AuditConfig, *, cache: Cache, reporter: Reporter, phase) -> Scenario:
    """Load and check everything the audit needs, cheapest checks first (a bad defense spec fails
    before the data loads, a bad cut before any training)."""
    from splitaudit.attacks.base import make_attack

    device = resolve_device(config.device)
    notes: list[str] = []
    defenses = _defenses(config, notes)
    for a in config.attacks:
        make_attack(a, profile=config.profile)
    modality = modality_for(config.data)
    for a in config.attacks:
        from splitaudit.attacks.base import ATTACKS

        if modality.name not in ATTACKS[a].modalities:
            other = sorted(n for n, c in ATTACKS.items() if modality.name in c.modalities and c.white_box == ATTACKS[a].white_box)
            raise SpecError(f"attack {a} does not attack {modality.name} data; for {modality.name} use {', '.join(other) or 'decoder'}")
    policy = split_policy(config, defenses, notes)
    with phase("data"):
        dataset = modality.load_data(config.data, model=config.model)
        modality.check_data(dataset, config.data)
        s = config.settings
        splits = make_splits(dataset, seed=config.seed, n_eval=s["n_eval"], max_aux=s["max_aux"], policy=policy)
        if splits.unused:
            notes.append(f"{splits.unused} samples were left unused: the {config.profile} profile caps the attacker's data at "
                         f"{s['max_aux']} (the thorough profile uses all of it)")
        dhash = data_hash(dataset)
    with phase("model"):
        num_classes = int(dataset.y.max()) + 1 if dataset.y is not None else 10
        model, model_info = load_model(config.model, weights=config.weights, splits=splits, num_classes=num_classes, device=device,
                                       cache=cache, reporter=reporter, output=config.output,
                                       input_norm=parse_input_norm(config.input_norm))
    x_aux, attacker, aux_key = _attacker_data(config, modality, dataset, splits)
    x_aux, x_eval = x_aux.to(device), splits.eval.x.to(device)
    y_eval = splits.eval.y.to(device) if splits.eval.y is not None else None
    discovery = discover_cuts(model, x_eval[:2])
    if not discovery.cuts:
        raise ModelError("the model has no candidate cut: no submodule returns a tensor")
    cuts = tuple(c if (sent := modality.sent_bytes(c.shape, x_eval)) is None else replace(c, sent_bytes=sent)
                 for c in _cuts_as_asked(discovery, config.cuts))
    clean_pred = _predict(model, x_eval, notes)
    resamples = Resamples(x_eval.shape[0], generator=job_generator(config.seed, "bootstrap"))
    prior = modality.prior(x_aux).expand_as(x_eval)
    baseline = {k: v.cpu() for k, v in modality.score(prior, x_eval).items()}
    return Scenario(
        config=config, device=device, modality=modality, dataset=dataset, splits=splits, data_hash=dhash, model=model,
        model_info=model_info, x_aux=x_aux, attacker=attacker, aux_key=aux_key, x_eval=x_eval, y_eval=y_eval,
        discovery=discovery, cuts=cuts, defenses=defenses, clean_pred=clean_pred, resamples=resamples, baseline=baseline,
        notes=tuple(notes),
        warnings=tuple(small_data_warnings(int(x_eval.shape[0]), int(x_aux.shape[0]), baseline[modality.headline])),
    )
