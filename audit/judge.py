"""The judge: an independent classifier that labels reconstructions, for the attack accuracy.

"Can the server tell which digit, which person, which document it saw?" is answered twice: by
re-identification (label-free: does a reconstruction pick its own input out of the evaluation set?)
and, where the data has labels, by a classifier that is not the victim: another architecture
(the modality's ``judge``), another seed, trained by the tool on the attacker's aux split only, so it
has never seen an evaluation input. Its accuracy on the reconstructions is reported next to its
accuracy on the originals and to chance.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from splitaudit import cache_keys
from splitaudit.attacks.base import build_module
from splitaudit.attacks.training import TrainConfig, train
from splitaudit.seeding import job_generator

RECIPE = TrainConfig(epochs=30, lr=1e-2, batch_size=128, patience=None)
STEPS = 240  # optimizer steps, whatever the aux split's size: 30 epochs of 1,000 aux digits give 0.92 on MNIST


@dataclass(frozen=True, eq=False)
class Judge:
    model: nn.Module
    accuracy: float  # on the evaluation originals
    chance: float  # the share of the most frequent evaluation label
    num_classes: int
    eval_features: torch.Tensor  # its features of the evaluation originals (re-identification compares with them)


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_judge(scenario, cache, reporter, phase) -> Judge | None:
    """The judge of ``scenario`` (None without labels), from the cache or trained on the aux split."""
    s = scenario
    aux = s.splits.aux
    if aux.y is None or s.y_eval is None:
        return None
    num_classes = int(max(int(aux.y.max()), int(s.y_eval.max()))) + 1
    factory = lambda: s.modality.judge(tuple(aux.x.shape[1:]), num_classes)  # noqa: E731
    with torch.device("meta"):  # its architecture, for the cache key: no weights, no draws from any generator
        probe = factory()
    if probe is None:
        return None  # a modality without an independent classifier (text)
    per_epoch = -(-aux.n // RECIPE.batch_size)
    recipe = replace(RECIPE, epochs=max(3, min(RECIPE.epochs, -(-STEPS // per_epoch))))  # a fixed budget of steps
    arch = inspect.getsource(type(probe))
    key = cache_keys.judge(data_hash=s.data_hash, seed=s.config.seed, profile=s.config.profile, n_aux=aux.n, architecture=arch,
                           recipe=(recipe.epochs, recipe.lr, recipe.batch_size))
    model = build_module(factory, job_generator(s.config.seed, "judge", "init"), device=s.device)
    hit = cache.get("models", key)
    with phase("judge"):
        if hit is not None:
            model.load_state_dict(hit)
        else:
            with reporter.task(f"training the judge (an independent classifier) on {aux.n} aux images", total=recipe.epochs,
                               keep=True) as task:
                train(model, _loss, (aux.x.to(s.device), aux.y.to(s.device)), config=recipe,
                      generator=job_generator(s.config.seed, "judge", "order"), on_epoch=lambda ep, tr, va: task.update(ep))
            cache.put("models", key, {k: v.cpu() for k, v in model.state_dict().items()})
        model.eval()
        with torch.no_grad():
            feats = torch.cat([model.features(s.x_eval[i : i + 512]) for i in range(0, s.n_eval, 512)])
        acc = float((model.classify(feats).argmax(dim=1) == s.y_eval).float().mean())
    chance = float(torch.bincount(s.y_eval.cpu(), minlength=num_classes).max()) / s.n_eval
    return Judge(model=model, accuracy=acc, chance=chance, num_classes=num_classes, eval_features=feats)


def reidentified(recon_features: torch.Tensor, original_features: torch.Tensor, *, chunk: int = 1024) -> torch.Tensor:
    """1.0 where a reconstruction's nearest original (Euclidean distance between feature vectors) is its own
    input, else 0.0, per sample. Ties go to the lower index, as ``argmin`` does."""
    b = original_features.float()
    b2 = b.square().sum(dim=1)
    hits = []
    for i in range(0, recon_features.shape[0], chunk):
        a = recon_features[i : i + chunk].float()
        d2 = b2[None, :] - 2 * a @ b.T  # + |a|^2, the same for every original of a row
        hits.append((d2.argmin(dim=1) == torch.arange(i, i + a.shape[0], device=a.device)).float())
    return torch.cat(hits)
