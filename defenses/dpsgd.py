"""DP-SGD fine-tuning of the whole model through Opacus (Abadi et al. 2016, "Deep Learning with
Differential Privacy"; Yousefpour et al. 2021, "Opacus: User-Friendly Differential Privacy Library in
PyTorch").

Why it is here although it is not an activation defense: people reach for it when asked to make a
split "private". It bounds what the *weights* reveal about the *training* data. It says nothing about
what an activation reveals about an *inference* input. The audit therefore attacks the fine-tuned model
with the same decoder and reports epsilon next to the SSIM, so the gap is visible in numbers.

Layers Opacus cannot compute per-sample gradients for (BatchNorm mixes samples) are swapped by
``ModuleValidator.fix`` (BatchNorm -> GroupNorm) under the same module name, so cut names still
resolve; the swap is listed in the report because it changes the model being deployed.

The epsilon reported covers the fine-tuning only. Starting from weights trained without DP on the same
data (the builtin victims), the model as a whole has no (epsilon, delta) guarantee; the info says so.

Randomness: Poisson sampling draws from a CPU generator and the gradient noise from a generator on the
model's device, both seeded from ``ctx.generator``. ``secure_mode`` is off: these are audit numbers,
reproducible per seed, not a production DP release.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.attacks.training import TrainConfig, train
from splitaudit.cuts import predict
from splitaudit.errors import ModelError, UserError
from splitaudit.specs import param
from splitaudit.defenses.base import Defense, ModelChange, PrepareContext, register_defense

# RDP orders for the noise-multiplier search: few fractional ones, since those dominate its cost.
SEARCH_ALPHAS = (1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0, 128.0, 256.0)
EPSILON_SCOPE = (
    "the DP-SGD fine-tuning steps only: the weights it started from keep whatever privacy their own training had "
    "(none for a builtin victim, trained without DP on the same victim split)"
)
NOTE = "DP-SGD bounds what the weights reveal about the training data, not what an activation reveals about an inference input."


@dataclass(frozen=True)
class DPSGDConfig:
    epsilon: float = param(8.0, lo=0.0, lo_open=True, hi=1e6, help="target privacy budget epsilon")
    delta: float = param(1e-5, lo=0.0, hi=1.0, lo_open=True, hi_open=True, help="target delta; keep it below 1/n_train")
    epochs: int = param(2, lo=1, hi=1000)
    max_grad_norm: float = param(1.0, lo=0.0, lo_open=True, hi=1e6, help="per-sample gradient clipping bound")
    lr: float = param(0.05, lo=0.0, lo_open=True, hi=10.0, help="SGD learning rate (momentum 0.9)")
    batch_size: int = param(256, lo=1, hi=65536, help="expected Poisson batch size (at most n_train/8: 8 steps an epoch)")
    accountant: str = param("rdp", choices=("rdp", "prv"), help="privacy accountant (rdp: fast upper bound; prv: tighter, slower)")


def _classify_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def fix_model(model: nn.Module) -> tuple[nn.Module, list[dict[str, str]]]:
    """``ModuleValidator.fix`` on a copy, plus the list of changed modules (name, old -> new).

    Opacus fixes only modules with trainable parameters. A BatchNorm without affine parameters (or a
    frozen one) would still mix the samples of a batch, and a norm layer's running statistics would be
    learnt from private data without noise, so the same fixers run on those modules too. Fixers replace
    a module under its own name, so cut names still resolve.
    """
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = ModuleValidator.fix(model)
        for name, mod in list(fixed.named_modules()):
            if name and type(mod) in ModuleValidator.FIXERS and not any(p.requires_grad for p in mod.parameters()):
                new = ModuleValidator.FIXERS[type(mod)](mod)
                if new is not mod:
                    ref = next(iter([*mod.parameters(), *mod.buffers()]), None)
                    parent, _, leaf = name.rpartition(".")
                    setattr(fixed.get_submodule(parent), leaf, new if ref is None else new.to(ref.device))
    changed: list[dict[str, str]] = []
    for name, old in model.named_modules():
        if not name or any(name.startswith(c["name"] + ".") for c in changed):
            continue
        try:
            new = fixed.get_submodule(name)
        except AttributeError:
            continue
        if type(new) is not type(old):
            changed.append({"name": name, "from": type(old).__name__, "to": type(new).__name__})
        elif new.extra_repr() != old.extra_repr():  # same type, new settings (InstanceNorm's running stats off)
            was, now = (f"{type(m).__name__}({m.extra_repr()})" for m in (old, new))
            changed.append({"name": name, "from": was, "to": now})
    return fixed, changed


def eval_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> float | None:
    """Top-1 accuracy on ``(x, y)``, reported before and after fine-tuning; None without labels."""
    if y is None:
        return None
    try:
        return round(float((predict(model, x) == y).float().mean()), 5)
    except ModelError:  # not a (batch, classes) output; the runner notes that once for the whole audit
        return None


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def cpu_generator(generator: torch.Generator) -> torch.Generator:
    """A CPU generator seeded from ``generator`` (which may live on the GPU): data samplers need one."""
    return torch.Generator().manual_seed(_seed_from(generator))


@register_defense("dpsgd")
class DPSGDDefense(Defense):
    Config = DPSGDConfig
    changes_model = True

    def prepare_model(
        self, model: nn.Module, *, cut: str | None, ctx: PrepareContext, state: dict[str, torch.Tensor] | None = None
    ) -> ModelChange:
        cfg = self.config
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        if ref is None:
            raise ModelError("defense dpsgd: the model has no parameters to fine-tune")
        device = ref.device
        fixed, changed = fix_model(copy.deepcopy(model))
        fixed = fixed.to(device)
        if state is not None:
            fixed.load_state_dict(state)
            return ModelChange(fixed.eval(), {"changed_layers": changed, "delta": cfg.delta, "note": NOTE})
        if ctx.y_train is None:
            raise UserError(
                "defense dpsgd fine-tunes the model on the victim's labelled training split, but the data has no labels (y)"
            )

        from opacus import PrivacyEngine
        from opacus.accountants.utils import get_noise_multiplier
        from opacus.data_loader import DPDataLoader

        accuracy_before = eval_accuracy(model, ctx.x_eval, ctx.y_eval)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Secure RNG turned off": intended, see the module docstring
            engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=False)
        sample_gen = cpu_generator(ctx.generator)  # samplers draw on the CPU whatever the device
        noise_gen = torch.Generator(device=device).manual_seed(_seed_from(ctx.generator))
        wrapped: list[Any] = []  # (GradSampleModule, DPOptimizer), to unhook and report afterwards

        def wrap(module, optimizer, loader):
            # Poisson sampling with our own generator: Opacus would otherwise draw from the global RNG.
            dp_loader = DPDataLoader.from_data_loader(loader, generator=sample_gen)
            try:
                # What make_private_with_epsilon does, with a coarser RDP order grid for the noise search
                # (its default grid costs seconds); the epsilon reported is the accountant's, on its full grid.
                sigma = get_noise_multiplier(
                    target_epsilon=cfg.epsilon, target_delta=cfg.delta, sample_rate=1 / len(dp_loader), epochs=cfg.epochs,
                    accountant=cfg.accountant, **({"alphas": SEARCH_ALPHAS} if cfg.accountant == "rdp" else {}),
                )
                gsm, dp_opt, dp_loader = engine.make_private(
                    module=module, optimizer=optimizer, data_loader=dp_loader, noise_multiplier=sigma,
                    max_grad_norm=cfg.max_grad_norm, noise_generator=noise_gen, poisson_sampling=False,
                )
            except (NotImplementedError, ValueError) as exc:  # unsupported layers, unreachable budget
                msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise ModelError(f"defense dpsgd: Opacus cannot make this model private: {msg}") from exc
            wrapped.append((gsm, dp_opt))
            return gsm, dp_opt, dp_loader

        n = int(ctx.x_train.shape[0])
        batch = max(1, min(cfg.batch_size, n // 8))
        # keep_best=False: the last iterate, since choosing an epoch by its loss on private data is not accounted.
        train_cfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=batch, patience=None, optimizer="sgd", keep_best=False)
        on_epoch = (lambda ep, tr, va: ctx.on_epoch(ep, cfg.epochs, tr)) if ctx.on_epoch is not None else None
        fixed.train()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Opacus's notices on RDP orders and backward hooks
                result = train(fixed, _classify_loss, (ctx.x_train, ctx.y_train), config=train_cfg, generator=sample_gen,
                               wrap=wrap, on_epoch=on_epoch)
        finally:
            for gsm, _ in wrapped:
                gsm._close()  # remove the per-sample-gradient hooks from the modules we return
        if result.diverged or not all(torch.isfinite(p).all() for p in fixed.parameters()):
            raise ModelError(f"defense dpsgd: fine-tuning diverged (non-finite loss); try a smaller lr than {cfg.lr:g}")
        fixed.eval()
        spent = float(engine.get_epsilon(cfg.delta))
        info = {
            "epsilon": round(spent, 4), "target_epsilon": cfg.epsilon, "delta": cfg.delta, "epsilon_scope": EPSILON_SCOPE,
            "accountant": cfg.accountant, "epochs": result.epochs_run,
            "noise_multiplier": round(float(wrapped[0][1].noise_multiplier), 4),
            "max_grad_norm": cfg.max_grad_norm, "accuracy_before": accuracy_before,
            "accuracy_after": eval_accuracy(fixed, ctx.x_eval, ctx.y_eval), "changed_layers": changed,
            "train_seconds": round(result.seconds, 2), "n_train": n, "batch_size": train_cfg.batch_size, "note": NOTE,
        }
        return ModelChange(fixed, info)
