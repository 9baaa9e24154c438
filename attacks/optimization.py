"""The white-box regularized maximum-likelihood (rMLE) attack of He, Zhang and Lee, "Model inversion
attacks against collaborative inference" (ACSAC 2019), section 4.1.

An attacker who knows the head's weights looks for the input that the head maps to the observed
activation, under an image prior::

    x* = argmin_{x in [0, 1]}  ||head(x) - z||^2 / s  +  lambda * TV(x)

solved per sample with Adam, all samples of a chunk at once (the head runs in eval mode, so samples do
not interact and batching changes nothing but speed).

Choices, and why:
- **Range: projected gradient (clamp to [0, 1] after every step), not a sigmoid.** Real images sit on
  the boundary of the box (MNIST's background is exactly 0, its strokes near 1). A sigmoid only
  reaches those values with infinite logits and its gradient vanishes on the way, so the very pixels
  that make up most of the image converge slowest, and a pixel that saturates early cannot come back.
  Projection reaches the boundary exactly and keeps the full gradient inside the box.
- **Scale: the data term is divided by ``s``, the mean squared activation on the aux data.** Cuts
  differ in scale by orders of magnitude; after the division the data term is a relative error of
  order one at every cut, so one learning rate and one lambda grid serve every layer.
- **lambda is picked on the attacker's own aux data.** ``fit`` inverts a small aux subset with each
  lambda of a short grid and keeps the one whose reconstructions are closest to the true aux images
  (SSIM, or MSE for images under 11 pixels a side). That is legitimate, since the attacker owns the
  aux data, and it adapts the prior to the cut: near the input (where the head is nearly invertible)
  it picks little or no smoothing, deeper or under a noise defense it picks more. Because ``fit``
  learns this, ``needs_fit`` is True, and the runner re-fits on defended activations for the adaptive
  rows, which lets lambda grow with the noise.
- **Restarts:** the first run starts from the mean aux image (the no-information guess), further runs
  from uniform noise; each sample keeps the run with the lowest objective. The objective, not the data
  term alone, decides: with lambda > 0 the data term alone would favour the noisier of two solutions
  of the same problem. The best iterate of each run is kept, not the last one.
- **Step size:** Adam with a large step (0.4 on pixels in [0, 1]) and a cosine decay to 1% of it:
  the large early steps leave the prior quickly, the small late ones refine (at LeNet's first conv
  the reconstruction reaches 65 dB PSNR). On LeNet/MNIST at ReLU2, 0.4 matched or beat 0.05-0.2 at
  equal budgets.
- **Budgets:** at equal cost, more steps beat more restarts (ReLU2, 128 images: 100 steps x 1 run
  gave SSIM 0.971, 50 steps x 2 runs 0.966), so only ``thorough`` restarts. The lambda grid runs one
  run per lambda, all lambdas in one batch. The best lambda shrinks as the step budget grows (early
  stopping regularizes too), one more reason to pick it on aux data for each fit rather than fix it.
- **Gradients reach the input only** (``torch.autograd.grad`` with respect to ``x``): the victim's
  parameters never get a ``.grad``, and ``reconstruct`` turns gradients on itself, since it may be
  called under ``torch.no_grad()``.

Where it is weak: at deep and vector cuts (a classifier's last layers) many inputs match ``z`` and the
TV prior knows nothing about the data, so rMLE drifts towards the prior or below it; the decoder,
which learns the data distribution, is stronger there. The runner's headline takes the stronger.

The hybrid (``attacks/hybrid.py``) is this optimization with another start (the decoder's
reconstruction), another step (``_step``) and budgets of its own (``profiles``).

Cost: iterations x (restarts + 1) forward and backward passes of the head per sample, plus the
lambda grid (``select`` aux samples x the grid) once per fit. Standard profile, LeNet, 1,000 MNIST
images, one CPU thread: 13 s at conv1 and 19 s at ReLU2, fit included. Nothing is cached between
runs (the fitted state is two scalars, but a cached attack would come back without the head it needs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from splitaudit.attacks.base import Attack, AttackContext, FitReport, register_attack
from splitaudit.errors import SpecError
from splitaudit.specs import build_config, param


@dataclass(frozen=True)
class RMLEConfig:
    iterations: int = param(0, lo=0, hi=100_000, help="Adam steps per run; 0 picks by profile")
    lr: float = param(0.0, lo=0.0, hi=10.0, help="Adam step size (pixels in [0, 1]); 0 picks by profile")
    restarts: int = param(-1, lo=-1, hi=20, help="extra runs from random starts; -1 picks by profile")
    tv: float = param(-1.0, lo=-1.0, hi=1e3, help="weight lambda of the TV prior; -1 picks it on aux data")
    select: int = param(0, lo=0, hi=100_000, help="aux samples used to pick lambda; 0 picks by profile")
    batch_size: int = param(0, lo=0, hi=65_536, help="samples optimized together; 0 picks by input size (at most 256)")


@dataclass(frozen=True)
class _Profile:
    iterations: int
    lr: float
    restarts: int
    select: int  # aux samples for the lambda grid
    grid: tuple[float, ...]  # candidate lambdas (on the scale-normalized data term)


PROFILES = {
    "quick": _Profile(iterations=30, lr=0.4, restarts=0, select=32, grid=(0.01, 0.1, 1.0)),
    "standard": _Profile(iterations=80, lr=0.4, restarts=0, select=48, grid=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0)),
    "thorough": _Profile(iterations=300, lr=0.4, restarts=1, select=128, grid=(0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)),
}

_TV_EPS = 1e-2  # smooths |grad x| near 0, where its gradient would be undefined


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Isotropic, smoothed total variation per sample: mean over pixels of |grad x|, shape ``(N,)``.

    Forward differences padded with zero at the far border, so any size down to 1x1 works (a 1-pixel
    image has no variation).
    """
    dx = F.pad(x[..., :, 1:] - x[..., :, :-1], (0, 1, 0, 0))
    dy = F.pad(x[..., 1:, :] - x[..., :-1, :], (0, 0, 0, 1))
    return ((dx * dx + dy * dy + _TV_EPS**2).sqrt() - _TV_EPS).flatten(1).mean(dim=1)


