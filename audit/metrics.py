"""Reconstruction metrics: how recognizable is a rebuilt input, and how sure are we?

Why these are pure functions with an explicit ``data_range``:

* The audit compares the private input with what an attacker rebuilt from the activations at each
  cut point. A number in the report is only worth something if it means the same as the number in
  the papers it is compared with, so :func:`ssim` and :func:`psnr` reproduce scikit-image's
  definitions exactly (``structural_similarity`` with Gaussian weights, as in Wang et al. 2004, and
  ``peak_signal_noise_ratio``); the tests check each sample against scikit-image.
* ``data_range`` is never guessed from the data. Guessing it from ``max - min`` of a batch makes the
  score depend on which images happen to share the batch, and guessing it from the dtype is wrong
  for float images in [0, 255]. The caller knows the range of its data; it says so.
* No state, no device choice: results follow the input's device, so the same call works in the
  CPU test suite and on an accelerator, and metrics can be mixed freely in the audit loop.
* SSIM is computed for a whole batch at once. A per-image loop over scikit-image costs about a
  millisecond per pair, which dominates an audit of thousands of reconstructions at every cut
  point; here the Gaussian window is applied as two banded matrix products over the batch.
* A mean without an interval invites reading noise as a difference between cut points or defenses,
  so :func:`summarize` always reports a bootstrap confidence interval, seeded for reproducible
  reports, and the worst (most recognizable) sample, because privacy fails on the worst case, not
  on the average.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HIGHER_IS_BETTER",
    "MetricSummary",
    "bootstrap_ci",
    "most_recognizable",
    "psnr",
    "ssim",
    "summarize",
]

#: For each metric, whether a higher value means a better reconstruction, i.e. more leakage: the
#: input is more recognizable from what crossed the wire. "Better" is from the attacker's side.
HIGHER_IS_BETTER: dict[str, bool] = {"ssim": True, "psnr": True}

# Wang et al. (2004) constants and window, as scikit-image uses them with gaussian_weights=True.
_K1 = 0.01
_K2 = 0.03
_SIGMA = 1.5
_TRUNCATE = 3.5
_RADIUS = int(_TRUNCATE * _SIGMA + 0.5)  # 5, computed as scipy.ndimage does
_WIN_SIZE = 2 * _RADIUS + 1  # 11 taps; also the smallest image side scikit-image accepts

# SSIM filters five maps per image (x, y, x*x, y*y, x*y). On the CPU a batch is processed in chunks
# of about this many input elements (a few MB), which stay in cache and avoid the page faults of
# fresh large allocations; on an accelerator chunks are large, to keep kernel launches few and
# memory bounded. Chunking changes speed and peak memory only, never the result.
_CHUNK_ELEMENTS_CPU = 1 << 19
_CHUNK_ELEMENTS_ACCELERATOR = 1 << 24


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name}: expected two torch.Tensor, got {type(x).__name__} and {type(y).__name__}")
    if x.ndim != 4 or y.ndim != 4:
        raise ValueError(
            f"{name}: expected batches of shape (N, C, H, W), got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"{name}: tensors are on different devices: {x.device} vs {y.device}")
    if x.is_complex() or y.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported")


def _check_data_range(data_range: float, name: str) -> float:
    data_range = float(data_range)
    if not math.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"{name}: data_range must be a positive finite number, got {data_range}")
    return data_range


def _compute_dtype(x: Tensor, y: Tensor) -> torch.dtype:
    # float64 inputs are computed in float64; everything else (float32, half, integers) in float32,
    # which agrees with scikit-image's float64 result to well under 1e-4 (see the tests).
    if torch.promote_types(x.dtype, y.dtype) == torch.float64:
        return torch.float64
    return torch.float32


@functools.lru_cache(maxsize=32)
def _gaussian_band(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Transposed "valid" Gaussian filter matrix of shape (n, n - 2 * radius).

    ``images @ band`` filters the last axis. Only the rows of the output that scikit-image keeps
    after cropping ``radius`` pixels from each border are produced; each of them reads the input
    only inside the image, so the padding mode scikit-image uses (``reflect``) never enters.
    """
    offsets = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * offsets**2 / _SIGMA**2)
    taps = taps / taps.sum()  # normalized in float64 before casting, as scipy.ndimage does
    out = n - 2 * _RADIUS
    band = torch.zeros(n, out, dtype=torch.float64)
    cols = torch.arange(out)
    for k in range(_WIN_SIZE):
        band[cols + k, cols] = taps[k]
    return band.to(dtype=dtype, device=device)


