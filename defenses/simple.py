"""Defenses that transform the activation on the device: none, noise, dropout, quantization.

- Noise: additive Gaussian or Laplace noise, the defense He et al. 2019 evaluate (sec. 6) and the
  basis of "noise injection" defenses (Titcombe et al. 2021). sigma is relative to the activation's
  standard deviation on aux data, so ``sigma=1`` means the same thing at every cut.
- Dropout: random zeroing at inference (He et al. 2019 sec. 6, "dropout defense").
- Quantization: B-bit uniform quantization of the activation before sending, a deployment transform
  that also cuts bytes on the wire.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitaudit.specs import param
from splitaudit.defenses.base import Defense, noise_like, register_defense


@dataclass(frozen=True)
class NoneConfig:
    pass


@register_defense("none")
class NoDefense(Defense):
    Config = NoneConfig


@dataclass(frozen=True)
class NoiseConfig:
    sigma: float = param(1.0, lo=0.0, hi=1e6, help="noise std relative to the activation's std on aux data")
    kind: str = param("gaussian", choices=("gaussian", "laplace"))


@register_defense("noise")
class NoiseDefense(Defense):
    Config = NoiseConfig
    transforms_activation = True
    stochastic = True

    def fit_state(self, z_aux):
        return {"scale": float(z_aux.float().std()) * self.config.sigma}

    def transform(self, z, state, *, generator):
        return noise_like(z, generator, self.config.kind).mul_(state["scale"]).add_(z)  # the fresh noise tensor holds the sum

    def describe(self, state):
        return {"noise_std": state.get("scale")}

    def noise_fisher(self, state):
        """1/σ² for Gaussian noise of std σ; for Laplace noise of the same std (scale b = σ/√2), 1/b² = 2/σ²."""
        scale = state.get("scale")
        if not scale or scale <= 0:  # sigma=0 adds no noise: no finite reference
            return None
        return (2.0 if self.config.kind == "laplace" else 1.0) / scale**2


@dataclass(frozen=True)
class DropoutConfig:
    p: float = param(0.5, lo=0.0, hi=1.0, hi_open=True, help="probability of zeroing each element")


@register_defense("dropout")
class DropoutDefense(Defense):
    """Zero each element with probability p; scale the rest by 1/(1-p) like nn.Dropout."""

    Config = DropoutConfig
    transforms_activation = True
    stochastic = True

    def transform(self, z, state, *, generator):
        gen_device = generator.device if generator is not None else z.device
        keep = torch.rand(z.shape, generator=generator, device=gen_device) >= self.config.p
        return z * keep.to(z.device, z.dtype) / (1 - self.config.p)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = param(8, lo=1, hi=16)


@register_defense("quant")
class QuantDefense(Defense):
    """Uniform B-bit quantization over the activation's aux range [lo, hi] (values outside clip)."""

    Config = QuantConfig
    transforms_activation = True

    def fit_state(self, z_aux):
        return {"lo": float(z_aux.min()), "hi": float(z_aux.max())}

    def transform(self, z, state, *, generator):
        lo, hi = state["lo"], state["hi"]
        levels = 2**self.config.bits - 1
        span = max(hi - lo, 1e-12)
        q = torch.round((z.clamp(lo, hi) - lo) / span * levels)
        return q / levels * span + lo

    def wire_bytes(self, shape):
        n = 1
        for s in shape:
            n *= s
        return (n * self.config.bits + 7) // 8 + 8  # packed codes + the (lo, hi) pair as float32

    def describe(self, state):
        return {"range": [state.get("lo"), state.get("hi")]}
