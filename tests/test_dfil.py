"""dFIL (splitaudit.dfil): Hutchinson's estimate of tr(JᵀJ) against closed forms, the noise's Fisher information,
and the fields every row carries (None where the reference does not apply)."""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from splitaudit.cache import Cache
from splitaudit.config import AuditConfig
from splitaudit.cuts import head_forward
from splitaudit.defenses.base import make_defense
from splitaudit.dfil import crb_mse, jacobian_trace
from splitaudit.report.html import render_report
from splitaudit.results import AuditResult
from splitaudit.rows import RowBuilder
from splitaudit.runner import run_audit
from tests.conftest import write_tiny_npz
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
    x = torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2))
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


def test_text_inputs_get_no_reference():
    """Token ids have no Jacobian: the reference is None, and the head is never run."""

    def never(*_a, **_k):
        raise AssertionError("the head was run on token ids")

    z = torch.randn(50, 8)
    fitted = make_defense("noise:sigma=1").fit(z)
    s = SimpleNamespace(x_eval=torch.zeros(4, 2, 16, dtype=torch.long), config=SimpleNamespace(seed=0))
    rows = RowBuilder(s, None, None, None, SimpleNamespace(get=never), None, grids=False)
    assert rows._noise_reference("block.0", fitted.defense, fitted) == {"dfil": None, "dfil_se": None, "crb_mse": None}
    assert rows.dfil_info is None


def test_an_identical_audit_reads_the_trace_from_the_cache(tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    s = SimpleNamespace(x_eval=x, config=SimpleNamespace(seed=0))
    fitted = make_defense("noise:sigma=1").fit(torch.randn(50, 4, 12, 12))
    prepared = SimpleNamespace(get=lambda d, cut: (net, "m", {}))
    first, second = (RowBuilder(s, None, None, None, prepared, lambda _: contextlib.nullcontext(), grids=False,
                                cache=Cache(tmp_path)) for _ in range(2))
    a = first._noise_reference("block", fitted.defense, fitted)
    assert second._noise_reference("block", fitted.defense, fitted) == a and a["dfil"] > 0
    assert second.cache.stats()["by_kind"]["dfil"] == {"hits": 1, "misses": 0}
    s.x_eval = x.flip(0)  # other inputs (another split, say): another key
    third = RowBuilder(s, None, None, None, prepared, lambda _: contextlib.nullcontext(), grids=False, cache=Cache(tmp_path))
    third._noise_reference("block", fitted.defense, fitted)
    assert third.cache.stats()["by_kind"]["dfil"] == {"hits": 0, "misses": 1}


DEFENSES = ("none", "dropout:p=0.5", "noise:sigma=0.5", "noise:sigma=2")


def test_rows_carry_the_reference_only_under_noise(tmp_path):
    npz = write_tiny_npz(tmp_path / "d.npz", n=240)
    res = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",), defenses=DEFENSES, profile="quick",
                                device="cpu", seed=0, use_cache=False))
    rows = {(r.defense, r.adaptive): r for r in res.results}
    low, high = (next(r for (d, a), r in rows.items() if d.startswith(f"noise:sigma={s},")) for s in ("0.5", "2"))
    for r in res.results:
        assert r.status == "ok", (r.defense, r.error)
        assert r.mse is not None and r.baseline_mse is not None and r.mse_ci[0] <= r.mse <= r.mse_ci[1]
        assert r.mse >= 10 ** (-r.psnr / 10) * (1 - 1e-4)  # mean MSE ≥ the MSE of the mean PSNR (Jensen)
        if r.defense.startswith("noise"):
            assert r.dfil > 0 and r.dfil_se > 0 and r.crb_mse == pytest.approx(1 / r.dfil, rel=1e-4)
        else:  # none and dropout: no reference
            assert r.dfil is None and r.dfil_se is None and r.crb_mse is None, r.defense
    # One trace per cut, the same probes for every noise level: dFIL·σ² is the same, and 4× the σ is 16× less dFIL.
    assert low.dfil / high.dfil == pytest.approx(16, rel=1e-4)
    assert low.dfil * low.defense_info["noise_std"] ** 2 == pytest.approx(high.dfil * high.defense_info["noise_std"] ** 2, rel=1e-4)
    assert res.config["dfil"]["samples"] == 64 and res.config["dfil"]["probes"] >= 1
    assert "dfil" in res.config["timings"]
    # A cross-check, not a verdict: the assessments are those of the same rows without it.
    bare = replace(res, results=tuple(replace(r, dfil=None, dfil_se=None, crb_mse=None) for r in res.results))
    assert [(a.cut, a.defense, a.status) for a in res.assessments()] == [(a.cut, a.defense, a.status) for a in bare.assessments()]
    back = AuditResult.from_json(res.to_json())
    assert [(r.dfil, r.crb_mse, r.mse, r.mse_ci) for r in back.results] == [(r.dfil, r.crb_mse, r.mse, r.mse_ci) for r in res.results]
    page = render_report(res)
    assert 'id="dfil"' in page and "unbiased" in page and "does not bound attackers that use a prior" in page
    assert 'id="dfil"' not in render_report(bare)  # no noise reference, no section