def _ssim_chunk(x: Tensor, y: Tensor, band_h: Tensor, band_w: Tensor, c1: float, c2: float) -> Tensor:
    """Mean SSIM per (sample, channel) of one chunk, shape ``(n, c)``."""
    n, c, h, w = x.shape
    # Subtracting each image-channel's mean before filtering leaves the variances and the
    # covariance unchanged (the taps sum to one) but keeps float32 from cancelling digits in
    # E[x^2] - E[x]^2 on bright or flat images; the means are added back for the luminance term.
    mx = x.mean(dim=(-2, -1), keepdim=True)
    my = y.mean(dim=(-2, -1), keepdim=True)
    xc = x - mx
    yc = y - my
    maps = torch.stack([xc, yc, xc * xc, yc * yc, xc * yc])  # (5, n, c, h, w)
    filtered = maps.reshape(-1, w) @ band_w  # along W: (5 * n * c * h, w_out)
    filtered = torch.matmul(band_h.T, filtered.reshape(-1, h, band_w.shape[1]))  # along H
    ux, uy, uxx, uyy, uxy = filtered.reshape(5, n, c, -1).unbind(0)
    mx = mx.reshape(n, c, 1)
    my = my.reshape(n, c, 1)

    # Both branches compute the same formula, each ordered so that identical images give exactly 1
    # (vx, vy and vxy are then equal bit for bit). The in-place one saves about 15% on the CPU and
    # is used whenever autograd is not recording.
    if filtered.requires_grad:
        vx = uxx - ux * ux
        vy = uyy - uy * uy
        vxy = uxy - ux * uy
        a2 = 2 * vxy + c2
        b2 = vx + vy + c2
        ux = ux + mx
        uy = uy + my
        a1 = 2 * ux * uy + c1
        b1 = ux * ux + uy * uy + c1
        return ((a1 * a2) / (b1 * b2)).mean(dim=-1)

    a2 = uxy.addcmul_(ux, uy, value=-1).mul_(2).add_(c2)  # 2 cov(x, y) + C2
    vy = uyy.addcmul_(uy, uy, value=-1)
    b2 = uxx.addcmul_(ux, ux, value=-1).add_(vy).add_(c2)  # var(x) + var(y) + C2
    ux = ux.add_(mx)
    uy = uy.add_(my)
    a1 = (ux * uy).mul_(2).add_(c1)
    b1 = ux.mul_(ux).add_(uy.mul_(uy)).add_(c1)
    return a1.mul_(a2).div_(b1.mul_(b2)).mean(dim=-1)


def ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Structural similarity of each pair of images, shape ``(N,)``.

    Same definition as, for each sample ``i``::

        skimage.metrics.structural_similarity(
            x[i], y[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=data_range, channel_axis=0)

    that is Wang et al. (2004): an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma),
    K1 = 0.01, K2 = 0.03, population covariances, the SSIM map cropped by 5 pixels on each border
    before averaging, and the per-channel means averaged over channels.

    Args:
        x, y: batches of shape ``(N, C, H, W)``, same shape and device. ``H`` and ``W`` must be at
            least 11, as scikit-image requires for this window. Integer tensors are converted.
        data_range: the span of possible values (1.0 for images in [0, 1], 255.0 for [0, 255]).

    Returns:
        Float64 if either input is float64, else float32; on the inputs' device. 1.0 for identical
        images. Differentiable.
    """
    _check_pair(x, y, "ssim")
    data_range = _check_data_range(data_range, "ssim")
    n, c, h, w = x.shape
    if h < _WIN_SIZE or w < _WIN_SIZE:
        raise ValueError(
            f"ssim: images must be at least {_WIN_SIZE}x{_WIN_SIZE} for the 11-tap Gaussian window "
            f"(as in scikit-image), got {h}x{w}"
        )
    dtype = _compute_dtype(x, y)
    if n == 0 or c == 0:
        return torch.zeros(n, dtype=dtype, device=x.device)  # c == 0: nothing to compare
    x = x.to(dtype)
    y = y.to(dtype)
    band_h = _gaussian_band(h, dtype, x.device)
    band_w = _gaussian_band(w, dtype, x.device)
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    budget = _CHUNK_ELEMENTS_CPU if x.device.type == "cpu" else _CHUNK_ELEMENTS_ACCELERATOR
    per_sample = max(1, budget // (c * h * w))
    per_channel = torch.cat(
        [
            _ssim_chunk(x[i : i + per_sample], y[i : i + per_sample], band_h, band_w, c1, c2)
            for i in range(0, n, per_sample)
        ]
    )
    return per_channel.mean(dim=1)


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0, max_db: float | None = None) -> Tensor:
    """Peak signal-to-noise ratio of each pair of images in dB, shape ``(N,)``.

    Same definition as ``skimage.metrics.peak_signal_noise_ratio(x[i], y[i],
    data_range=data_range)``: ``10 * log10(data_range**2 / MSE)`` with the MSE over all of a
    sample's channels and pixels.

    Identical images have an MSE of zero and a PSNR of ``+inf``, as in scikit-image. That is the
    honest answer (a perfect reconstruction), but it makes means and confidence intervals
    meaningless, so :func:`bootstrap_ci` and :func:`summarize` refuse non-finite values. Pass
    ``max_db`` (e.g. 100.0) to clamp the result from above when the values will be summarized.

    Args:
        x, y: batches of shape ``(N, C, H, W)``, same shape and device.
        data_range: the span of possible values (1.0 for images in [0, 1], 255.0 for [0, 255]).
        max_db: if given, values above it (including ``+inf``) are clamped to it.

    Returns:
        Float64 if either input is float64, else float32; on the inputs' device.
    """
    _check_pair(x, y, "psnr")
    data_range = _check_data_range(data_range, "psnr")
    if max_db is not None and math.isnan(max_db):
        raise ValueError("psnr: max_db must be a number, got nan")
    dtype = _compute_dtype(x, y)
    diff = x.to(dtype) - y.to(dtype)
    mse = diff.square().flatten(1).mean(dim=1)
    out = 10.0 * torch.log10(data_range**2 / mse)
    if max_db is not None:
        out = out.clamp(max=max_db)
    return out


@dataclass(frozen=True)
class MetricSummary:
    """One metric over a set of samples.

    Attributes:
        mean: mean over the samples.
        ci: percentile bootstrap confidence interval of the mean, ``(low, high)``.
        worst: the maximum over the samples: for similarity metrics (SSIM, PSNR; see
            :data:`HIGHER_IS_BETTER`) the most recognizable reconstruction, the worst case for
            privacy.
        n: number of samples.
    """

    mean: float
    ci: tuple[float, float]
    worst: float
    n: int


def _as_finite_vector(values: Tensor | np.ndarray, name: str) -> Tensor:
    """Values as a 1-D float64 CPU tensor; refuses empty and non-finite input."""
    if isinstance(values, Tensor):
        v = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        v = torch.as_tensor(np.asarray(values, dtype=np.float64))
    v = v.reshape(-1)
    if v.numel() == 0:
        raise ValueError(f"{name}: no values to summarize")
    # Non-finite values are refused rather than dropped or clamped: dropping +inf PSNR (perfect
    # reconstructions) would understate leakage, the direction an audit must not err in, and a
    # clamp value is metric-specific, so the caller chooses it (psnr(..., max_db=...)). NaN is
    # always an upstream bug.
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        raise ValueError(
            f"{name}: {int(bad.sum())} of {v.numel()} values are not finite (nan or inf); "
            "for PSNR of perfect reconstructions pass psnr(..., max_db=...) to clamp +inf"
        )
    return v


class Resamples:
    """``n_boot`` resamples with replacement of ``n`` values, drawn once and applied to any number of
    vectors of ``n`` values.

    Vectors scored on the same samples (SSIM and PSNR of one row, or every row of an audit) then get
    their intervals from the same resamples: a paired bootstrap. Each resample is held as its weights
    (how often it drew each value, over ``n``), so a resample's mean is one matrix-vector product.

    Args:
        n: number of values each vector will have.
        n_boot: number of resamples.
        generator: a CPU generator, for reproducible intervals. By default a new generator seeded
            with 0, so that the same values always give the same interval.

    Raises:
        ValueError: on a bad ``n`` or ``n_boot``.
    """

    def __init__(self, n: int, *, n_boot: int = 1000, generator: torch.Generator | None = None):
        for name, v in (("n", n), ("n_boot", n_boot)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"bootstrap_ci: {name} must be a positive integer, got {v!r}")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        idx = torch.randint(0, n, (n_boot, n), generator=generator)
        one = torch.ones((), dtype=torch.float64).expand(n_boot, n)  # no memory of its own
        self.n, self.weights = n, torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, one).div_(n)

    def ci(self, values: Tensor | np.ndarray, *, confidence: float = 0.95, per: Tensor | np.ndarray | None = None) -> tuple[float, float]:
        """Percentile interval of the mean of ``values`` over the resamples: the ``(1 - confidence) / 2``
        and ``(1 + confidence) / 2`` quantiles of the resample means, linearly interpolated as
        ``numpy.quantile`` does. ``values`` must be finite and have ``n`` elements.

        With ``per`` (``n`` non-negative values), of the ratio ``sum(values) / sum(per)`` instead: each resample's
        ratio of its two sums, so the denominator varies with the resample as the numerator does (a share of
        spans recovered, where samples hold different numbers of spans). Resamples whose denominator is zero
        have no ratio and are left out."""
        v = _as_finite_vector(values, "bootstrap_ci")
        if v.numel() != self.n:
            raise ValueError(f"bootstrap_ci: the resamples are of {self.n} values, got {v.numel()}")
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence!r}")
        means = self.weights @ v
        alpha = (1.0 - confidence) / 2.0
        q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
        if per is not None:
            d = _as_finite_vector(per, "bootstrap_ci")
            if d.numel() != self.n or bool((d < 0).any()):
                raise ValueError(f"bootstrap_ci: the denominator must be {self.n} non-negative values")
            den = self.weights @ d
            ratios = means[den > 0] / den[den > 0]
            if not ratios.numel():
                return math.nan, math.nan
            lo, hi = torch.quantile(ratios, q).tolist()
            return lo, hi
        lo, hi = torch.quantile(means, q).tolist()
        # A constant vector's resample means are that constant up to rounding in the products: keep
        # the interval inside the values' own range.
        return max(lo, float(v.min())), min(hi, float(v.max()))


def bootstrap_ci(
    values: Tensor | np.ndarray,
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values``.

    Draws ``n_boot`` resamples of the values with replacement (see :class:`Resamples`; memory:
    ``n_boot * n`` float64 weights, and as many int64 indices while drawing), takes each resample's mean and returns the ``(1 - confidence) / 2``
    and ``(1 + confidence) / 2`` quantiles of those means, linearly interpolated as ``numpy.quantile``
    does.

    Args:
        values: any shape, flattened; computed on the CPU in float64. Must be finite (see
            :func:`psnr` for ``+inf``).
        n_boot: number of resamples.
        confidence: coverage of the interval, in (0, 1).
        generator: a CPU generator, for reproducible intervals. By default a new generator seeded
            with 0, so that the same values always give the same interval.

    Raises:
        ValueError: on empty or non-finite values, or bad ``n_boot``/``confidence``.
    """
    v = _as_finite_vector(values, "bootstrap_ci")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: confidence must be in (0, 1), got {confidence!r}")
    return Resamples(v.numel(), n_boot=n_boot, generator=generator).ci(v, confidence=confidence)


