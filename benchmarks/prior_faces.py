"""A data set whose prior scores above the threshold: aligned faces (scikit-image's ``lfw_subset``).

Writes its 100 face crops as a labelled .npz (the label: is the face lit more brightly than the median), trains ``examples/faces_cnn.py`` on the
audit's own victim split (so the evaluation inputs stay unseen), audits every cut, and prints per cut
the SSIM of the strongest attack, the no-information baseline, the gain over it, re-identification and
the assessment. The mean face alone scores SSIM about 0.39 against these faces, above the 0.3
threshold; the deepest cut (the logits) carries about one bit, so its reconstructions are a mean face,
which a verdict by SSIM alone calls recognizable.

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
    from splitaudit.data import load_data, make_splits

    work = Path(args.out or tempfile.mkdtemp(prefix="splitaudit-faces-"))
    work.mkdir(parents=True, exist_ok=True)
    x = lfw_subset()[:100].astype(np.float32)  # the first 100 crops are the faces
    y = (x.mean(axis=(1, 2)) > np.median(x.mean(axis=(1, 2)))).astype(np.int64)  # a task: is the face lit brightly?
    np.savez(work / "faces.npz", x=x, y=y)
    ds = load_data(str(work / "faces.npz"))
    splits = make_splits(ds, seed=0, n_eval=1000, max_aux=None)  # the audit's own split (profile sizes do not cap it here)
    sys.path.insert(0, str(ROOT / "examples"))
    from faces_cnn import build

    torch.manual_seed(0)
    model = build()
    train(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (splits.victim.x, splits.victim.y),
          config=TrainConfig(epochs=30, lr=3e-3, batch_size=32, patience=None), generator=torch.Generator().manual_seed(0))
    model.eval()
    acc = float((model(splits.eval.x).argmax(1) == splits.eval.y).float().mean())
    torch.save(model.state_dict(), work / "faces.pt")
    print(f"faces CNN trained on {splits.victim.n} victim crops: accuracy {acc:.3f} on {splits.eval.n} evaluation crops")
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
