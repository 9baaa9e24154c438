"""A data set whose prior scores above the threshold: aligned faces (scikit-image's ``lfw_subset``).

Trains ``examples/faces_cnn.py`` on 40 of its 100 face crops (the label: is the face lit more brightly
than the median) and writes the other 60 as a labelled .npz for the audit, so no audited face was
trained on; with ``--weights`` the audit splits them into evaluation and the attacker's data. It
audits every cut and prints per cut the SSIM of the strongest attack, the no-information baseline,
the gain over it, re-identification and the assessment. The mean face alone scores SSIM about 0.39
against these faces, above the 0.3 threshold, so a verdict by SSIM alone calls a reconstruction that
is no better than the mean face recognizable.

    python benchmarks/prior_faces.py [--profile quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from skimage.data import lfw_subset

    from splitaudit.attacks.training import TrainConfig, train

    work = Path(args.out or tempfile.mkdtemp(prefix="splitaudit-faces-"))
    work.mkdir(parents=True, exist_ok=True)
    x = lfw_subset()[:100].astype(np.float32)  # the first 100 crops are the faces
    y = (x.mean(axis=(1, 2)) > np.median(x.mean(axis=(1, 2)))).astype(np.int64)  # a task: is the face lit brightly?
    order = np.random.default_rng(0).permutation(100)
    own, audited = order[:40], order[40:]  # the model's own training faces, and the 60 the audit sees (never trained on)
    np.savez(work / "faces.npz", x=x[audited], y=y[audited])
    sys.path.insert(0, str(ROOT / "examples"))
    from faces_cnn import build

    torch.manual_seed(0)
    model = build()
    xt, yt = torch.from_numpy(x[own])[:, None], torch.from_numpy(y[own])
    train(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (xt, yt),
          config=TrainConfig(epochs=30, lr=3e-3, batch_size=32, patience=None), generator=torch.Generator().manual_seed(0))
    model.eval()
    xa, ya = torch.from_numpy(x[audited])[:, None], torch.from_numpy(y[audited])
    acc = float((model(xa).argmax(1) == ya).float().mean())
    torch.save(model.state_dict(), work / "faces.pt")
    print(f"faces CNN trained on 40 faces: accuracy {acc:.3f} on the 60 the audit sees")
    cmd = [sys.executable, "-m", "splitaudit.cli", "audit", "--model", f"{ROOT / 'examples' / 'faces_cnn.py'}:build",
           "--weights", str(work / "faces.pt"), "--data", str(work / "faces.npz"), "--profile", args.profile, "--out", str(work / "audit"),
           "--cache-dir", str(work / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-2000:])
    r = json.loads((work / "audit" / "results.json").read_text())
    heads = {(a["cut"], a["defense"]): a for a in r["assessment"]}
    print(f"{'cut':<14} {'SSIM':>6} {'prior':>6} {'gain [95% CI]':>22} {'re-id':>7} {'chance':>7}  assessment")
    for c in r["cuts"]:
        a = heads[(c["name"], "none")]
        h = r["results"][a["headline"]["index"]] if a["headline"] else None
        if h is None:
            print(f"{c['name']:<14} every attack failed")
            continue
        g = h["ssim_gain_ci"]
        print(f"{c['name']:<14} {h['ssim']:6.3f} {h['baseline_ssim']:6.3f} {h['ssim_gain']:+7.3f} [{g[0]:+.3f}, {g[1]:+.3f}] "
              f"{100 * h['reid_top1']:6.1f}% {100 * h['reid_chance']:6.2f}%  {a['status']}")
    for w in r["data"].get("warnings", []):
        print("warning:", w)
    print(f"results: {work / 'audit' / 'results.json'}")


if __name__ == "__main__":
    main()
