"""The black-box inverse-network (decoder) attack of He, Zhang and Lee, "Model inversion attacks
against collaborative inference" (ACSAC 2019), section 4.2.

The attacker queries the head with its own auxiliary data, collects (activation, input) pairs, and
trains a network that maps activations back to inputs. Its architecture is derived from the
activation's shape: transposed convolutions up to the input's size for spatial activations, a dense
stem reshaped to a small feature map for vectors.

Honesty measures, since a weak attack reads as privacy:
- activations are standardized with aux statistics (a raw scale of 1e3 or 1e-3 would stall Adam);
- a held-out tenth of the aux data drives early stopping, and the best checkpoint is kept;
- a run that diverges, does not beat the no-information guess, or is still improving when its budget
  ends is restarted or resumed, and the best run by validation loss is kept;
- whatever remains unconverged is flagged in the result, never silently reported.

Budget by difficulty. A run stops once its validation curve has flattened: over the last ``patience``
epochs its SSIM on the held-out aux data (the modality's own metric, ``Modality.selection``) rose by less
than ``flat`` of its gain over the no-information guess's. SSIM, not the loss: at a first conv the loss
still halves between SSIM 0.95 and 0.997 while its gain over the guess is already 99% made, so a rule on
the loss stops there far too early (measured on LeNet's conv1: at 7 epochs, SSIM 0.92). Whether a run
was still improving when its allotment ended is its ``stop`` ("budget"); in an audit the runner's ledger
(``splitaudit.ledger``) then decides how many more epochs it gets, and the ``extend`` job resumes it
(:meth:`DecoderAttack.extend_from`): a fresh optimizer and one cycle of the learning rate over the
granted epochs, the start kept if no epoch beats it. An attack fitted on its own (outside an audit, or the
hybrid's own decoder) extends itself the same way, ``extensions`` times, with no ledger to ask.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from splitaudit.attacks.base import Attack, AttackContext, FitReport, build_module, register_attack
from splitaudit.attacks.modality import get_modality
from splitaudit.attacks.training import Plateau, TrainConfig, evaluate, train
from splitaudit.specs import build_config, param


@dataclass(frozen=True)
class DecoderConfig:
    width: int = param(0, lo=0, hi=1024, help="channels of the decoder; 0 picks by profile")
    epochs: int = param(0, lo=0, hi=1000, help="max epochs per run; 0 picks by profile")
    lr: float = param(0.0, lo=0, hi=1.0, help="Adam learning rate; 0 picks by profile")
    batch_size: int = param(0, lo=0, hi=4096, help="0 picks by profile")
    restarts: int = param(-1, lo=-1, hi=20, help="extra runs when one fails; -1 picks by profile")
    extensions: int = param(-1, lo=-1, hi=20, help="extra budgets while still improving; -1 picks by profile")
    val_fraction: float = param(0.0, lo=0.0, hi=0.5, help="held-out share of the aux data; 0 picks by profile")


@dataclass(frozen=True)
class Budget:
    width: int
    epochs: int
    patience: int
    restarts: int
    extensions: int  # extra budgets granted while still improving
    batch: int
    lr: float
    full_res: bool = False  # an activation at the input's resolution is decoded at full resolution
    min_steps: int = 0  # optimizer steps per run at least: small aux sets get more epochs (patience still stops early)
    schedule: str = "constant"  # the learning rate over a run (attacks.training.TrainConfig.schedule)
    val_fraction: float = 0.1  # the held-out share of the aux data that selects the run and checks the prior
    refine_epochs: int = 0  # an adaptive refinement's epochs (0: the profile's adaptive_epochs)
    refine_lr: float = 0.0  # its peak learning rate (0: lr)
    # Stop a run whose held-out score has flattened: it rose by less than this share of its gain over the
    # no-information guess over the last ``patience`` epochs (0: never; a schedule is never cut short).
    flat: float = 0.0
    cap: float = 1.0  # in an audit, a cut's epochs are at most this many times ``epochs`` (the ledger's cap)
    beta2: float = 0.999  # Adam's second-moment decay (attacks.training.TrainConfig.betas)
    map_width: int = 0  # the width of a spatial map's decoder (attacks.image.is_map; 0: ``width``), vectors keep ``width``


# Measured on LeNet/MNIST (standard, 20 epochs, one run): Adam's beta2 at 0.95 instead of 0.999 takes conv1 from
# SSIM 0.958 to 0.998, pool2 from 0.899 to 0.933 and fc1 from 0.838 to 0.856: with a long memory the first epochs'
# large gradients keep the later steps small. An extension's one cycle over 12 epochs from a 20-epoch fit: fc1
# 0.854 -> 0.880 and fc2 0.761 -> 0.795 (a constant 2e-3: 0.868 and 0.779; a constant 6e-4: 0.876 and 0.788).
PROFILES = {
    "quick": Budget(32, 12, 2, 0, 0, 64, 3e-3, flat=0.01, cap=2.0, beta2=0.95),
    "standard": Budget(32, 20, 4, 1, 1, 64, 2e-3, full_res=True, flat=0.005, cap=3.0, beta2=0.95, map_width=64),
    "thorough": Budget(64, 60, 6, 3, 2, 32, 1e-3, full_res=True, flat=0.005, cap=2.0, beta2=0.95),
}


def _standardizer(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (spatial) or per-feature statistics; dead features get std 1 so they stay zero."""
    # 4-d: per channel; 3-d (a sequence of hidden states, N x L x d): per feature over every position; else per feature
    dims = (0, 2, 3) if z.dim() == 4 else (0, 1) if z.dim() == 3 else (0,)
    if z.dim() == 3 and bool((sent := z.ne(0).any(dim=-1)).any()):  # positions never sent (padding, zeros) do not count
        mean = z[sent].mean(dim=0).view(1, 1, -1)
        std = z[sent].std(dim=0).view(1, 1, -1)
    else:
        mean = z.mean(dim=dims, keepdim=True)
        std = z.std(dim=dims, keepdim=True)
    # Constant (dead) features: std at float rounding level relative to their own magnitude, or negligible
    # (under 1e-6) next to the typical feature's (the median std). MiniLM's last block and its pooled embedding
    # have one feature that is about 1e-7 everywhere (std 7e-9, where the median is 0.3): divided by its own
    # std, the slightest noise on it standardized to 1e6, and an attacker trained without the noise named
    # two tokens everywhere (0.0001 of the tokens at noise sigma=0.05). A feature with a small scale next to a
    # large one, but not negligible next to the typical one, is kept.
    floor = torch.maximum(1e-6 * mean.abs(), 1e-6 * std.flatten().median()) + 1e-12
    std = torch.where(std > floor, std, torch.ones_like(std))
    return mean[:1] if z.dim() >= 3 else mean, std[:1] if z.dim() >= 3 else std


