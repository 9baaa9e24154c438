"""Tests for audit.metrics: agreement with scikit-image, bootstrap behaviour, ranking, errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from splitaudit import metrics
from splitaudit.metrics import (
    HIGHER_IS_BETTER,
    MetricSummary,
    Resamples,
    bootstrap_ci,
    most_recognizable,
    psnr,
    ssim,
    summarize,
)

# --------------------------------------------------------------------------------------------------
# Reference agreement: one tester, cases given as data.


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Natural-looking images in [0, 1]: random low-frequency sinusoids plus a gradient."""
    g = _gen(seed)
    yy = torch.linspace(0, 1, h).view(1, 1, h, 1)
    xx = torch.linspace(0, 1, w).view(1, 1, 1, w)
    img = 0.3 * yy + 0.2 * xx
    for _ in range(4):
        fy, fx, phase = torch.rand(3, n, c, 1, 1, generator=g) * torch.tensor([6.0, 6.0, 6.3]).view(3, 1, 1, 1, 1)
        img = img + 0.15 * torch.sin(2 * math.pi * (fy * yy + fx * xx) + phase)
    img = img - img.amin(dim=(-2, -1), keepdim=True)
    return img / img.amax(dim=(-2, -1), keepdim=True)


def _blur_and_noise(img: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (blurred + noise * torch.randn(img.shape, generator=_gen(seed))).clamp(0, 1)


@dataclass(frozen=True)
class Case:
    name: str
    make: object  # () -> (x, y); built lazily so collection stays fast
    data_range: float = 1.0
    atol: float = 1e-4
    ssim_between: tuple[float, float] | None = None  # sanity range for the reference SSIM


def _noise_pair(shape, seed):
    g = _gen(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def _uint8_pair():
    g = _gen(7)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g).to(torch.float32)
    y = (x + torch.randint(-20, 21, x.shape, generator=g)).clamp(0, 255)
    return x, y


def _bright_flat_pair():
    # Nearly constant bright images: where float32 E[x^2] - E[x]^2 would lose digits.
    g = _gen(8)
    x = 0.95 + 0.004 * torch.randn(4, 1, 28, 28, generator=g)
    return x, x + 0.002 * torch.randn(x.shape, generator=g)


def _realistic_pair():
    x = _smooth_images(4, 3, 32, 32, seed=9)
    return x, _blur_and_noise(x, 0.08, seed=10)


def _identical_pair():
    x = _smooth_images(3, 1, 28, 28, seed=11)
    return x, x.clone()


def _float64_pair():
    x = _smooth_images(3, 2, 24, 24, seed=12).double()
    return x, _blur_and_noise(x.float(), 0.05, seed=13).double()


CASES = [
    Case("gray_28x28_noise", lambda: _noise_pair((4, 1, 28, 28), 1), ssim_between=(-0.2, 0.2)),
    Case("rgb_32x32_noise", lambda: _noise_pair((4, 3, 32, 32), 2), ssim_between=(-0.2, 0.2)),
    Case("non_square_20x33", lambda: _noise_pair((3, 2, 20, 33), 3)),
    # scikit-image's Gaussian window has 11 taps, so 11x11 is the smallest image it accepts.
    Case("smallest_11x11", lambda: _noise_pair((4, 1, 11, 11), 4)),
    Case("realistic_blur_noise", _realistic_pair, ssim_between=(0.3, 0.95)),
    Case("identical", _identical_pair, ssim_between=(1.0, 1.0)),
    Case("uint8_values_range_255", _uint8_pair, data_range=255.0, ssim_between=(0.5, 1.0)),
    Case("bright_flat_float32", _bright_flat_pair, ssim_between=(0.2, 1.0)),
    Case("float64_exact", _float64_pair, atol=1e-10),
]


def _reference(metric: str, x: torch.Tensor, y: torch.Tensor, data_range: float) -> np.ndarray:
    out = []
    for a, b in zip(x.double().numpy(), y.double().numpy()):
        if metric == "ssim":
            out.append(
                structural_similarity(
                    a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                    data_range=data_range, channel_axis=0,
                )
            )
        else:
            with np.errstate(divide="ignore"):  # identical images: skimage returns inf
                out.append(peak_signal_noise_ratio(a, b, data_range=data_range))
    return np.asarray(out)


@pytest.mark.parametrize("metric", ["ssim", "psnr"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_scikit_image(case: Case, metric: str) -> None:
    x, y = case.make()
    fn = {"ssim": ssim, "psnr": psnr}[metric]
    ours = fn(x, y, data_range=case.data_range)
    expected = _reference(metric, x, y, case.data_range)

    assert ours.shape == (x.shape[0],)
    assert ours.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(ours.double().numpy(), expected, rtol=0, atol=case.atol)
    if metric == "ssim" and case.ssim_between is not None:
        lo, hi = case.ssim_between
        assert np.all((expected >= lo - 1e-12) & (expected <= hi + 1e-12)), expected


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_identical_images_give_exactly_one_and_infinite_psnr(data_range) -> None:
    x = torch.cat([_smooth_images(3, 3, 16, 19, seed=20), torch.rand(3, 3, 16, 19, generator=_gen(21))])
    x = x * data_range
    assert torch.equal(ssim(x, x, data_range=data_range), torch.ones(6))
    assert torch.equal(ssim(x.double(), x.double(), data_range=data_range), torch.ones(6, dtype=torch.float64))
    assert torch.equal(ssim(x.clone().requires_grad_(True), x, data_range=data_range).detach(), torch.ones(6))
    p = psnr(x, x, data_range=data_range)
    assert torch.isinf(p).all() and (p > 0).all()


def test_results_do_not_depend_on_batch_or_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _realistic_pair()
    x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y.flip(-2)])  # 8 samples
    whole = ssim(x, y)
    one_by_one = torch.cat([ssim(x[i : i + 1], y[i : i + 1]) for i in range(len(x))])
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS_CPU", 3 * x[0].numel())  # chunks of 3, 3, 2
    chunked = ssim(x, y)
    torch.testing.assert_close(whole, one_by_one, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, chunked, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fn", [ssim, psnr])
def test_output_follows_input_device(fn) -> None:
    # The meta device runs no kernels; any tensor created on the CPU inside would make this fail.
    x = torch.empty(3, 2, 16, 16, device="meta")
    out = fn(x, x)
    assert out.device.type == "meta" and out.shape == (3,)


def test_half_and_integer_inputs_are_computed_in_float32() -> None:
    x, y = _noise_pair((2, 1, 16, 16), 30)
    expected = ssim(x.half().float(), y.half().float())
    out = ssim(x.half(), y.half())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    xi, yi = (x * 255).round().to(torch.uint8), (y * 255).round().to(torch.uint8)
    torch.testing.assert_close(
        ssim(xi, yi, data_range=255), ssim(xi.float(), yi.float(), data_range=255)
    )


def test_ssim_is_differentiable() -> None:
    x, y = _realistic_pair()
    y = y.clone().requires_grad_(True)
    out = ssim(x, y)
    assert out.requires_grad
    torch.testing.assert_close(out.detach(), ssim(x, y.detach()), rtol=0, atol=1e-6)  # same value
    out.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_psnr_max_db_clamps_only_above() -> None:
    x, y = _realistic_pair()
    both = torch.cat([x[:1], x[:1]]), torch.cat([x[:1], y[:1]])  # identical, then degraded
    raw = psnr(*both)
    capped = psnr(*both, max_db=80.0)
    assert math.isinf(raw[0].item())
    assert capped[0].item() == 80.0
    assert capped[1].item() == raw[1].item() < 80.0


def test_higher_means_more_recognizable() -> None:
    assert HIGHER_IS_BETTER == {"ssim": True, "psnr": True}
    x = _smooth_images(4, 1, 28, 28, seed=40)
    close = _blur_and_noise(x, 0.02, seed=41)
    far = _blur_and_noise(x, 0.2, seed=42)
    for name, fn in (("ssim", ssim), ("psnr", psnr)):
        assert HIGHER_IS_BETTER[name]
        assert (fn(x, close) > fn(x, far)).all(), name


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "match"),
    [
        ((2, 1, 16, 16), (2, 1, 16, 17), "shapes differ"),
        ((2, 1, 16, 16), (3, 1, 16, 16), "shapes differ"),
        ((1, 16, 16), (1, 16, 16), r"\(N, C, H, W\)"),
        ((2, 1, 1, 16, 16), (2, 1, 1, 16, 16), r"\(N, C, H, W\)"),
    ],
)
@pytest.mark.parametrize("fn", [ssim, psnr])
def test_bad_shapes_raise(fn, x_shape, y_shape, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(torch.zeros(x_shape), torch.zeros(y_shape))


@pytest.mark.parametrize("hw", [(10, 10), (11, 10), (7, 32), (8, 8)])
def test_images_smaller_than_the_window_raise_like_scikit_image(hw) -> None:
    x = torch.rand(1, 1, *hw, generator=_gen(50))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x, x)
    with pytest.raises(ValueError):  # scikit-image refuses them too
        structural_similarity(
            x[0].numpy(), x[0].numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, channel_axis=0,
        )


