"""Time `splitaudit demo` (standard and quick profiles) and each of its phases; check the SSIM targets.

Targets (shared/DESIGN.md): standard demo <= 180 s and quick <= 60 s on 2 CPU cores, from a cold cache
(victim training included); LeNet first conv SSIM >= 0.99 and after the second conv block >= 0.80;
an identical rerun >= 5x faster.

    python benchmarks/bench_demo.py [--profiles standard,quick] [--no-rerun] [--executors local,ray] [--workers N]

With several executors, each runs the same demo from its own cold cache; the difference is the
executor's overhead (Ray: starting the runtime, shipping inputs, task scheduling).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from audit.cli import DEMO_DEFENSES
from audit.runner import AuditConfig, run_audit


def one(profile: str, cache_dir: str, out: str, executor: str = "local", workers: int = 0) -> tuple[float, object]:
    cfg = AuditConfig(model="builtin:lenet", data="builtin:mnist", defenses=DEMO_DEFENSES, profile=profile, cache_dir=cache_dir, out=out,
                      executor=executor, workers=workers)
    t0 = time.perf_counter()
    result = run_audit(cfg)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default="standard,quick")
    ap.add_argument("--no-rerun", action="store_true")
    ap.add_argument("--executors", default="local")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu")
    for profile in args.profiles.split(","):
        for executor in args.executors.split(","):
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
                cold, result = one(profile, cache, out, executor, args.workers)
                c = result.config
                print(f"\n== demo --profile {profile} --executor {executor} ({c['workers']} workers, {c['threads_per_job']} thread(s) per job): "
                      f"{cold:.1f} s from a cold cache (victim {result.model.get('trained')})")
                for phase, secs in sorted(result.config["timings"].items(), key=lambda kv: -kv[1]):
                    print(f"   {phase:<20} {secs:7.1f} s")
                for cut in ("conv1", "relu1", "conv2", "relu2", "pool2"):
                    h = result.headline(cut, "none")
                    if h:
                        print(f"   SSIM {cut:<6} {h.ssim:.3f} [{h.ssim_ci[0]:.3f}, {h.ssim_ci[1]:.3f}]  PSNR {h.psnr:.2f} dB")
                if not args.no_rerun:
                    warm, _ = one(profile, cache, out, executor, args.workers)
                    print(f"   identical rerun: {warm:.1f} s ({cold / warm:.1f}x faster)")


if __name__ == "__main__":
    main()
