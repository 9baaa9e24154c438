"""dFIL (splitaudit.dfil): Hutchinson's estimate of tr(JᵀJ) against closed forms, and the noise's Fisher information."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from splitaudit.cuts import head_forward
from splitaudit.defenses.base import make_defense
from splitaudit.dfil import crb_mse, jacobian_trace
from tests.tiny import TinyNet

Z = 4.0  # tolerance in standard deviations of the estimate: a fixed seed, and a 4-sigma miss would be a real bug


def _probe_variance(m: torch.Tensor) -> float:
    """Var(uᵀMu) for a Rademacher u and a symmetric M: 2 (‖M‖_F² − Σ M_ii²)."""
    m = m.double()
    return float(2 * (m.square().sum() - m.diagonal().square().sum()))


def _linear(m: int = 24, shape=(3, 4, 4), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    a, b = torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    return a, (lambda x: x.flatten(1) @ a.T + b), torch.rand((64, *shape), generator=g)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # forward mode's first use (dfil.py)
@pytest.mark.parametrize("method", ["vjp", "jvp"])
@pytest.mark.parametrize("probes", [1, 16])
def test_the_estimate_for_a_linear_head_converges_to_the_frobenius_norm(method, probes):
    """z = Ax + b: JᵀJ = AᵀA at every input, so tr(JᵀJ) = ‖A‖_F² exactly, and each of the 64 inputs × ``probes``
    probes is an independent unbiased draw whose variance is known in closed form."""
    a, f, x = _linear()
    exact = float(a.double().square().sum())
    m = a @ a.T if method == "vjp" else a.T @ a  # vjp probes the output (‖Aᵀu‖²), jvp the input (‖Av‖²)
    sd = math.sqrt(_probe_variance(m) / (x.shape[0] * probes))
    t = jacobian_trace(f, x, probes=probes, generator=torch.Generator().manual_seed(1), method=method)
    assert t.method == method and t.probes == probes and t.input_dim == 48
    assert abs(t.mean - exact) <= Z * sd, (t.mean, exact, sd)
    assert 0.5 < t.se / sd < 1.5  # the reported standard error is the estimate's own spread
    # dFIL = ‖A‖_F² / (σ² d), within the same relative tolerance.
    sigma = 0.7
    dfil, se = t.dfil(1 / sigma**2)
    assert dfil == pytest.approx(exact / (sigma**2 * 48), rel=Z * sd / exact)
    assert se == pytest.approx(t.se / (sigma**2 * 48))
    assert crb_mse(dfil) == pytest.approx(1 / dfil)


def test_the_error_shrinks_as_one_over_the_root_of_the_probes():
    a, f, x = _linear(seed=3)
    exact = float(a.double().square().sum())
    t1, t64 = (jacobian_trace(f, x, probes=k, generator=torch.Generator().manual_seed(k)) for k in (1, 64))
    assert 8 * 0.6 < t1.se / t64.se < 8 * 1.6  # sqrt(64) = 8
    assert abs(t64.mean - exact) <= Z * math.sqrt(_probe_variance(a @ a.T) / (x.shape[0] * 64))
    assert abs(t64.mean - exact) / exact < 0.02


def test_a_nonlinear_head_matches_its_exact_jacobian_per_input():
    """A conv, BatchNorm and ReLU head: the estimate at each input against tr(JᵀJ) of the full Jacobian there."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    f = functools.partial(head_forward, net, "block")
    probes = 64
    t = jacobian_trace(f, x, probes=probes, generator=torch.Generator().manual_seed(3))
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: f(v.unsqueeze(0)).flatten(), x[i]).flatten(1)  # (out, d)
        exact = float(jac.double().square().sum())
        sd = math.sqrt(_probe_variance(jac @ jac.T) / probes)
        assert abs(float(t.per_sample[i]) - exact) <= Z * sd, (i, float(t.per_sample[i]), exact, sd)


def test_the_estimate_is_seeded():
    _, f, x = _linear()
    one = jacobian_trace(f, x, generator=torch.Generator().manual_seed(5)).per_sample
    assert torch.equal(one, jacobian_trace(f, x, generator=torch.Generator().manual_seed(5)).per_sample)
    assert not torch.equal(one, jacobian_trace(f, x, generator=torch.Generator().manual_seed(6)).per_sample)


def test_the_noise_fisher_information_is_one_over_the_absolute_variance():
    z = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) * 3.0
    std = float(z.std())
    fisher = {}
    for spec in ("noise:sigma=0.5", "noise:sigma=2", "noise:sigma=2,kind=laplace"):
        d = make_defense(spec)
        fitted = d.fit(z)
        fisher[spec] = d.noise_fisher(fitted.state)
    # sigma is relative to the activation's std; the Fisher information uses the std actually added.
    assert fisher["noise:sigma=0.5"] == pytest.approx(1 / (0.5 * std) ** 2)
    assert fisher["noise:sigma=0.5"] / fisher["noise:sigma=2"] == pytest.approx(16)  # a bigger σ lowers dFIL by σ²
    assert fisher["noise:sigma=2,kind=laplace"] == pytest.approx(2 * fisher["noise:sigma=2"])  # 1/b² = 2/σ²
    for spec in ("none", "dropout:p=0.5", "quant:bits=4", "noise:sigma=0"):
        d = make_defense(spec)
        assert d.noise_fisher(d.fit(z).state) is None, spec
    assert crb_mse(None) is None and crb_mse(0.0) is None
