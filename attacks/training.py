"""The one training loop of splitaudit.

Every learned piece trains here: the decoder attack, the built-in victims, and the fine-tuning of the
DP-SGD and NoPeek defenses. A defense that needs something special (Opacus's private optimizer, a
penalty term) passes it in as ``wrap`` or in its ``loss_fn`` instead of writing a second loop.

Why a hand-written loop and not a framework: we need early stopping on a held-out part with the best
checkpoint kept, explicit generators for data order, and a divergence check that turns a NaN into a
retry upstream instead of a silently bad attack (a bad attack would read as privacy).

A run can also stop once its validation curve has *flattened* (:class:`Plateau`, :func:`flattened`): the
audit's budget then goes to the cuts still improving instead of to those that are done. The rule is
relative to what the run has gained over the no-information guess, so it reads the same whatever the
loss's scale, and every run says why it stopped (``TrainResult.stop``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from splitaudit._torch_compat import adam

LossFn = Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]
Wrap = Callable[[nn.Module, torch.optim.Optimizer, DataLoader], tuple[nn.Module, torch.optim.Optimizer, DataLoader]]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    patience: int | None = 3  # epochs without validation improvement before stopping; None: run all
    weight_decay: float = 0.0
    min_delta: float = 1e-4  # relative improvement that counts as better
    optimizer: str = "adam"  # adam | sgd
    # False: return the last iterate and never select an epoch by its loss. DP-SGD needs this: picking
    # the best epoch by the noiseless loss on private data is a release the privacy accountant does not count.
    keep_best: bool = True
    # "constant", or "onecycle": a 15% warm-up from lr/25 to lr, then a cosine decay to lr/1e4 over every step
    # of ``epochs`` (Smith and Topin 2019; torch's OneCycleLR shape). For a fixed budget of few epochs it ends
    # much further than a constant rate: the text inverter reaches 0.941 of MiniLM's tokens at its last block
    # after 6 epochs against 0.931 at a constant 1e-3. Early stopping would cut its decay short: leave patience off.
    schedule: str = "constant"
    # Adam's decay rates. A short run wants a short memory for the second moment: with 0.999 (about 1,000
    # steps) the squared gradients of the first epochs, far larger than the late ones, keep the late
    # steps small, so a decoder's curve flattens for the optimizer's sake, not the problem's.
    betas: tuple[float, float] = (0.9, 0.999)
    # The start counts as epoch 0: evaluated before training, kept if no epoch beats it. A run that resumes
    # a fitted model (a budget extension) then never ends worse than where it began.
    keep_start: bool = False


@dataclass(frozen=True)
class Plateau:
    """Stop a run whose validation curve has flattened (:func:`flattened`), over the last ``patience`` epochs.

    ``score(model)`` is what is watched, higher is better (the attack's own metric on held-out data, say);
    ``prior`` is its value for the no-information guess. Without ``score`` the validation loss is watched
    (lower is better) and ``prior`` is the guess's loss.
    """

    share: float
    prior: float
    score: Callable[[nn.Module], float] | None = None


@dataclass
class TrainResult:
    best_val: float
    best_epoch: int
    epochs_run: int
    seconds: float
    diverged: bool = False
    history: list[tuple[float, float]] = field(default_factory=list)  # (train loss, val loss) per epoch
    # Why it stopped: "budget" (every epoch ran and the curve had not flattened: it was still improving),
    # "flattened" (the Plateau rule), "no_improvement" (patience epochs without a better validation loss) or
    # "diverged".
    stop: str = "budget"
    watched: list[float] = field(default_factory=list)  # what the Plateau rule watched, per epoch (0: the start, with keep_start)
    start_val: float | None = None  # the start's validation loss (keep_start)


def flattened(values: Sequence[float], prior: float, *, window: int, share: float, higher_is_better: bool = True) -> bool:
    """Whether a validation curve has flattened: over its last ``window`` epochs, its best value improved by
    less than ``share`` of the best's gain over ``prior`` (the no-information guess).

    Relative to the gain, not to the value: a first conv at MSE 1e-4 against a guess at 0.07 that still
    halves its loss is done in every way that matters, while a vector cut at 0.040 against 0.069 that gains
    0.001 an epoch is not. A curve that has not beaten the guess has not flattened (it may not have started).
    ``values`` are per epoch, oldest first; the running best makes a noisy curve's plateau read as one.
    """
    if window < 1 or len(values) <= window or share <= 0:
        return False
    sign = 1.0 if higher_is_better else -1.0
    best: list[float] = []
    for v in values:
        v = sign * v
        best.append(v if not best or not math.isfinite(best[-1]) or v > best[-1] else best[-1])
    gain = best[-1] - sign * prior
    if not (math.isfinite(gain) and gain > 0):
        return False
    return best[-1] - best[-1 - window] < share * gain


class _Shuffled:
    """Mini-batches of in-memory tensors in a fresh order each epoch, drawn from ``generator``."""

    def __init__(self, data: Sequence[torch.Tensor], batch_size: int, generator: torch.Generator):
        self.data, self.batch_size, self.generator = list(data), batch_size, generator

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        n = self.data[0].shape[0]
        order = torch.randperm(n, generator=self.generator, device=self.generator.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield [t[idx.to(t.device)] for t in self.data]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, data: Sequence[torch.Tensor], *, batch_size: int = 256) -> float:
    """Mean of ``loss_fn`` over ``data`` in eval mode, weighted by batch size."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = data[0].shape[0]
    for start in range(0, n, batch_size):
        batch = [t[start : start + batch_size] for t in data]
        total += float(loss_fn(model, batch)) * batch[0].shape[0]
        count += batch[0].shape[0]
    model.train(was_training)
    return total / max(count, 1)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[torch.Tensor],
    *,
    config: TrainConfig,
    generator: torch.Generator,
    val_data: Sequence[torch.Tensor] | None = None,
    wrap: Wrap | None = None,
    on_epoch: Callable[[int, float, float], None] | None = None,
    params: Sequence[nn.Parameter] | None = None,
    plateau: Plateau | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best checkpoint by validation loss.

    ``params`` restricts what is optimized (NoPeek trains only the head). ``wrap`` may replace the
    model, optimizer and loader (Opacus's ``make_private``); the caller gets its results through the
    model it passed in, whose parameters the wrapper shares. ``plateau`` stops the run once its
    validation curve has flattened (over ``config.patience`` epochs).
    """
    start = time.perf_counter()
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    # Adam's fused kernel updates every parameter in one pass (10-15% of a small decoder's step on a
    # CPU). Not under a wrapper: Opacus's optimizer drives a torch.optim one step by step.
    fused = wrap is None and bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    elif fused:
        # the fused kernel, stepped directly on the CPU
        opt = adam(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    run_model = model
    loader: Iterable[Sequence[torch.Tensor]]
    if wrap is not None:
        dataset = TensorDataset(*train_data)
        sampler = RandomSampler(dataset, generator=generator)
        # The loader draws a base seed per epoch; without its own generator it would take it from torch's
        # global one, which other threads draw from too (a defense's fine-tuning runs beside the attack jobs).
        loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=False, generator=generator)
        run_model, opt, loader = wrap(model, opt, loader)
    else:
        # Tensors already in memory: slicing a shuffled index is what a DataLoader does sample by sample
        # and collates, at a fraction of its per-batch cost (half a LeNet epoch).
        loader = _Shuffled(train_data, config.batch_size, generator)

    rate = None
    if config.schedule != "constant":
        per_epoch = math.ceil(train_data[0].shape[0] / config.batch_size) if wrap is None else len(loader)
        rate = _schedule(config, config.epochs * max(per_epoch, 1))
    steps = 0
    best_val, best_epoch, best_state = math.inf, -1, None
    history: list[tuple[float, float]] = []
    watched: list[float] = []
    diverged = False
    since_best = 0
    stop = "budget"

    def watch(val_loss: float) -> None:
        if plateau is not None:
            watched.append(val_loss if plateau.score is None else _scored(run_model, plateau.score))

    start_val = None
    if config.keep_start:
        start_val = evaluate(run_model, loss_fn, val_data) if val_data is not None else math.inf
        if math.isfinite(start_val):
            best_val, best_epoch, best_state = start_val, 0, copy.deepcopy(model.state_dict())
            watch(start_val)
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        run_model.train()
        total, count = 0.0, 0
        for batch in loader:
            if batch[0].shape[0] == 0:  # Poisson sampling can draw an empty batch
                continue
            if rate is not None:
                _set_lr(opt, *rate(steps))
            steps += 1
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(run_model, batch)
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch[0].shape[0]
            count += batch[0].shape[0]
        if diverged:
            stop = "diverged"
            break
        train_loss = total / max(count, 1)
        val_loss = evaluate(run_model, loss_fn, val_data) if val_data is not None else train_loss
        if not math.isfinite(val_loss):
            diverged, stop = True, "diverged"
            break
        history.append((train_loss, val_loss))
        watch(val_loss)
        if on_epoch is not None:
            on_epoch(epoch, train_loss, val_loss)
        if not config.keep_best:
            best_val, best_epoch = val_loss, epoch
        elif val_loss < best_val * (1 - config.min_delta) or best_state is None:
            best_val, best_epoch, since_best = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            if config.patience is not None and since_best >= config.patience:
                stop = "no_improvement"
                break
        if (plateau is not None and config.patience
                and flattened(watched, plateau.prior, window=config.patience, share=plateau.share,
                              higher_is_better=plateau.score is not None)):
            stop = "flattened"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return TrainResult(
        best_val=best_val,
        best_epoch=best_epoch,
        epochs_run=epoch,
        seconds=time.perf_counter() - start,
        diverged=diverged,
        history=history,
        stop=stop,
        watched=watched,
        start_val=start_val,
    )


@torch.no_grad()
def _scored(model: nn.Module, score: Callable[[nn.Module], float]) -> float:
    """``score(model)`` in eval mode, the model's mode restored."""
    was_training = model.training
    model.eval()
    try:
        return float(score(model))
    finally:
        model.train(was_training)


def _schedule(config: TrainConfig, total: int) -> Callable[[int], tuple[float, float]] | None:
    """The learning rate and Adam's beta1 at each step (None: constant, the optimizer's own). One cycle as
    torch's OneCycleLR draws it: the rate rises from lr/25 to lr over the first 15% of the steps while
    beta1 falls from 0.95 to 0.85, then the rate decays to lr/1e4 while beta1 climbs back, both on cosines
    (the cycling of beta1 is worth 0.3 points of token accuracy at MiniLM's last block)."""
    if config.schedule == "constant":
        return None
    if config.schedule != "onecycle":
        raise ValueError(f"unknown learning-rate schedule {config.schedule!r} (constant | onecycle)")
    peak, start, end = config.lr, config.lr / 25, config.lr / 1e4
    warm = max(1, int(0.15 * total))

    def cos(lo: float, hi: float, t: float) -> float:  # lo at t=0, hi at t=1
        return hi + (lo - hi) * (1 + math.cos(math.pi * t)) / 2

    def rate(step: int) -> tuple[float, float]:
        if step < warm:
            t = step / warm
            return cos(start, peak, t), cos(0.95, 0.85, t)
        t = min(1.0, (step - warm) / max(1, total - warm))
        return cos(peak, end, t), cos(0.85, 0.95, t)

    return rate


def _set_lr(opt, lr: float, beta1: float) -> None:
    if hasattr(opt, "param_groups"):  # a torch.optim optimizer
        for g in opt.param_groups:
            g["lr"] = lr
            if "betas" in g:
                g["betas"] = (beta1, g["betas"][1])
    else:  # FusedAdam
        opt.lr, opt.betas = lr, (beta1, opt.betas[1])
