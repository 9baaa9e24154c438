"""dFIL: an attack-independent reference for additive-noise defenses (Maeng et al., NeurIPS'23, arXiv 2305.04146).

The device sends ``z' = f(x) + n``, with ``f`` the head (input to activation at the cut) and ``n`` noise of
independent coordinates whose Fisher information about their location is ``F`` each (``1/σ²`` for a
Gaussian of std ``σ``). The Fisher information that ``z'`` carries about ``x`` is then ``I(x) = F · JᵀJ``,
``J = ∂f/∂x``, and dFIL is its mean diagonal, ``dFIL(x) = tr(I(x)) / d`` over the ``d`` input dimensions.
By the Cramér–Rao bound (and ``tr(I⁻¹)/d ≥ d/tr(I)``), an *unbiased* estimator of ``x`` from ``z'`` has a
mean squared error per dimension of at least ``1/dFIL(x)``; averaged over inputs, at least
``1/mean(dFIL)`` (Jensen: ``1/t`` is convex).

What it does not bound: a biased estimator, and every attacker that uses a prior over inputs is one
(the learned decoders, rMLE's image prior, the mean image itself). Such an attacker can and does beat
``1/dFIL``, most of all where the bound exceeds the prior's own error. It is a cross-check on the
attacks, computed without them, and never a verdict.

``tr(JᵀJ)`` is estimated with Hutchinson's estimator over random Rademacher probes: ``E‖Jᵀu‖²`` with
vector-Jacobian products (reverse mode, the default) or ``E‖Jv‖²`` with Jacobian-vector products
(forward mode); both are unbiased for the same trace. The trace does not depend on the noise, so one
estimate per cut serves every noise level there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

N_SAMPLES = 64  # evaluation inputs the trace is averaged over
N_PROBES = 4  # Rademacher probes per input


@dataclass(frozen=True)
class JacobianTrace:
    """``tr(JᵀJ)`` of a head, estimated per input: the mean over inputs and its standard error."""

    per_sample: torch.Tensor  # (N,) the estimate at each input (probes averaged)
    input_dim: int  # d: the number of input dimensions (C·H·W)
    probes: int
    method: str  # "jvp" (forward mode) | "vjp" (reverse mode)

    @property
    def mean(self) -> float:
        return float(self.per_sample.double().mean())

    @property
    def se(self) -> float:
        """Standard error of :attr:`mean` over the inputs (the probes' variance is inside each input's spread)."""
        n = self.per_sample.numel()
        return float(self.per_sample.double().std() / math.sqrt(n)) if n > 1 else math.nan

    def dfil(self, fisher: float) -> tuple[float, float]:
        """(dFIL, its standard error) for noise of Fisher information ``fisher`` per activation coordinate."""
        return fisher * self.mean / self.input_dim, fisher * self.se / self.input_dim


def _rademacher(shape, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    gen_device = generator.device if generator is not None else like.device
    v = torch.randint(0, 2, shape, generator=generator, device=gen_device).to(like.device, like.dtype)
    return 2 * v - 1


def jacobian_trace(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, probes: int = N_PROBES,
                   generator: torch.Generator | None, method: str = "vjp") -> JacobianTrace:
    """Hutchinson's estimate of ``tr(J(x)ᵀJ(x))`` for each input of the batch ``x``, ``J`` the Jacobian of
    ``f`` (batched, samples independent: a model in eval mode) at that input. Probes come from ``generator``.

    ``method="vjp"`` (the default): ``E‖Jᵀu‖²`` over Rademacher probes ``u`` of the output, one forward pass
    and a backward pass per probe. ``method="jvp"``: ``E‖Jv‖²`` over probes ``v`` of the input, one
    forward-mode pass (``torch.autograd.forward_ad``) per probe. Both are unbiased for the same trace
    (``tr(JᵀJ) = tr(JJᵀ)``). Reverse mode is the default because forward mode, on its first use in a process,
    makes torch 2.13 script its JVP decompositions (``torch._decomp.decompositions_for_jvp``, with
    ``torch.jit.script`` deprecation warnings) and, through ``nn.Linear``, import ``torch._dynamo``: 3 to 4 s
    here, more than the whole estimate for the demo's twelve cuts.
    """
    if probes < 1:
        raise ValueError(f"probes must be at least 1, got {probes}")
    if method not in ("vjp", "jvp"):
        raise ValueError(f"method must be vjp or jvp, got {method!r}")
    x = x.detach()
    d = int(x[0].numel())
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    if method == "jvp":
        with torch.no_grad():
            for _ in range(probes):
                v = _rademacher(x.shape, generator, x)
                with fwAD.dual_level():
                    out = f(fwAD.make_dual(x, v))
                    jv = fwAD.unpack_dual(out).tangent
                if jv is not None:  # None: the output does not depend on the input
                    total += jv.flatten(1).double().square().sum(dim=1)
    else:
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            out = f(xg)
            for k in range(probes):
                u = _rademacher(out.shape, generator, out)
                (g,) = torch.autograd.grad(out, xg, u, retain_graph=k < probes - 1, allow_unused=True)
                if g is not None:
                    total += g.flatten(1).double().square().sum(dim=1)
    return JacobianTrace(per_sample=(total / probes).cpu(), input_dim=d, probes=probes, method=method)


def crb_mse(dfil: float | None) -> float | None:
    """The Cramér–Rao bound on an unbiased attacker's MSE per input dimension: ``1/dFIL`` (None without one)."""
    if dfil is None or not math.isfinite(dfil) or dfil <= 0:
        return None
    return 1.0 / dfil