@pytest.mark.parametrize("fn", [ssim, psnr])
@pytest.mark.parametrize("data_range", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_data_range_raises(fn, data_range) -> None:
    x = torch.rand(1, 1, 16, 16, generator=_gen(51))
    with pytest.raises(ValueError, match="data_range"):
        fn(x, x, data_range=data_range)


def test_non_tensor_input_raises() -> None:
    a = np.zeros((1, 1, 16, 16), dtype=np.float32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        ssim(a, a)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Bootstrap confidence intervals and summaries.


def _normal(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=_gen(seed), dtype=torch.float64)


def test_ci_contains_the_mean() -> None:
    v = _normal(200, 60) + 3.0
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean().item() < hi


def test_ci_width_matches_normal_theory() -> None:
    # 95% interval of a mean of n standard normals: about 2 * 1.96 / sqrt(n) wide.
    v = _normal(400, 61)
    lo, hi = bootstrap_ci(v, n_boot=2000)
    expected = 2 * 1.96 * v.std().item() / math.sqrt(len(v))
    assert hi - lo == pytest.approx(expected, rel=0.15)


def test_ci_narrows_as_n_grows() -> None:
    small = bootstrap_ci(_normal(25, 62))
    large = bootstrap_ci(_normal(2500, 63))
    assert (large[1] - large[0]) < (small[1] - small[0]) / 4  # ~10x narrower in theory


def test_ci_widens_with_confidence() -> None:
    v = _normal(100, 64)
    lo90, hi90 = bootstrap_ci(v, confidence=0.90)
    lo99, hi99 = bootstrap_ci(v, confidence=0.99)
    assert lo99 < lo90 and hi90 < hi99


def test_ci_reproducible_for_a_seed_and_different_across_seeds() -> None:
    v = _normal(50, 65)
    a = bootstrap_ci(v, generator=_gen(123))
    b = bootstrap_ci(v, generator=_gen(123))
    c = bootstrap_ci(v, generator=_gen(124))
    assert a == b
    assert a != c
    assert bootstrap_ci(v) == bootstrap_ci(v)  # default generator is seeded, not random
    assert bootstrap_ci(v) == bootstrap_ci(v, generator=_gen(0))


def test_ci_accepts_numpy_and_any_shape() -> None:
    v = _normal(60, 66)
    expected = bootstrap_ci(v)
    assert bootstrap_ci(v.numpy()) == expected
    assert bootstrap_ci(v.reshape(6, 10)) == expected


def test_ci_of_constant_values_is_a_point() -> None:
    assert bootstrap_ci(torch.full((30,), 0.25)) == (0.25, 0.25)
    assert bootstrap_ci(np.array([0.7])) == pytest.approx((0.7, 0.7))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (torch.tensor([]), "no values"),
        (np.array([]), "no values"),
        (torch.tensor([1.0, float("nan")]), "not finite"),
        (torch.tensor([30.0, float("inf")]), "max_db"),
    ],
)
@pytest.mark.parametrize("fn", [bootstrap_ci, summarize])
def test_empty_or_non_finite_values_raise(fn, values, match) -> None:
    with pytest.raises(ValueError, match=match):
        fn(values)