def summarize(
    values: Tensor | np.ndarray,
    *,
    generator: torch.Generator | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    resamples: Resamples | None = None,
    per: Tensor | np.ndarray | None = None,
) -> MetricSummary:
    """Mean, bootstrap confidence interval, worst (maximum) value and count of ``values``.

    ``worst`` is the maximum: the most recognizable sample for the similarity metrics here. The
    arguments are as for :func:`bootstrap_ci`; with ``resamples`` (drawn for this many values), the
    interval comes from those and ``generator`` and ``n_boot`` are not used. With ``per``, the metric is
    the ratio ``sum(values) / sum(per)`` (its "mean"), and its interval the ratio's (:meth:`Resamples.ci`).
    Empty or non-finite values raise ``ValueError``.
    """
    v = _as_finite_vector(values, "summarize")
    if resamples is None:
        resamples = Resamples(v.numel(), n_boot=n_boot, generator=generator)
    ci = resamples.ci(v, confidence=confidence, per=per)
    mean = float(v.mean()) if per is None else float(v.sum() / _as_finite_vector(per, "summarize").sum())
    return MetricSummary(mean=mean, ci=ci, worst=float(v.max()), n=v.numel())


def most_recognizable(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` highest values, highest first; ties go to the lower index.

    ``k`` larger than the number of values is clipped to it. The indices are int64, on the
    device of ``values``. Deterministic: the same values always give the same indices, so reports
    show the same example reconstructions from run to run.

    Raises:
        ValueError: if ``values`` is not 1-D, contains NaN, or ``k`` is negative.
    """
    if not isinstance(values, Tensor):
        values = torch.as_tensor(values)
    if values.ndim != 1:
        raise ValueError(f"most_recognizable: expected a 1-D tensor, got shape {tuple(values.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"most_recognizable: k must be a non-negative integer, got {k!r}")
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise ValueError("most_recognizable: values contain NaN")
    order = torch.sort(values, descending=True, stable=True).indices
    return order[: min(k, values.numel())]
