"""NoPeek: fine-tuning with a distance-correlation penalty between the input and the activation at the cut
(Vepakomma, Singh, Gupta, Raskar 2020, "NoPeek: Information leakage reduction to share activations in
distributed deep learning").

The loss is ``cross_entropy + weight * dCor(x, z)`` on each batch, where ``z`` is the cut's activation
taken by a forward hook during the same forward pass (so the head gets both gradients and the tail
only the task's). dCor (Székely et al. 2007) is zero only under independence and, unlike correlation,
sees non-linear dependence, which is what a learned decoder exploits. The changed model depends on the
cut, so it is prepared once per cut.

Lowering dCor on training batches is not a guarantee: the audit still attacks the fine-tuned model
with an adaptive decoder, and reports dCor at the cut on evaluation inputs before and after.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.attacks.training import TrainConfig, train
from splitaudit.cuts import capture
from splitaudit.errors import ModelError, SpecError, UserError
from splitaudit.outputs import pick, split_cut
from splitaudit.specs import param
from splitaudit.defenses.base import Defense, ModelChange, PrepareContext, register_defense
from splitaudit.defenses.dpsgd import cpu_generator, eval_accuracy

DCOR_SAMPLES = 512  # eval inputs on which dCor before/after is reported (n x n distance matrices)


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``x`` (n, d), through one matmul.

    ``torch.cdist``'s exact mode is slow to differentiate for wide activations; the matmul form loses a
    little precision on near-equal rows, and ``eps`` keeps the gradient of the square root finite there.
    """
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
    return torch.sqrt(d2 + eps)


def _double_center(d: torch.Tensor) -> torch.Tensor:
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Sample distance correlation (Székely, Rizzo, Bakirov 2007) between paired rows of ``x`` and ``y``.

    ``x`` (n, p) and ``y`` (n, q), flattened per sample. In [0, 1]: 1 when ``y`` is a similarity
    transform of ``x`` (distances proportional), near 0 for independent samples (the V-statistic is
    biased upward for small n). 0 when either side is constant. Differentiable in both arguments.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"distance_correlation needs paired samples, got {x.shape[0]} and {y.shape[0]} rows")
    a = _double_center(pairwise_distances(x.reshape(x.shape[0], -1).to(y.dtype), eps))
    b = _double_center(pairwise_distances(y.reshape(y.shape[0], -1), eps))
    dcov2 = (a * b).mean()
    dvar = (a * a).mean() * (b * b).mean()  # zero only when a side is constant, and then dcov2 is zero too
    return torch.sqrt((dcov2 / torch.sqrt(dvar).clamp_min(eps)).clamp(eps, 1.0))


@dataclass(frozen=True)
class NoPeekConfig:
    weight: float = param(0.5, lo=0.0, hi=1e6, help="weight of dCor(input, activation) against the cross-entropy")
    epochs: int = param(3, lo=1, hi=1000)
    lr: float = param(1e-2, lo=0.0, lo_open=True, hi=10.0, help="Adam learning rate")
    batch_size: int = param(128, lo=2, hi=65536, help="batch size; dCor is estimated within each batch")


@register_defense("nopeek")
class NoPeekDefense(Defense):
    Config = NoPeekConfig
    changes_model = True
    per_cut_model = True

    def prepare_model(
        self, model: nn.Module, *, cut: str | None, ctx: PrepareContext, state: dict[str, torch.Tensor] | None = None
    ) -> ModelChange:
        cfg = self.config
        if cut is None:
            raise UserError("defense nopeek decorrelates the activation at a cut, but no cut was given")
        tuned = copy.deepcopy(model)
        if state is not None:
            tuned.load_state_dict(state)
            return ModelChange(tuned.eval(), {"cut": cut, "weight": cfg.weight})
        if ctx.y_train is None:
            raise UserError(
                "defense nopeek fine-tunes the model with its task loss on the victim's training split, but the data has no labels (y)"
            )

        module, path = split_cut(cut)  # ``block:0``: a tensor of a module's nest
        try:
            cut_module = tuned.get_submodule(module)
        except AttributeError:
            raise SpecError(f"defense nopeek: model has no module {module!r}") from None
        seen: list[torch.Tensor] = []  # the cut's activation of the current forward pass, with its graph
        handle = cut_module.register_forward_hook(lambda mod, inp, out: seen.append(pick(out, path)))

        def loss_fn(net: nn.Module, batch) -> torch.Tensor:
            x, y = batch
            seen.clear()
            logits = net(x)
            if not seen:
                raise UserError(f"defense nopeek: the cut {cut!r} was not reached in the forward pass")
            penalty = distance_correlation(x, seen[-1]) if cfg.weight > 0 else logits.new_zeros(())
            return F.cross_entropy(logits, y) + cfg.weight * penalty

        x_probe = ctx.x_eval[:DCOR_SAMPLES]
        dcor_before = _dcor_at(model, cut, x_probe)
        accuracy_before = eval_accuracy(model, ctx.x_eval, ctx.y_eval)
        n = int(ctx.x_train.shape[0])
        train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=min(cfg.batch_size, n), patience=None)
        on_epoch = (lambda ep, tr, va: ctx.on_epoch(ep, cfg.epochs, tr)) if ctx.on_epoch is not None else None
        try:
            result = train(tuned, loss_fn, (ctx.x_train, ctx.y_train), config=train_cfg, generator=cpu_generator(ctx.generator),
                           on_epoch=on_epoch)
        finally:
            handle.remove()
        if result.diverged and not all(torch.isfinite(p).all() for p in tuned.parameters()):
            raise ModelError(f"defense nopeek: fine-tuning diverged (non-finite loss); try a smaller lr than {cfg.lr:g}")
        tuned.eval()
        info = {
            "cut": cut, "weight": cfg.weight, "epochs": result.epochs_run, "accuracy_before": accuracy_before,
            "accuracy_after": eval_accuracy(tuned, ctx.x_eval, ctx.y_eval), "dcor_before": dcor_before,
            "dcor_after": _dcor_at(tuned, cut, x_probe), "dcor_samples": int(x_probe.shape[0]),
            "train_seconds": round(result.seconds, 2), "diverged": result.diverged,
        }
        return ModelChange(tuned, info)


@torch.no_grad()
def _dcor_at(model: nn.Module, cut: str, x: torch.Tensor) -> float:
    return round(float(distance_correlation(x, capture(model, cut, x))), 5)

