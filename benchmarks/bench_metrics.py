"""Time audit.metrics.ssim + psnr on 1,000 image pairs, and check them against scikit-image.

The audit scores every reconstruction at every cut point, so the metrics must cost far less than the
attack itself: the target is well under 0.1 s per 1,000 pairs on 2 CPU cores. Timing uses
torch.utils.benchmark (warm-up, then blocks of runs for at least --min-run-time seconds; the median
and interquartile range of the blocks are printed). The maximum absolute difference from
scikit-image is measured on the first --check pairs.

    python benchmarks/bench_metrics.py [--n 1000] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.utils.benchmark as benchmark
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from splitaudit.metrics import psnr, ssim

SHAPES = [(1, 28, 28), (3, 32, 32)]


def _pairs(n: int, shape: tuple[int, int, int], device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Originals and plausible reconstructions (noisy copies) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return x.to(device), y.to(device)


def _skimage(x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
    a, b = x.double().cpu().numpy(), y.double().cpu().numpy()
    t0 = time.perf_counter()
    s = [
        structural_similarity(
            u, v, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=1.0, channel_axis=0,
        )
        for u, v in zip(a, b)
    ]
    p = [peak_signal_noise_ratio(u, v, data_range=1.0) for u, v in zip(a, b)]
    return np.asarray(s), np.asarray(p), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="pairs per timed call")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--check", type=int, default=50, help="pairs compared with scikit-image")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timed runs per shape")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__} | device {args.device} | torch.get_num_threads() = {torch.get_num_threads()}"
          f" | {platform.processor() or platform.machine()}")
    for shape in SHAPES:
        x, y = _pairs(args.n, shape, args.device, seed=0)
        for _ in range(3):  # warm-up: filter-matrix cache, allocator, thread pool
            ssim(x, y, data_range=1.0)
            psnr(x, y, data_range=1.0)
        timer = benchmark.Timer(
            stmt="ssim(x, y, data_range=1.0); psnr(x, y, data_range=1.0)",
            globals={"ssim": ssim, "psnr": psnr, "x": x, "y": y},
            num_threads=torch.get_num_threads(),
        )
        m = timer.blocked_autorange(min_run_time=args.min_run_time)

        k = min(args.check, args.n)
        ref_s, ref_p, t_ref = _skimage(x[:k], y[:k])
        ours_s = ssim(x[:k], y[:k], data_range=1.0).double().cpu().numpy()
        ours_p = psnr(x[:k], y[:k], data_range=1.0).double().cpu().numpy()

        label = "x".join(map(str, shape))
        print(
            f"{args.n} pairs of {label}: ssim+psnr median {m.median * 1e3:.1f} ms "
            f"(IQR {m.iqr * 1e3:.1f} ms, {len(m.times)} blocks x {m.number_per_run} runs) | "
            f"scikit-image loop ~{t_ref / k * args.n * 1e3:.0f} ms per {args.n} | "
            f"max |diff| vs scikit-image on {k}: ssim {np.abs(ours_s - ref_s).max():.2e}, "
            f"psnr {np.abs(ours_p - ref_p).max():.2e} dB"
        )


if __name__ == "__main__":
    main()