@pytest.mark.parametrize("kwargs", [{"n_boot": 0}, {"n_boot": 1.5}, {"confidence": 0.0}, {"confidence": 1.0}])
def test_bad_bootstrap_parameters_raise(kwargs) -> None:
    with pytest.raises(ValueError):
        bootstrap_ci(torch.ones(5), **kwargs)


def test_summarize_fields() -> None:
    v = torch.tensor([0.2, 0.9, 0.4, 0.5])
    s = summarize(v, generator=_gen(5), n_boot=500, confidence=0.9)
    assert isinstance(s, MetricSummary)
    assert s.mean == pytest.approx(0.5)
    assert s.worst == pytest.approx(0.9)  # the most recognizable sample
    assert s.n == 4
    assert s.ci == bootstrap_ci(v, generator=_gen(5), n_boot=500, confidence=0.9)
    assert 0.2 <= s.ci[0] < s.mean < s.ci[1] <= 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.mean = 1.0  # type: ignore[misc]


def test_summarize_of_clamped_psnr() -> None:
    x = _smooth_images(3, 1, 16, 16, seed=70)
    y = torch.cat([x[:1], _blur_and_noise(x[1:], 0.1, seed=71)])
    s = summarize(psnr(x, y, max_db=100.0))
    assert s.worst == 100.0 and s.n == 3 and math.isfinite(s.ci[1])