TICK_EVERY = 10  # optimization steps between progress callbacks


@register_attack("rmle")
class RMLEAttack(Attack):
    modalities = ("image",)
    white_box = True
    needs_fit = True  # fit picks lambda and the activation scale on aux data

    profiles: ClassVar[dict[str, _Profile]] = PROFILES  # a subclass (hybrid) brings budgets of its own
    steps_are: ClassVar[str] = "Adam steps"  # what _step takes, for the notes

    def __init__(self, *, profile: str = "standard", params: dict | None = None):
        self.config = build_config(RMLEConfig, params or {}, what=f"attack {self.name}")
        if self.config.tv < 0 and self.config.tv != -1:
            raise SpecError(f"attack {self.name}: tv={self.config.tv:g} is out of range; allowed: -1 (pick on aux data) or [0, 1000]")
        p = self.profiles[profile]
        self.iterations = self.config.iterations or p.iterations
        self.lr = self.config.lr or p.lr
        self.restarts = p.restarts if self.config.restarts < 0 else self.config.restarts
        self.select = self.config.select or p.select
        self.grid = p.grid if self.config.tv < 0 else (self.config.tv,)
        self.head: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.lam: float | None = None
        self.scale: float | None = None
        self.prior: torch.Tensor | None = None
        self.seed: int | None = None
        # Called every few steps with (step, steps, objective): progress bars, and the runner's way to
        # stop a running job on Ctrl-C (the callback raises).
        self._tick: Callable[[int, int, float], None] | None = None
        # The aux samples lambda may be picked on (None: all of them); the hybrid narrows it to the ones its
        # decoder did not train on.
        self._pool: torch.Tensor | None = None
        self.selection: tuple[torch.Tensor, float] | None = None

    # -- fit: the scale of the data term and lambda, on aux data --
    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport:
        if ctx.head is None:
            raise RuntimeError("rmle is a white-box attack and needs the head; the runner sets ctx.head for white_box attacks")
        start = time.perf_counter()
        self.head = ctx.head
        self._tick = ctx.on_epoch
        gen = ctx.generator
        scale = float(z_aux.square().mean(dtype=torch.float64))
        self.scale = scale if math.isfinite(scale) and scale > 0 else 1.0  # all-zero activations: nothing to scale
        self.prior = ctx.modality.prior(x_aux)
        self.seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        notes: list[str] = []
        with torch.no_grad():  # batching must not change a sample's activation (BatchNorm in eval mode)
            pair, single = self.head(x_aux[:2]), self.head(x_aux[:1])
        if not torch.allclose(pair[:1], single, rtol=1e-4, atol=1e-5 * (float(single.abs().max()) + 1)):
            notes.append("the head's output for a sample changes with its batch (a model in training mode?); "
                         "samples optimized together are then coupled")

        # Every lambda of the grid on the same aux subset, all in one batch (one lambda per sample).
        pool = torch.arange(z_aux.shape[0]) if self._pool is None else self._pool.cpu()
        idx = pool[torch.randperm(len(pool), generator=gen)[: min(self.select, len(pool))]].to(z_aux.device)
        zs, xs = z_aux[idx], x_aux[idx]
        k, m = len(self.grid), len(idx)
        lams = torch.tensor(self.grid, dtype=xs.dtype, device=xs.device).repeat_interleave(m)
        recs, plateaued = self._invert(zs.repeat(k, *([1] * (zs.dim() - 1))), lams, seed=self.seed + 1, restarts=0)
        xs_k = xs.repeat(k, 1, 1, 1)
        mse_k = (recs - xs_k).square().flatten(1).mean(dim=1).view(k, m).mean(dim=1)
        by, sel = ctx.modality.selection(recs, xs_k)  # the audit's own metric (SSIM; -MSE under 11x11)
        score_k = sel.view(k, m).mean(dim=1)
        finite = [i for i in range(k) if math.isfinite(float(score_k[i]))]
        if not finite:
            raise RuntimeError(f"{self.name}: the optimization produced non-finite reconstructions for every lambda")
        best = max(finite, key=lambda i: float(score_k[i]))
        self.lam = float(self.grid[best])
        self.selection = (idx, float(score_k[best]))  # the aux samples lambda was picked on, and its score there
        mse = float(mse_k[best])
        baseline = float(F.mse_loss(self.prior.expand_as(xs), xs))
        metric = "SSIM" if by == "ssim" else "-MSE"
        if k > 1:
            tried = ", ".join(f"{lam:g}: {float(sc):.3f}" for lam, sc in zip(self.grid, score_k))
            notes.insert(0, f"lambda={self.lam:g} picked on {m} aux samples by {metric} ({tried})")
        else:
            notes.insert(0, f"lambda={self.lam:g} given; {metric} {float(score_k[0]):.3f} on {m} aux samples")
        notes.append(
            f"{self.iterations} {self.steps_are} x {self.restarts + 1} run(s), lr {self.lr:g}, data term scaled by 1/{self.scale:.3g}"
        )
        beats = mse < 0.9 * baseline
        if not beats:
            notes.append(f"aux MSE {mse:.4f} does not beat the no-information guess ({baseline:.4f})")
        if not plateaued:
            notes.append("objective still falling at the end of the budget; more iterations may help")
        return FitReport(
            converged=beats or plateaued,
            restarts=self.restarts,
            epochs=self.iterations,
            seconds=time.perf_counter() - start,
            val_loss=mse,
            baseline_loss=baseline,
            notes=notes,
        )

    # -- reconstruct --
    def reconstruct(self, z: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Inputs rebuilt from ``z``; deterministic for a given ``z`` and batch size."""
        if self.head is None or self.lam is None:
            raise RuntimeError("fit() must be called before reconstruct()")
        lams = torch.full((z.shape[0],), self.lam, dtype=self.prior.dtype, device=z.device)
        rec, _ = self._invert(z, lams, seed=self.seed, restarts=self.restarts, batch_size=batch_size)
        return rec

    def _invert(self, z, lams, *, seed: int, restarts: int, batch_size: int | None = None) -> tuple[torch.Tensor, bool]:
        """Reconstructions for all of ``z`` (chunked; ``lams`` holds each sample's lambda) and whether
        every chunk's objective plateaued."""
        # Input and head activations of a chunk are kept for the backward pass: about 4M input values a chunk.
        bs = batch_size or self.config.batch_size or max(1, min(256, (1 << 22) // max(1, math.prod(self.prior.shape[1:]))))
        gen = torch.Generator(device=z.device).manual_seed(seed)
        outs, plateaued = [], True
        for i in range(0, z.shape[0], bs):
            x, flat = self._invert_chunk(z[i : i + bs].detach(), lams[i : i + bs], gen, restarts)
            outs.append(x)
            plateaued &= flat
        return torch.cat(outs), plateaued

    def _invert_chunk(self, z, lams, gen: torch.Generator, restarts: int, start: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
        """The best of ``restarts + 1`` runs per sample; the first run starts from ``start`` (None: the mean aux image)."""
        n = z.shape[0]
        shape = (n, *self.prior.shape[1:])
        best_x = self.prior.expand(shape).clone()
        best_obj = torch.full((n,), math.inf, device=z.device, dtype=self.prior.dtype)
        plateaued = True
        for run in range(restarts + 1):
            if run == 0:
                x0 = self.prior.expand(shape) if start is None else start
            else:
                x0 = torch.rand(shape, generator=gen, device=z.device, dtype=self.prior.dtype)
            x, obj, flat = self._descend(x0, z, lams)
            better = obj < best_obj
            best_x[better] = x[better]
            best_obj = torch.where(better, obj, best_obj)
            plateaued &= flat
        return best_x, plateaued

    def _fidelity(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-sample data term (the activation-matching loss), shape ``(N,)``."""
        out = self.head(x)
        return (out - z.to(out.dtype)).square().flatten(1).mean(dim=1) / self.scale

    def _objective(self, x: torch.Tensor, z: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
        """Per-sample objective, shape ``(N,)``."""
        return self._fidelity(x, z) + lams * total_variation(x)

    def _optimizer(self, x: torch.Tensor):
        return torch.optim.Adam([x], lr=self.lr)

    def _step(self, opt, x: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """One step of ``x`` (before the projection) along ``grad`` with step size ``lr``: Adam's."""
        x.grad = grad
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    def _descend(self, x0, z, lams) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One projected run (the step: :meth:`_step`); returns the best iterate per sample, its objective, and a
        plateau flag."""
        x = x0.detach().clone().clamp_(0, 1).requires_grad_(True)
        opt = self._optimizer(x)
        steps = self.iterations
        best_x = x.detach().clone()
        best_obj = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
        trace: list[float] = []
        with torch.enable_grad():
            for step in range(steps + 1):
                obj = self._objective(x, z, lams)
                with torch.no_grad():
                    better = obj < best_obj  # NaN never counts as better
                    best_x[better] = x[better]
                    best_obj = torch.where(better, obj.detach(), best_obj)
                    trace.append(float(best_obj.mean()))
                if self._tick is not None and step % TICK_EVERY == 0:
                    self._tick(step, steps, trace[-1])
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(obj.sum(), x)  # gradients reach x only, never the weights
                # cosine decay to 1% of lr
                self._step(opt, x, grad, self.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps))))
                with torch.no_grad():
                    x.clamp_(0, 1)
        # Plateaued: the last fifth of the run improved the mean objective by under 1%.
        k = len(trace) - 1 - max(1, steps // 5)
        plateaued = steps == 0 or not math.isfinite(trace[-1]) or trace[max(k, 0)] - trace[-1] <= 0.01 * abs(trace[-1])
        return best_x, best_obj, plateaued
