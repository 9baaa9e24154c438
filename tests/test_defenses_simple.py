"""The activation defenses on the CPU: dropout, quantization and Gaussian/Laplace noise.

Each is made from its spec, fitted on aux activations and applied with an explicit generator, as the
runner does; then one tiny audit runs them end to end. (tests/test_cuda.py covers them only on a GPU.)
"""

from __future__ import annotations

import math

import pytest
import torch

from splitaudit.defenses import make_defense
from splitaudit.runner import AuditConfig, run_audit
from tests.conftest import write_tiny_npz


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(n: int = 200_000, seed: int = 0) -> torch.Tensor:
    """Positive, skewed values with a nonzero mean, like a post-ReLU activation."""
    return torch.rand(n, generator=gen(seed)).pow(2) * 3 + 0.5


# --- specs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, canonical", [
    ("noise:sigma=1,kind=laplace", "noise:sigma=1,kind=laplace"),
    ("noise:kind=laplace,sigma=1", "noise:sigma=1,kind=laplace"),
    ("noise:sigma=0.5", "noise:sigma=0.5,kind=gaussian"),
    ("dropout", "dropout:p=0.5"),
    ("dropout:p=0.25", "dropout:p=0.25"),
    ("quant", "quant:bits=8"),
    ("quant:bits=4", "quant:bits=4"),
])
def test_specs_are_canonical(given, canonical):
    assert make_defense(given).spec == canonical
    assert make_defense(canonical).spec == canonical


# --- dropout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_zeroes_a_share_p_and_rescales_the_rest(p):
    z = activations()
    d = make_defense(f"dropout:p={p}")
    f = d.fit(z)  # the fitted transform (the defense itself is never changed)
    out = f(z, generator=gen(1))
    assert out.shape == z.shape and out.dtype == z.dtype
    zeroed = out == 0
    # 200k Bernoulli draws: the share's std is below 0.0012.
    assert abs(float(zeroed.float().mean()) - p) < 0.006
    torch.testing.assert_close(out[~zeroed], z[~zeroed] / (1 - p))
    assert abs(float(out.mean()) / float(z.mean()) - 1) < 0.02  # the mean is preserved


def test_dropout_is_reproducible_by_its_generator():
    z = activations(10_000)
    d = make_defense("dropout:p=0.5")
    f = d.fit(z)  # the fitted transform (the defense itself is never changed)
    a, b, c = f(z, generator=gen(3)), f(z, generator=gen(3)), f(z, generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert 0.4 < float(((a == 0) != (c == 0)).float().mean()) < 0.6  # independent masks differ in half the places


# --- quantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantization_has_at_most_2_to_the_bits_levels_within_half_a_step(bits):
    aux = activations(50_000, seed=0)
    d = make_defense(f"quant:bits={bits}")
    f = d.fit(aux)  # the fitted transform (the defense itself is never changed)
    lo, hi = float(aux.min()), float(aux.max())
    z = activations(50_000, seed=1).clamp(lo, hi)  # inside the fitted range
    out = f(z, generator=None)
    levels = torch.unique(out)
    assert len(levels) <= 2**bits
    assert len(levels) == 2**bits or bits == 8  # a coarse grid over this spread uses every level
    step = (hi - lo) / (2**bits - 1)
    assert float((out - z).abs().max()) <= step / 2 * (1 + 1e-4) + 1e-6
    assert float(out.min()) >= lo - 1e-6 and float(out.max()) <= hi + 1e-6
    assert torch.equal(f(z, generator=gen(0)), out)  # deterministic: the generator plays no part


def test_quantization_clips_outside_the_fitted_range():
    aux = torch.linspace(-1.0, 2.0, 1000)
    d = make_defense("quant:bits=4")
    f = d.fit(aux)  # the fitted transform (the defense itself is never changed)
    out = f(torch.tensor([-50.0, -1.5, -1.0, 2.0, 2.5, 1e6]), generator=None)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, -1.0, 2.0, 2.0, 2.0]))