# --------------------------------------------------------------------------------------------------
# Ranking.


def test_most_recognizable_orders_highest_first() -> None:
    v = torch.tensor([0.1, 0.8, 0.3, 0.95, 0.5])
    assert most_recognizable(v, 3).tolist() == [3, 1, 4]
    assert most_recognizable(v, 3).dtype == torch.int64


def test_most_recognizable_breaks_ties_by_lower_index() -> None:
    v = torch.tensor([0.5, 0.9, 0.5, 0.9, 0.5, 0.1, 0.9])
    assert most_recognizable(v, 5).tolist() == [1, 3, 6, 0, 2]
    # the same on a long input, where sorting algorithms may switch strategy
    long = torch.zeros(5000)
    long[[4000, 17, 2500]] = 1.0
    assert most_recognizable(long, 5).tolist() == [17, 2500, 4000, 0, 1]


def test_most_recognizable_clips_k() -> None:
    v = torch.tensor([0.2, 0.7])
    assert most_recognizable(v, 10).tolist() == [1, 0]
    assert most_recognizable(v, 0).tolist() == []


@pytest.mark.parametrize(
    ("values", "k", "match"),
    [
        (torch.zeros(2, 2), 1, "1-D"),
        (torch.tensor([0.1, float("nan")]), 1, "NaN"),
        (torch.tensor([0.1, 0.2]), -1, "non-negative"),
    ],
)
def test_most_recognizable_bad_input_raises(values, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        most_recognizable(values, k)


def test_a_ratio_s_interval_resamples_its_denominator_and_stays_a_share():
    """A share of spans recovered, where samples hold 0 to 5 spans: every span of the span-rich samples is
    recovered, so per-sample values over a fixed denominator exceed 1 and an interval of their mean could too."""
    gen = torch.Generator().manual_seed(3)
    spans = torch.randint(0, 6, (200,), generator=gen).double()
    recovered = torch.where(spans >= 4, spans, torch.zeros_like(spans))
    scale = 200 / spans.sum()
    v, per = recovered * scale, spans * scale  # the scaling of pii_recovery: the mean of v is the share
    rs = Resamples(200, generator=torch.Generator().manual_seed(0))
    summ = summarize(v, resamples=rs, per=per)
    assert summ.mean == pytest.approx(float(recovered.sum() / spans.sum()))
    lo, hi = summ.ci
    assert 0 <= lo < summ.mean < hi <= 1
    assert rs.ci(v)[1] > hi  # a fixed denominator's interval is another (and wider here)
    ratios = (rs.weights @ v) / (rs.weights @ per)  # by hand: each resample's ratio of sums
    assert (lo, hi) == pytest.approx(tuple(torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()))
