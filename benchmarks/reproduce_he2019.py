"""Reproduce the MNIST rows of He, Zhang and Lee, "Model inversion attacks against collaborative
inference" (ACSAC 2019), next to what splitaudit's attacks reach on the same kind of model and layers.

The victim is builtin:lenet-he by default: He et al.'s own MNIST LeNet (unpadded 5x5 convolutions, so
24x24 at conv1 and 8x8 at ReLU2), trained on builtin:mnist's victim split; the fair reproduction, since
their figures are for those shapes. ``--model builtin:lenet`` runs the same table on our LeNet-5 style
victim (padded conv1: 28x28 at conv1, 10x10 at ReLU2). The layers are the first conv (``conv1``) and the
second conv block (``relu2``, the ReLU after conv2, their "ReLU2"). The attacks are the inverse network
(``decoder``, their section 4.2), the white-box regularized maximum-likelihood attack (``rmle``, section
4.1), and a third rung the paper does not have: ``hybrid``, the white-box optimization started from a
decoder's reconstruction (BiSR, CCS'24). Every (attack, cut) cell is its own audit, so each cell's time
is its own (the hybrid's includes fitting its own decoder, which an audit with ``--attack decoder
--attack hybrid`` would reuse); the victim is trained once (in the first cell) and reused from the cache.

    python benchmarks/reproduce_he2019.py [--model builtin:lenet-he|builtin:lenet] [--profile quick|standard|thorough]
                                          [--cache-dir DIR]

Prints a markdown table. Without ``--cache-dir`` a fresh temporary cache is used, so the times
include every attack's training (nothing is reused from an earlier run).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from splitaudit.runner import AuditConfig, run_audit

# He et al. 2019, MNIST, Table 2 (inverse network) and Table 1 (rMLE): (SSIM, PSNR dB).
PUBLISHED = {
    ("decoder", "conv1"): (0.995, 40.72),
    ("decoder", "relu2"): (0.805, 20.81),
    ("rmle", "conv1"): (0.997, 39.69),
    ("rmle", "relu2"): (0.600, 15.10),
}
LAYER = {"conv1": "conv1", "relu2": "ReLU2 (2nd conv block)"}
ATTACK = {"decoder": "inverse network (decoder)", "rmle": "rMLE (white-box)", "hybrid": "hybrid (rMLE from the decoder)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:lenet-he", help="the victim: builtin:lenet-he (He et al.'s shapes) or builtin:lenet")
    ap.add_argument("--profile", default="standard", choices=("quick", "standard", "thorough"))
    ap.add_argument("--cache-dir", default=None, help="reuse this cache (default: a fresh temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        cells = {}
        t_all = time.perf_counter()
        for attack in ATTACK:
            for cut in ("conv1", "relu2"):
                cfg = AuditConfig(
                    model=args.model, data="builtin:mnist", cuts=(cut,), attacks=(attack,), profile=args.profile,
                    seed=args.seed, cache_dir=cache, device="cpu",
                )
                result = run_audit(cfg)
                timings = result.config["timings"]
                cells[attack, cut] = (result, timings.get("attacks", 0.0) + timings.get("scoring", 0.0))
        total = time.perf_counter() - t_all

    first = cells["decoder", "conv1"][0]
    env = first.environment
    print(f"## He et al. 2019 on MNIST vs splitaudit ({args.model}, profile {args.profile}, seed {args.seed})\n")
    print("| attack | layer | He et al. SSIM / PSNR | ours SSIM [95% CI] / PSNR | baseline SSIM | ours: fit + attack time |")
    print("|---|---|---|---|---|---|")
    for (attack, cut), (result, seconds) in cells.items():
        row = result.rows(cut=cut, defense="none", attack=attack)[0]
        published = "—" if (attack, cut) not in PUBLISHED else "{:.3f} / {:.2f} dB".format(*PUBLISHED[attack, cut])
        if row.status == "failed":
            ours = f"failed: {row.error}"
        else:
            ours = f"**{row.ssim:.3f}** [{row.ssim_ci[0]:.3f}, {row.ssim_ci[1]:.3f}] / {row.psnr:.2f} dB"
            if row.status != "ok":
                ours += f" ({row.status})"
        print(f"| {ATTACK[attack]} | {LAYER[cut]} | {published} | {ours} | {row.baseline_ssim:.3f} | {seconds:.1f} s |")
    data = first.data
    print(
        f"\nHe et al. trained on MNIST's 60,000 training images and report about 10 test images. Here the attacker has "
        f"{data.get('n_aux')} aux images (disjoint from the victim's {data.get('n_victim')} training images) and every "
        f"number is a mean over {data.get('n_eval')} held-out test images, with a 95% bootstrap interval. Baseline SSIM: the "
        f"mean aux image, i.e. what an attacker gets with no information from the activation."
    )
    for (attack, cut), (result, _) in cells.items():
        row = result.rows(cut=cut, defense="none", attack=attack)[0]
        lam = [n for n in row.notes if n.startswith("lambda=")]
        if lam:
            print(f"\n{ATTACK[attack]} at {cut}: {lam[0]}")
    shapes = ", ".join(f"{cut} {'x'.join(map(str, c.shape))}" for cut in ("conv1", "relu2")
                       for c in cells["decoder", cut][0].cuts if c.name == cut)
    print(
        f"\nVictim: {args.model} ({shapes}), {first.model.get('trained', 'weights given')}. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {env.get('torch')} with {env.get('threads')} threads "
        f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), device {env.get('device')}; "
        f"load average at the end {', '.join(f'{v:.1f}' for v in os.getloadavg())}. Total {total:.0f} s."
    )


if __name__ == "__main__":
    main()