@pytest.mark.parametrize("bits, shape", [(8, (4, 12, 12)), (4, (4, 12, 12)), (1, (3,)), (3, (5, 7)), (16, (10,))])
def test_quantization_wire_bytes_are_the_packed_codes_plus_the_range(bits, shape):
    d = make_defense(f"quant:bits={bits}")
    n = math.prod(shape)
    assert d.wire_bytes(shape) == math.ceil(n * bits / 8) + 8
    assert make_defense("none").wire_bytes(shape) == 4 * n  # float32 without it
    if bits <= 16 and n >= 8:
        assert d.wire_bytes(shape) < 4 * n


# --- noise -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noise_has_the_requested_std_relative_to_the_activation_and_zero_mean(kind, sigma):
    aux = activations()
    d = make_defense(f"noise:sigma={sigma},kind={kind}")
    f = d.fit(aux)  # the fitted transform (the defense itself is never changed)
    assert f.info()["noise_std"] == pytest.approx(float(aux.std()) * sigma)
    z = activations(seed=5)
    noise = f(z, generator=gen(2)) - z
    expected = sigma * float(aux.std())
    assert abs(float(noise.std()) / expected - 1) < 0.02
    assert abs(float(noise.mean())) < 0.01 * expected  # std of the mean: expected / 447
    assert torch.equal(f(z, generator=gen(2)) - z, noise)
    assert not torch.equal(f(z, generator=gen(3)) - z, noise)


def excess_kurtosis(x: torch.Tensor) -> float:
    x = x.double() - x.double().mean()
    return float(x.pow(4).mean() / x.pow(2).mean() ** 2) - 3


def test_laplace_noise_has_heavier_tails_than_gaussian():
    z = torch.zeros(400_000)
    aux = torch.randn(10_000, generator=gen(0))
    draws = {}
    for kind in ("gaussian", "laplace"):
        d = make_defense(f"noise:sigma=1,kind={kind}")
        f = d.fit(aux)  # the fitted transform (the defense itself is never changed)
        draws[kind] = f(z, generator=gen(7))
    # Laplace: excess kurtosis 3 (sample std about 0.1 at this size); Gaussian: 0.
    assert abs(excess_kurtosis(draws["laplace"]) - 3) < 0.5
    assert abs(excess_kurtosis(draws["gaussian"])) < 0.1
    # Same std, so more mass beyond 3 std: P(|X| > 3 sd) is 0.0144 for Laplace, 0.0027 for Gaussian.
    sd = draws["laplace"].std()
    tail = {k: float((v.abs() > 3 * sd).float().mean()) for k, v in draws.items()}
    assert tail["laplace"] == pytest.approx(0.0144, rel=0.1)
    assert tail["gaussian"] == pytest.approx(0.0027, rel=0.15)


# --- one audit ---------------------------------------------------------------------------------

DEFENSES = ("none", "dropout:p=0.5", "quant:bits=4", "noise:sigma=1,kind=laplace")


def test_an_audit_with_dropout_quantization_and_laplace_noise_on_the_cpu(tmp_path):
    npz = write_tiny_npz(tmp_path / "d.npz", n=240)
    res = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",), defenses=DEFENSES,
                                profile="quick", device="cpu", seed=0, cache_dir=str(tmp_path / "cache")))
    assert res.environment["device"] == "cpu"
    rows = {(r.defense, r.adaptive): r for r in res.results}
    assert set(rows) == {("none", False)} | {(spec, a) for spec in DEFENSES[1:] for a in (False, True)}
    for (spec, adaptive), r in rows.items():
        assert r.status == "ok", (spec, adaptive, r.error)
        assert r.cut == "stem" and math.isfinite(r.ssim) and -1 <= r.ssim <= 1, (spec, r.ssim)
        assert r.epochs and r.epochs > 0 and r.n_eval > 0, spec  # an attack was trained and scored
        assert r.accuracy is not None and 0 <= r.accuracy <= 1, spec
        assert r.agreement is not None and 0 <= r.agreement <= 1, spec
    float32 = res.cut("stem").bytes_per_sample
    assert float32 == 4 * 4 * 12 * 12
    assert rows[("quant:bits=4", False)].bytes_per_sample == 4 * 12 * 12 * 4 // 8 + 8 < float32
    assert rows[("dropout:p=0.5", False)].bytes_per_sample == float32
    assert rows[("noise:sigma=1,kind=laplace", True)].defense_info["noise_std"] > 0
