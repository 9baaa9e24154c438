"""Time `splitaudit demo` (standard and quick profiles) and each of its phases; check the SSIM targets.

Targets (shared/DESIGN.md): standard demo <= 180 s and quick <= 60 s on 2 CPU cores, from a cold cache
(victim training included); LeNet first conv SSIM >= 0.99 and after the second conv block >= 0.80;
an identical rerun >= 5x faster.

    python benchmarks/bench_demo.py [--profiles standard,quick] [--no-rerun] [--executors local,ray] [--workers N]

Each run is the command a user types, `splitaudit demo --profile P`, in a process of its own with a
cold cache of its own: the wall time printed is the user's, from the interpreter's start (importing
torch included) to its exit. The phases come from the run's results.json. With several executors,
each runs the same demo; the difference is the executor's overhead (Ray: starting the runtime,
shipping inputs, task scheduling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(profile: str, cache_dir: str, out: str, executor: str = "local", workers: int = 0) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "splitaudit.cli", "demo", "--profile", profile, "--out", out, "--cache-dir", cache_dir,
           "--executor", executor, "--workers", str(workers)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall, json.loads((Path(out) / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default="standard,quick")
    ap.add_argument("--no-rerun", action="store_true")
    ap.add_argument("--executors", default="local")
    ap.add_argument("--workers", type=int, default=0)
    args = ap.parse_args()
    for profile in args.profiles.split(","):
        for executor in args.executors.split(","):
            with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
                cold, r = one(profile, cache, out, executor, args.workers)
                c, env = r["config"], r["environment"]
                print(f"\n== splitaudit demo --profile {profile} --executor {executor} ({c['workers']} workers, "
                      f"{c['threads_per_job']} thread(s) per job; torch {env.get('torch')}, {env.get('device')}): "
                      f"{cold:.1f} s wall from a cold cache, {c['seconds']} s of it in the audit")
                for phase, secs in sorted(c["timings"].items(), key=lambda kv: -kv[1]):
                    print(f"   {phase:<20} {secs:7.1f} s")
                headline = {row["cut"]: row for row in r["results"] if row["defense"] == "none" and not row["adaptive"]}
                for cut in ("conv1", "relu1", "conv2", "relu2", "pool2"):
                    if cut in headline:
                        h = headline[cut]
                        print(f"   SSIM {cut:<6} {h['ssim']:.3f} [{h['ssim_ci'][0]:.3f}, {h['ssim_ci'][1]:.3f}]  PSNR {h['psnr']:.2f} dB")
                if not args.no_rerun:
                    warm, r2 = one(profile, cache, out, executor, args.workers)
                    audit_cold, audit_warm = c["seconds"], r2["config"]["seconds"]
                    print(f"   identical rerun: {warm:.1f} s wall ({cold / warm:.1f}x faster), {audit_warm} s in the audit "
                          f"({audit_cold / max(audit_warm, 0.1):.1f}x faster)")


if __name__ == "__main__":
    main()