def _nhwc(t):
    """Channels-last layout for the decoder and its 4-D inputs: its small convolutions (and their
    gradients) run 15-40% faster on a CPU that way (measured on LeNet's cuts, one thread)."""
    if isinstance(t, nn.Module):
        return t.to(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _loss_of(modality):
    def fn(model, batch):
        u, x = batch  # activations already folded by the network's fold()
        return modality.training_loss(model, u, x)

    return fn


@functools.lru_cache(maxsize=64)
def _counted_step(modality_name: str, act_shape: tuple[int, ...], input_shape: tuple[int, ...], width: int, full_res: bool,
                  kwargs: tuple) -> float:
    """FLOPs of one training step per sample (forward, backward) of the decoder for these shapes: counted on a
    two-sample step on the CPU (BatchNorm needs two), with weights drawn from a fixed generator."""
    from splitaudit.costs import flop_counter

    modality = get_modality(modality_name)
    net = _nhwc(build_module(lambda: modality.decoder(act_shape, input_shape, width=width, full_res=full_res, **dict(kwargs)),
                             torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(0)
    z = _nhwc(torch.randn((2, *act_shape), generator=gen))
    x = torch.rand((2, *input_shape), generator=gen)
    with flop_counter() as counter:
        modality.training_loss(net, net.fold(z), x).backward()
    return counter.get_total_flops() / 2


def _epoch_flops(modality, act_shape, x_aux, *, width, full_res, val_fraction, budget) -> float | None:
    if budget is not None:  # a modality with budgets of its own (text): its network needs its data; no ledger moves its epochs
        return None
    n_train = x_aux.shape[0] - max(1, int(round(x_aux.shape[0] * val_fraction)))
    try:
        per_sample = _counted_step(modality.name, tuple(act_shape), tuple(x_aux.shape[1:]), width, full_res, ())
    except Exception:  # noqa: BLE001 - an uncountable network leaves the ledger to count epochs
        return None
    return per_sample * n_train if per_sample > 0 else None


@register_attack("decoder")
class DecoderAttack(Attack):
    needs_fit = True
    warm_start = True  # refinements start from a fitted decoder's weights (warm_start_from, state, load_state)
    budgeted = True  # stops when flattened, says whether it was still improving, can be extended (extend_from)
    holds_out = True  # keeps a held-out part of the aux data (``holdout``) another attack can be compared on

    def __init__(self, *, profile: str = "standard", params: dict | None = None):
        self.config = build_config(DecoderConfig, params or {}, what="attack decoder")
        self.profile = profile
        self._apply(PROFILES[profile])
        self.net: nn.Module | None = None  # the modality's decoder network
        self._inference: nn.Module | None = None  # the fitted net prepared for inference (BatchNorm folded), for reconstruct
        self.modality = "image"
        self.net_kwargs: dict = {}  # what the modality's network was built with beyond the shapes (text: the vocabulary)
        self.mean = self.std = None
        self.holdout: torch.Tensor | None = None

    def _apply(self, b: Budget) -> None:
        """The profile's budget, where the attack's own params do not set a value."""
        self.full_res = b.full_res
        self.extensions = b.extensions if self.config.extensions < 0 else self.config.extensions
        self.batch_size = self.config.batch_size or b.batch
        self.lr = self.config.lr or b.lr
        # The widths a network is built with, (anything but a spatial map, a spatial map) (``width_for``); ``width`` is
        # the one the fitted network has (set by ``fit`` and ``load_state``).
        self._widths = (self.config.width or b.width, self.config.width or b.map_width or b.width)
        self.width = self._widths[0]
        self.epochs = self.config.epochs or b.epochs
        self.patience = b.patience
        self.min_steps = 0 if self.config.epochs else b.min_steps
        self.restarts = b.restarts if self.config.restarts < 0 else self.config.restarts
        self.schedule = b.schedule
        self.val_fraction = self.config.val_fraction or b.val_fraction
        self.refine_lr = b.refine_lr
        self.flat = b.flat if b.schedule == "constant" else 0.0  # a schedule's last step is its result: never cut short
        self.betas = (0.9, b.beta2)

    def allotment(self, modality) -> tuple[int, float] | None:
        """(nominal epochs, cap) for the audit's ledger at this profile; None where the ledger does not apply:
        a run that follows a learning-rate schedule (text) ends where its schedule does, and is not extended."""
        b = modality.budget(self.profile) or PROFILES[self.profile]
        if b.schedule != "constant":
            return None
        return b.epochs, b.cap

    def width_for(self, act_shape: tuple[int, ...]) -> int:
        """The decoder's width at an activation of this shape: the profile's ``map_width`` for a spatial map,
        its ``width`` for anything else (a vector, a sequence). A map decoder's convolutions at width 64 run at
        63-88% of this machine's fp32 peak against 26-37% at 32 and train no worse per second; a vector
        decoder's extra width buys nothing at equal time (docs/efficiency.md)."""
        from splitaudit.attacks.image import is_map

        return self._widths[is_map(tuple(act_shape))]

    def _normalize(self, z):
        return get_modality(self.modality).standardized(z, self.mean, self.std)

    def warm_start_from(self, other: DecoderAttack) -> None:
        """Begin from another decoder's weights (an adaptive attacker refining a clean decoder)."""
        self._init = other
        self._resume = False

    def extend_from(self, other: DecoderAttack) -> None:
        """Resume ``other``'s training on the same data for ``epochs`` more (a budget extension): its held-out
        part, its learning rate in one cycle over the new epochs, its state kept unless an epoch beats it."""
        self._init = other
        self._resume = True

    def epoch_flops(self, act_shape: tuple[int, ...], x_aux: torch.Tensor, modality) -> float | None:
        """Training FLOPs of one epoch on ``x_aux`` (forward and backward, as torch's flop counter counts one
        step, times the training samples); None where they cannot be counted."""
        return _epoch_flops(modality, tuple(act_shape), x_aux, width=self.width_for(act_shape), full_res=self.full_res, val_fraction=self.val_fraction,
                            budget=modality.budget(self.profile))

    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport:
        start = time.perf_counter()
        gen = ctx.generator
        modality = ctx.modality
        self.modality = modality.name
        init = getattr(self, "_init", None)
        resume = init is not None and getattr(self, "_resume", False)
        if (own := modality.budget(self.profile)) is not None:  # a modality with budgets of its own (text)
            self._apply(own)
        self.width = self.width_for(tuple(z_aux.shape[1:]))  # what the net is built with, and saved with
        n = z_aux.shape[0]
        perm = torch.randperm(n, generator=gen).to(z_aux.device)
        n_val = max(1, int(round(n * self.val_fraction)))
        val_idx, tr_idx = modality.holdout(perm, x_aux, n_val)
        held = None if init is None else init.holdout
        if held is not None and held.numel() and int(held.max()) < n:
            # A refinement holds out what its start held out: its other samples trained the start, so they
            # could not check it (or choose between it and the undefended attacker) without bias.
            val_idx = held.to(z_aux.device)
            keep = torch.ones(n, dtype=torch.bool, device=z_aux.device)
            keep[val_idx] = False
            tr_idx = perm[keep[perm]]
        self.holdout = val_idx  # the aux samples it was selected on; another attack can be compared on them
        if resume:  # the same standardization as the run it resumes: the same network on the same inputs
            self.mean, self.std = init.mean, init.std
        else:
            self.mean, self.std = _standardizer(z_aux[tr_idx])
        zt, zv = _nhwc(self._normalize(z_aux[tr_idx])), _nhwc(self._normalize(z_aux[val_idx]))
        xt, xv = x_aux[tr_idx], x_aux[val_idx]
        if self.min_steps:
            self.epochs = max(self.epochs, math.ceil(self.min_steps / math.ceil(xt.shape[0] / self.batch_size)))
        loss = _loss_of(modality)
        baseline = modality.prior_loss(xt, xv)
        plateau = None
        if self.flat > 0:
            _, prior_score = modality.selection(modality.clip(modality.prior(xt).expand_as(xv)), xv)

            def held_out(net) -> float:  # the audit's own metric (SSIM for images) on the held-out aux data
                return float(modality.selection(modality.clip(net.decode(uv)), xv)[1].mean())

            plateau = Plateau(share=self.flat, prior=float(prior_score.mean()), score=held_out)
        # A refinement keeps its start's network as it was built (the text inverter's vocabulary is its
        # training split's: another split would give another classifier, which the weights do not fit).
        self.net_kwargs = init.net_kwargs if init is not None and init.net is not None else modality.decoder_kwargs(xt)

        best: tuple[float, dict] | None = None
        notes: list[str] = []
        runs = 0
        tried_beyond_prior = 0  # finished runs that did not beat the no-information guess
        best_beats = False
        best_stop = "budget"
        epochs_total = 0
        lr = self.refine_lr if init is not None and not resume and self.refine_lr else self.lr  # a refinement starts near its optimum
        for attempt in range(self.restarts + 1):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            net = _nhwc(build_module(
                lambda: modality.decoder(tuple(z_aux.shape[1:]), tuple(x_aux.shape[1:]), width=self.width, full_res=self.full_res,
                                         **self.net_kwargs),
                torch.Generator().manual_seed(seed), device=z_aux.device,
            ))
            if attempt == 0:
                with torch.no_grad():  # the same fold in every run: it has no parameters
                    ut, uv = net.fold(zt), net.fold(zv)
            rate = 1.0
            if init is not None and attempt == 0 and init.net is not None:
                net.load_state_dict(init.net.state_dict())  # the same network: a mismatch is a bug, never a silent fresh start
            else:  # a fresh network: whatever start the modality makes from the aux data, and the rate that start calls for
                rate, why = modality.initialize(net, ut, xt, uv, xv)
                if why:
                    notes.append(f"run {attempt + 1}: {why}")

            def progress(offset: int):  # epochs counted across the runs and extensions of this fit
                def on_epoch(ep, tr, va):
                    if ctx.on_epoch:
                        ctx.on_epoch(offset + ep, offset + self.epochs, va)
                return on_epoch

            if resume:  # a budget extension: one cycle over its epochs, from where the run it resumes ended
                res = self._cycle(net, loss, (ut, xt), (uv, xv), lr, gen, progress(epochs_total))
                epochs_total += res.epochs_run
                stop = res.stop  # it runs its grant: "budget"
            else:
                cfg = TrainConfig(epochs=self.epochs, lr=lr * rate, batch_size=self.batch_size, patience=self.patience, schedule=self.schedule,
                                  keep_best=self.schedule == "constant", betas=self.betas)  # a schedule's last step is its result
                res = train(net, loss, (ut, xt), config=cfg, generator=gen, val_data=(uv, xv), plateau=plateau,
                            on_epoch=progress(epochs_total))
                epochs_total += res.epochs_run
                stop = "schedule" if self.schedule != "constant" and not res.diverged else res.stop
                # On its own (no ledger to ask), a run still improving at the end of its budget resumes itself, again
                # while each cycle still ends on its best epoch.
                for _ in range(self.extensions):
                    if stop != "budget":
                        break
                    notes.append(f"run {attempt + 1}: still improving after {epochs_total} epochs, resumed for {self.epochs} more")
                    res = self._cycle(net, loss, (ut, xt), (uv, xv), lr * rate, gen, progress(epochs_total))
                    epochs_total += res.epochs_run
                    stop = "budget" if res.best_epoch == res.epochs_run else "flattened"
            runs += 1
            val = evaluate(net, loss, (uv, xv))
            if res.diverged:
                notes.append(f"run {attempt + 1}: loss diverged at lr={lr:g}, restarting with lr={lr / 3:g}")
                lr /= 3
            beats_baseline = math.isfinite(val) and val < 0.9 * baseline
            tried_beyond_prior += int(not res.diverged and not beats_baseline)
            if math.isfinite(val) and (best is None or val < best[0]):
                best = (val, {k: v.clone() for k, v in net.state_dict().items()})
                self.net = net
                best_beats = beats_baseline and not res.diverged
                best_stop = stop
            if not res.diverged and beats_baseline:
                break
            if not res.diverged and attempt < self.restarts:
                notes.append(
                    f"run {attempt + 1}: validation loss {val:.4f} does not beat the no-information guess "
                    f"({baseline:.4f}); restarting from a new initialization"
                )
            elif not res.diverged:
                notes.append(f"validation loss {val:.4f} does not beat the no-information guess ({baseline:.4f})")
        if best is None:
            raise RuntimeError("decoder training diverged in every run")
        if best_stop == "budget" and not resume:
            notes.append(f"still improving when its budget of {epochs_total} epochs ended")
        # Converged: the kept run beats the no-information guess; or no run does and a restart from a new
        # initialization failed too (then the activation holds nothing this decoder can use, which is a
        # finding). A single run that never beat the guess says nothing yet: it may be a bad start.
        if best_beats:
            converged, prior = True, "beaten"
        elif tried_beyond_prior >= 2:
            converged, prior = True, "not beaten after a restart"
            notes.append(f"{tried_beyond_prior} runs from different initializations all failed to beat the no-information guess")
        else:
            converged, prior = False, "not beaten, no restart"
        self.prior_outcome = prior
        self.net.load_state_dict(best[1])
        self.net.eval()
        self._inference = None
        return FitReport(
            converged=converged,
            restarts=runs - 1,
            epochs=epochs_total,
            seconds=time.perf_counter() - start,
            val_loss=best[0],
            baseline_loss=baseline,
            notes=notes,
            stop=best_stop,
        )

    def _cycle(self, net, loss, train_data, val_data, lr: float, gen, on_epoch):
        """``self.epochs`` more for a fitted ``net``: a fresh optimizer, one cycle of the learning rate (a warm-up
        to ``lr``, then a cosine decay), the start kept unless an epoch beats it on held-out data. A cycle is
        not cut short: its last epochs, at the lowest rates, are where it gains most."""
        cfg = TrainConfig(epochs=self.epochs, lr=lr, batch_size=self.batch_size, patience=None, schedule="onecycle", keep_best=True,
                          keep_start=True, betas=self.betas)
        return train(net, loss, train_data, config=cfg, generator=gen, val_data=val_data, on_epoch=on_epoch)

    @torch.no_grad()
    def reconstruct(self, z: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("fit() must be called before reconstruct()")
        self.net.eval()
        if self._inference is None:  # made once per fitted (or loaded) net
            self._inference = _nhwc(self.net.for_inference())
        net = self._inference
        outs = [net(_nhwc(self._normalize(z[i : i + batch_size]))) for i in range(0, z.shape[0], batch_size)]
        return torch.cat(outs)

    def state(self) -> dict:
        """Everything needed to rebuild the fitted attack (for the cache)."""
        return {"net": self.net.state_dict(), "mean": self.mean, "std": self.std, "width": self.width, "full_res": self.full_res,
                "modality": self.modality, "net_kwargs": self.net_kwargs, "holdout": self.holdout}

    def load_state(self, state: dict, act_shape, input_shape, device: torch.device | str = "cpu") -> None:
        self.width = state["width"]
        self.modality = state.get("modality", "image")
        self.net_kwargs = state.get("net_kwargs", {})
        self.net = _nhwc(build_module(  # the weights are overwritten
            lambda: get_modality(self.modality).decoder(tuple(act_shape), tuple(input_shape), width=self.width,
                                                        full_res=state.get("full_res", False), **self.net_kwargs),
            torch.Generator().manual_seed(0),
        ))
        self.net.load_state_dict(state["net"])
        self._inference = None
        self.net.to(device).eval()
        self.mean, self.std = state["mean"].to(device), state["std"].to(device)
        self.holdout = state.get("holdout")
