"""The hybrid attack: the white-box optimization (rMLE, ``attacks/optimization.py``) started from the
learned decoder's reconstruction instead of from the mean aux image.

This is the idea of BiSR (Chen et al., CCS'24, arXiv 2409.00960): a learning-based inverter gives a
start that already carries the data prior, and an optimization that knows the head's weights then
pulls it towards an input that reproduces the observed activation. Each rung alone has a blind spot:
the decoder never checks its output against the head, and rMLE's TV prior knows nothing of the data,
so at deep and vector cuts it drifts back towards the mean image. Started from the decoder, the
optimization only has to correct what the decoder got wrong.

Choices, and why:
- **Do not undo the start: normalized gradient steps, small ones.** rMLE's Adam with large first steps
  (0.4 on pixels in [0, 1]) is made to leave the mean image quickly; from a good start it can throw the
  start away. Adam rescales each pixel on its own, so it also moves the input along directions the head
  cannot see (at a vector cut most of them): there it replaces what the decoder learned of the data by
  noise that matches ``z`` as well. A gradient step moves only along directions that change the
  activation (for a linear head, gradient descent from the start converges to the input closest to the
  start that reproduces ``z``). The hybrid's main step is such a step, normalized per sample (the
  gradient divided by its RMS, so one step size serves every cut), with the same cosine decay.
  Measured on LeNet/MNIST (a 6-epoch decoder, 30 steps, 300 evaluation images): at fc1 Adam gave SSIM
  0.44-0.57 (step 0.4-0.02) from the decoder's 0.55; normalized steps 0.69 (step 0.02-0.05).
- **The step is picked on aux data, with lambda.** Near the input (a conv cut the head barely loses
  anything at) rMLE's Adam from the decoder's start does better (ReLU2, quick: 0.948 on aux against
  0.926 for normalized steps); at vector cuts a smaller normalized step does (fc2: 0.684 at 0.01, 0.657
  at 0.05, 0.438 with Adam). Each profile has a few (rule, step size) candidates; each runs rMLE's
  lambda pick on the same aux samples from the same seed, and the best (step, lambda) by the audit's
  own metric on aux data wins (cost: the lambda grid once per candidate).
- **Keep the better of start and result.** Each sample keeps the decoder's start unless the optimized
  input matches the activation better: the comparison is the attacker's own activation-matching loss
  ``||head(x) - z||^2 / s``, never the evaluation images. And the unoptimized start is one more
  candidate of the pick: under a noise defense, matching the noisy ``z`` closely undid what the adaptive
  decoder had learned to see through (LeNet conv1, sigma 0.5: 0.96 from the decoder, 0.87 after the
  optimization), so there the hybrid keeps the decoder's reconstruction and says so in its notes.
- **Reuse the decoder.** Where the audit runs the decoder too, the runner hands the hybrid the decoder
  fitted for the same (cut, defense) (``starts_from``): the refined undefended decoder for the clean
  row, the adaptive decoder (the better of its refinement and the undefended decoder) for a defended
  one. Otherwise ``fit`` fits its own decoder on the same (defended) aux activations, and then picks
  lambda on the aux samples that decoder held out, where its start is as good as on unseen inputs. A
  decoder handed over keeps no held-out part (it was refined from a base fitted on other samples), so
  lambda is then picked on a random aux subset, where the start may look slightly better than on
  unseen inputs.
- **Adaptive like its rungs.** Under a defense the adaptive hybrid starts from the adaptive decoder and
  picks lambda on defended aux activations; the non-adaptive row is the clean hybrid scored on defended
  activations.

Cost: the decoder's (nothing more when it is reused) plus rMLE's iterations x a forward and backward
pass of the head per sample, and the lambda grid once per step candidate (three) per fit. Nothing is cached between runs, as for
rMLE (a cached attack would come back without the head it needs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from splitaudit.attacks.base import Attack, AttackContext, FitReport, make_attack, register_attack
from splitaudit.attacks.optimization import RMLEAttack, _Profile

# Normalized step sizes are per pixel, relative to the gradient's RMS (see _step), smaller for longer runs; the
# Adam candidate is rMLE's step from the decoder's start. The same number of steps as rMLE. No restarts: a random
# start would discard what the decoder knows. (lr in the profile is the first candidate's; unused.)
@dataclass(frozen=True)
class _HybridProfile(_Profile):
    steps: tuple[tuple[str, float], ...] = ()  # (step rule, step size) candidates, picked on aux data with lambda


PROFILES = {
    "quick": _HybridProfile(iterations=30, lr=0.05, restarts=0, select=32, grid=(0.0, 0.01, 0.1),
                            steps=(("normalized", 0.05), ("normalized", 0.01), ("adam", 0.4))),
    "standard": _HybridProfile(iterations=80, lr=0.03, restarts=0, select=48, grid=(0.0, 0.01, 0.03, 0.1, 0.3),
                               steps=(("normalized", 0.03), ("normalized", 0.01), ("adam", 0.4))),
    "thorough": _HybridProfile(iterations=300, lr=0.02, restarts=0, select=128, grid=(0.0, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
                               steps=(("normalized", 0.02), ("normalized", 0.005), ("adam", 0.4))),
}
STEPS_ARE = {"normalized": "normalized gradient steps", "adam": "Adam steps"}


@register_attack("hybrid")
class HybridAttack(RMLEAttack):
    modalities = ("image",)
    white_box = True
    needs_fit = True  # lambda and the activation scale on (defended) aux data; its own decoder where none is given
    starts_from = "decoder"
    profiles = PROFILES
    steps_are = "normalized gradient steps"

    def __init__(self, *, profile: str = "standard", params: dict | None = None):
        super().__init__(profile=profile, params=params)
        self.profile = profile
        self.decoder: Attack | None = None
        self._given = False
        self._start_converged = True
        self._clip = None  # the modality's clip to the data's range, set by fit
        self._kept: list[torch.Tensor] = []  # per chunk inverted: where the decoder's start was kept
        # The step candidates: the profile's, or the one a given lr asks for.
        self.steps = (("normalized", self.lr),) if self.config.lr else self.profiles[profile].steps
        self.rule = self.steps[0][0]

    def start_from(self, other: Attack, *, converged: bool = True) -> None:
        """Start from ``other``, a fitted decoder (the audit's own for this cut and defense), instead of fitting one."""
        if other.name != self.starts_from:
            raise TypeError(f"attack hybrid starts from a {self.starts_from}, not from {other.name}")
        self.decoder, self._given, self._start_converged = other, True, converged

    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport:
        if ctx.head is None:  # before any work, as rmle: without the head this is only the decoder
            raise RuntimeError("hybrid is a white-box attack and needs the head; the runner sets ctx.head for white_box attacks")
        start = time.perf_counter()
        notes: list[str] = []
        self._clip = ctx.modality.clip
        if self._given:
            notes.append("started from the audit's decoder for this cut and defense")
        else:
            self.decoder = make_attack(self.starts_from, profile=self.profile)
            # The decoder is a black-box attack: it gets the activations, never the head.
            rep = self.decoder.fit(z_aux, x_aux, replace(ctx, head=None, embeddings=None))
            self._pool = self.decoder.holdout
            self._start_converged = rep.converged
            notes.append(f"started from a decoder fitted here ({rep.epochs} epochs, {rep.seconds:.1f} s, validation loss "
                         f"{rep.val_loss:.4g} against the no-information guess's {rep.baseline_loss:.4g}"
                         + ("" if rep.converged else "; it did not converge") + ")")
        # Each step candidate runs rMLE's lambda pick from the same generator state (the same aux samples, the same
        # seed), and the best (step, lambda) by the selection score is kept.
        gen_state = ctx.generator.get_state()
        tried = []
        for rule, lr in self.steps:
            ctx.generator.set_state(gen_state)
            self.rule, self.lr, self.steps_are, self._kept = rule, lr, STEPS_ARE[rule], []
            rep = super().fit(z_aux, x_aux, ctx)
            # What the lambda grid's runs did at the lambda picked (one run per lambda, lambda-major).
            kept = torch.cat(self._kept).view(len(self.grid), -1)[self.grid.index(self.lam)]
            tried.append((self.selection[1], rule, lr, rep, self.lam, self.selection, self.seed, kept))
        self._kept = []
        score, self.rule, self.lr, report, self.lam, self.selection, self.seed, kept = max(tried, key=lambda t: t[0])
        self.steps_are = STEPS_ARE[self.rule]
        if len(tried) > 1:
            notes.append(f"step picked on the same aux samples: {self.steps_are}, lr {self.lr:g} ("
                         + ", ".join(f"{r} {lr:g}: {sc:.3f}" for sc, r, lr, *_ in tried) + ")")
        notes.append(f"kept the decoder's start for {int(kept.sum())} of {kept.numel()} aux samples, where the optimization "
                     "did not lower the activation-matching loss")
        # The start itself is one more candidate on the same aux samples: where the activation is noisy, matching
        # it closely can undo what the decoder rebuilt (it learned to see through the noise).
        idx, best = self.selection
        with torch.no_grad():
            rec = self._clip(self.decoder.reconstruct(z_aux[idx]))
        metric, values = ctx.modality.selection(rec, x_aux[idx])
        label = "SSIM" if metric == "ssim" else "-MSE"
        if not best > float(values.mean()):
            self.iterations = 0
            mse = float((rec - x_aux[idx]).square().mean())
            notes.append(f"the decoder's start alone scores {label} {float(values.mean()):.3f} on the same aux samples, at least "
                         f"the optimization's {best:.3f}: kept it, unoptimized")
            report = replace(report, val_loss=mse, converged=True)  # the start as it is: its convergence is the decoder's
        else:
            notes.append(f"the decoder's start alone scores {label} {float(values.mean()):.3f} on the same aux samples")
        # A start from an unconverged decoder is a lower bound too, whatever the optimization did after it.
        return replace(report, seconds=time.perf_counter() - start, notes=notes + list(report.notes),
                       converged=report.converged and self._start_converged)

    def reconstruct(self, z: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        if self.decoder is None:
            raise RuntimeError("fit() must be called before reconstruct()")
        return super().reconstruct(z, batch_size=batch_size)

    def _optimizer(self, x: torch.Tensor):
        return super()._optimizer(x) if self.rule == "adam" else None  # the normalized step keeps no state

    def _step(self, opt, x: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """A gradient step normalized per sample: ``lr`` times the gradient over its RMS (over the sample's pixels);
        or rMLE's Adam step, where that rule was picked."""
        if self.rule == "adam":
            return super()._step(opt, x, grad, lr)
        with torch.no_grad():
            rms = grad.flatten(1).square().mean(dim=1).sqrt().clamp_min(1e-12)
            x.sub_(grad * (lr / rms).view(-1, *([1] * (grad.dim() - 1))))

    def _invert_chunk(self, z, lams, gen: torch.Generator, restarts: int, start: torch.Tensor | None = None):
        with torch.no_grad():
            start = self._clip(self.decoder.reconstruct(z)).to(self.prior.dtype).contiguous()
        x, plateaued = super()._invert_chunk(z, lams, gen, restarts, start=start)
        with torch.no_grad():
            keep = ~(self._fidelity(x, z) < self._fidelity(start, z))  # a tie, or a NaN, keeps the start
            x[keep] = start[keep]
        self._kept.append(keep.cpu())
        return x, plateaued
