"""The reference the image audit is held to (DESIGN.md, "Performance targets"): at every cut, the
standard profile's SSIM is at least that of a standardized decoder trained for 30 epochs on 1,500 aux
images, in at most a third of that reference's time.

For a model, its data and a list of cuts, this

1. runs the real CLI, ``splitaudit audit --profile standard --defense none --cut ...``, in a subprocess
   with a fresh (cold) cache, and reads its results.json: SSIM per cut, the audit's wall time, and each
   row's training seconds, epochs and notes;
2. rebuilds the audit's scenario with ``splitaudit.scenario.build_scenario`` (same model, data, seed and
   profile, so the same splits), draws ``--n-aux`` images from the attacker's part, holds a tenth of
   them out for its own validation, and trains per cut an independent decoder written here: activations
   standardized per channel (per feature for vectors) with its training images' statistics, 3x3 conv
   blocks at the activation's resolution, x2 transposed-conv blocks up to the input's size, a sigmoid;
   MSE and Adam for ``--epochs`` epochs, keeping the epoch best on its held-out images;
3. scores the reference with the audit's own SSIM on the audit's evaluation images, and prints per cut
   both SSIMs, their difference and both times, the ratio of total times, and whether each target holds.

It checks that the splits are the audit's: the model hash must match results.json's, and the mean-aux-
image baseline it computes must equal each row's ``baseline_ssim`` (same aux and evaluation images).

    python benchmarks/reference_decoder.py                      # examples/resnet_mlp.py on builtin:photos32
    python benchmarks/reference_decoder.py --weights /tmp/ref/resnet_mlp.pt
    python benchmarks/reference_decoder.py --model builtin:lenet --data builtin:mnist \\
        --cut conv1 --cut relu2 --cut pool2 --cut fc1 --cut fc3
    python benchmarks/reference_decoder.py --results DIR/results.json   # reuse an audit run (times not back to back)
    python benchmarks/reference_decoder.py --results DIR/results.json --ref-seed 1   # the reference's own spread

Without ``--weights`` the default model is trained first (``examples/resnet_mlp.py``: on photos32
images the audit neither scores nor gives its attacker) and saved in ``--work``; a builtin model is
trained by the audit itself, and that training (the audit's ``model`` phase) is left out of its time.
The audit's time is the subprocess's wall time (start-up, capture, costs, judge, attacks, report); the
reference's is its training and reconstruction per cut, without capturing the activations.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "examples/resnet_mlp.py:build"
DEFAULT_CUTS = ("stem", "layer1", "layer2", "layer3", "fc1")
TIME_SHARE = 1 / 3  # the audit may take at most this share of the reference's time


# --------------------------------------------------------------------------------------------------
# Helpers (tested in tests/test_reference_decoder.py)
# --------------------------------------------------------------------------------------------------


def standardizer(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per channel of an (N, C, H, W) map, or per feature of an (N, D) vector, shaped to
    broadcast against one sample batch. A constant feature gets std 1, so it stays at zero."""
    dims = (0, 2, 3) if z.dim() == 4 else (0,)
    mean, std = z.mean(dim=dims, keepdim=True), z.std(dim=dims, keepdim=True)
    return mean, torch.where(std > 1e-6 * mean.abs() + 1e-12, std, torch.ones_like(std))


def reference_split(n_aux: int, n_ref: int, *, val_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the attacker's ``n_aux`` images: ``n_ref`` of them at random (all when there are fewer),
    as (train, validation) with ``val_fraction`` of them, at least one, held out."""
    n = min(n_ref, n_aux)
    pick = torch.randperm(n_aux, generator=torch.Generator().manual_seed(seed))[:n]
    n_val = max(1, round(n * val_fraction))
    return pick[n_val:], pick[:n_val]


def up_steps(n_act: int, n_in: int) -> int:
    """How many x2 upsamplings take a map ``n_act`` wide nearest to ``n_in`` (the rest is a resize)."""
    return max(0, round(math.log2(n_in / n_act)))


# --------------------------------------------------------------------------------------------------
# The reference decoder
# --------------------------------------------------------------------------------------------------


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), *_block(cout, cout)]


class ReferenceDecoder(nn.Module):
    """Standardized activation -> image in [0, 1]. A spatial map gets two conv blocks at its own
    resolution, then (transposed conv x2, conv) blocks up to the input's size, a bilinear resize where the
    sizes are not a power of two apart, and a conv to the image's channels. A vector (or a map under
    2x2) goes through a dense layer of ``hidden`` units to a 4x4 map first. Channels are ``width`` at a
    quarter of the input's size, up to twice that coarser, down to half of it finer."""

    def __init__(self, act_shape: tuple[int, ...], input_shape: tuple[int, ...], *, width: int = 64, hidden: int = 1024):
        super().__init__()
        c_in, h_in, w_in = input_shape

        def ch(n: int) -> int:
            return int(min(2 * width, max(width // 2, round(width * h_in / 4 / n))))

        if len(act_shape) == 3 and min(act_shape[1:]) >= 2:
            n = act_shape[1]
            layers = [*_block(act_shape[0], ch(n)), *_block(ch(n), ch(n))]
        else:
            n = 4
            layers = [nn.Flatten(), nn.Linear(math.prod(act_shape), hidden), nn.ReLU(), nn.Linear(hidden, ch(n) * n * n),
                      nn.Unflatten(1, (ch(n), n, n)), nn.BatchNorm2d(ch(n)), nn.ReLU()]
        for _ in range(up_steps(n, h_in)):
            layers += _up(ch(n), ch(2 * n))
            n *= 2
        layers.append(nn.Upsample(size=(h_in, w_in), mode="bilinear", align_corners=False))
        layers += [nn.Conv2d(ch(n), c_in, 3, padding=1), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


def make_reference(act_shape, input_shape, *, width: int, seed: int) -> ReferenceDecoder:
    """A freshly initialized ReferenceDecoder. The layers' initializers draw from the global generator, so
    this runs in one thread, before any job starts."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ReferenceDecoder(tuple(act_shape), tuple(input_shape), width=width)


def fit_reference(net: nn.Module, z_tr, x_tr, z_val, x_val, *, epochs: int, lr: float, batch: int, seed: int) -> tuple[nn.Module, dict]:
    """Train ``net`` with MSE and Adam; returns it at its best epoch on (z_val, x_val)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    best, state, history = math.inf, None, []
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(z_tr.shape[0], generator=g).split(batch):
            if idx.numel() < 2:  # BatchNorm needs two samples
                continue
            opt.zero_grad()
            F.mse_loss(net(z_tr[idx]), x_tr[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = float(F.mse_loss(net(z_val), x_val))
        history.append(val)
        if val < best:
            best, state = val, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    net.eval()
    best_epoch = history.index(best) + 1
    return net, {"val_mse": best, "best_epoch": best_epoch, "history": history}


# --------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "splitaudit"
    return [str(exe)] if exe.exists() else [shutil.which("splitaudit") or "splitaudit"]


def run_cli_audit(*, model: str, weights: str | None, data: str, cuts, seed: int, out: Path) -> tuple[dict, float]:
    """``splitaudit audit`` in a subprocess with a fresh cache; its results.json and its wall time."""
    with tempfile.TemporaryDirectory(prefix="ref-cache-") as cache:
        cmd = [*_cli(), "audit", "--model", model, "--data", data, "--profile", "standard", "--defense", "none",
               "--seed", str(seed), "--device", "cpu", "--cache-dir", cache, "--out", str(out)]
        cmd += ["--weights", weights] if weights else []
        for c in cuts:
            cmd += ["--cut", c]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: the audit failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out / "results.json").read_text()), wall


def _audit_rows(results: dict) -> dict[str, dict]:
    return {r["cut"]: r for r in results["results"]
            if r["defense"] == "none" and r["attack"] == "decoder" and not r.get("adaptive")}


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _default_weights(work: Path, seed: int) -> str:
    import importlib.util

    path = work / f"resnet_mlp-seed{seed}.pt"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("resnet_mlp", ROOT / "examples" / "resnet_mlp.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from splitaudit.data import load_data

        ds = load_data("builtin:photos32")
        idx = mod.training_indices(ds, seed=seed)
        print(f"training {DEFAULT_MODEL} on {len(idx)} photos32 images outside the audit's splits ...", file=sys.stderr, flush=True)
        torch.save(mod.train(mod.build(), ds.x[idx], ds.y[idx], seed=seed).state_dict(), path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--weights", default=None, help="state dict (default model without it: trained and saved in --work)")
    ap.add_argument("--data", default="builtin:photos32")
    ap.add_argument("--cut", action="append", default=None, help=f"repeat; default {', '.join(DEFAULT_CUTS)} (the default model)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n-aux", type=int, default=1500, help="the reference's aux images, a tenth of them held out for validation")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="the audit's seed (its splits)")
    ap.add_argument("--ref-seed", type=int, default=None, help="the reference's draw of aux images and initialization (default --seed)")
    ap.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help="cuts trained at once, each on threads/workers intra-op threads (the audit's own default)")
    ap.add_argument("--results", type=Path, default=None, help="an audit's results.json to compare with instead of running one")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ref", help="the audit's output and trained weights")
    args = ap.parse_args()

    from splitaudit.activations import ActivationStore
    from splitaudit.cache import Cache
    from splitaudit.config import AuditConfig
    from splitaudit.costs import cached_flops
    from splitaudit.metrics import ssim
    from splitaudit.progress import Reporter
    from splitaudit.scenario import build_scenario

    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model
    cuts = tuple(args.cut or (DEFAULT_CUTS if model == DEFAULT_MODEL else ()))
    weights = args.weights or (_default_weights(args.work, args.seed) if model == DEFAULT_MODEL else None)
    load = os.getloadavg()

    if args.results:
        results, wall = json.loads(args.results.read_text()), None
        if results["seed"] != args.seed or results["config"]["profile"] != "standard":
            sys.exit(f"error: {args.results} is a {results['config']['profile']} audit with seed {results['seed']}; "
                     f"this compares with a standard one with --seed {args.seed}")
    else:
        results, wall = run_cli_audit(model=model, weights=weights, data=args.data, cuts=cuts, seed=args.seed, out=args.work / "audit")
    rows = _audit_rows(results)
    # A victim the audit trains itself (a builtin model without --weights) is not the attack's time.
    model_phase = results["config"]["timings"].get("model", 0.0) if results["data"]["split_policy"]["policy"] == "victim" else 0.0
    audit_seconds = (wall if wall is not None else results["config"]["seconds"]) - model_phase

    config = AuditConfig(model=model, data=args.data, weights=weights, cuts=cuts, profile="standard", seed=args.seed, device="cpu")
    s = build_scenario(config, cache=Cache(None, enabled=False), reporter=Reporter(), phase=lambda _: nullcontext())
    if s.model_hash != results["model"]["hash"]:
        sys.exit(f"error: the model differs from the audit's ({s.model_hash[:12]} against {results['model']['hash'][:12]})")
    store = ActivationStore(s, Cache(None, enabled=False), cached_flops(s, Cache(None, enabled=False)))
    ref_seed = args.seed if args.ref_seed is None else args.ref_seed
    tr, va = reference_split(s.x_aux.shape[0], args.n_aux, seed=ref_seed)
    x_eval = s.x_eval
    baseline = float(ssim(s.x_aux.mean(dim=0, keepdim=True).expand_as(x_eval), x_eval).mean())
    print(f"{results['model']['spec']} on {args.data}: the audit's attacker has {s.x_aux.shape[0]} aux images; the reference "
          f"trains on {len(tr)} and validates on {len(va)} of them; both score the same {s.n_eval} evaluation images "
          f"(mean-aux-image baseline SSIM {baseline:.4f})")
    print(f"reference: width {args.width}, {args.epochs} epochs, Adam lr {args.lr:g}, batch {args.batch}, best epoch on validation, seed {ref_seed}; "
          f"{args.workers} cuts at a time on {max(1, torch.get_num_threads() // args.workers)} thread(s) each; torch {torch.__version__}; "
          f"load average before {load[0]:.1f}")

    jobs = {}
    for cut in s.cuts:  # captured first, one cut after another: the time of capture is not the reference's
        row = rows.get(cut.name)
        if row is None:
            print(f"{cut.name}: no decoder row in the audit's results; skipped")
            continue
        if row.get("baseline_ssim") is not None and abs(row["baseline_ssim"] - baseline) > 1e-4:
            sys.exit(f"error: the audit's baseline SSIM at {cut.name} is {row['baseline_ssim']:.5f}, this one {baseline:.5f}: "
                     "the splits differ")
        z_aux, z_eval = store.get(s.model, s.model_hash, cut.name)
        z_aux, z_eval = (z_aux.flatten(1), z_eval.flatten(1)) if z_aux.dim() == 3 else (z_aux, z_eval)
        net = make_reference(z_aux.shape[1:], s.x_aux.shape[1:], width=args.width, seed=ref_seed)
        jobs[cut.name] = (z_aux, z_eval, net)

    def job(name: str):
        z_aux, z_eval, net = jobs[name]
        t0 = time.perf_counter()
        mean, std = standardizer(z_aux[tr])
        net, info = fit_reference(net, (z_aux[tr] - mean) / std, s.x_aux[tr], (z_aux[va] - mean) / std, s.x_aux[va],
                                  epochs=args.epochs, lr=args.lr, batch=args.batch, seed=ref_seed)
        with torch.no_grad():
            recon = torch.cat([net((z_eval[i:i + 500] - mean) / std) for i in range(0, z_eval.shape[0], 500)])
        ref_ssim = float(ssim(recon.clamp(0, 1), x_eval).mean())
        seconds = time.perf_counter() - t0
        print(f"  {name}: reference SSIM {ref_ssim:.4f} in {seconds:.0f} s (best epoch {info['best_epoch']}/{args.epochs}); "
              f"audit {rows[name]['ssim']:.4f}", file=sys.stderr, flush=True)
        return name, tuple(z_aux.shape[1:]), ref_ssim, seconds, info, rows[name]

    threads = torch.get_num_threads()
    if args.workers > 1:  # as the audit does: one intra-op thread per job
        torch.set_num_threads(max(1, threads // args.workers))
    t_ref = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=args.workers) as pool:
        table = list(pool.map(job, list(jobs)))
    ref_total = time.perf_counter() - t_ref
    torch.set_num_threads(threads)

    print()
    print("| cut | shape | reference SSIM | audit SSIM [95% CI] | audit - reference | reference s | audit train s | audit epochs | holds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, shape, ref_ssim, seconds, info, row in table:
        ci = row.get("ssim_ci") or (math.nan, math.nan)
        holds = "yes" if row["ssim"] >= ref_ssim else "**no**"
        shape_s = "×".join(map(str, shape))
        print(f"| {name} | {shape_s} | {ref_ssim:.4f} (epoch {info['best_epoch']}) | {row['ssim']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | "
              f"{row['ssim'] - ref_ssim:+.4f} | {seconds:.0f} | {row.get('train_seconds') or 0:.0f} | {row.get('epochs')} | {holds} |")
    train_total = sum(r.get("train_seconds") or 0 for *_, r in table)
    ratio = audit_seconds / ref_total if ref_total else math.nan
    same_cuts = sorted(results["config"]["cuts"]) == sorted(name for name, *_ in table)
    print()
    print(f"reference: {ref_total:.0f} s for {len(table)} cuts; audit: {audit_seconds:.0f} s for {len(results['config']['cuts'])} "
          f"({'wall time of the CLI' if wall is not None else 'run time from results.json'}"
          f"{f', less {model_phase:.0f} s training the victim' if model_phase else ''}), of which {train_total:.0f} s "
          f"training the decoders of these cuts; ratio audit / reference {ratio:.2f} (target <= {TIME_SHARE:.2f})")
    print("audit phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["config"]["timings"].items()))
    short = [name for name, _, ref_ssim, *_, row in table if row["ssim"] < ref_ssim]
    off = "" if (args.epochs, args.n_aux) == (30, 1500) else f" (not the target's reference: {args.epochs} epochs on {args.n_aux} images)"
    print(f"SSIM target (audit >= reference at every cut){off}: {'holds' if not short else 'falls short at ' + ', '.join(short)}")
    if wall is None or not same_cuts:
        print("time target: not judged (" + ("the audit ran earlier, not back to back" if wall is None else "") +
              (", " if wall is None and not same_cuts else "") + ("the audit has other cuts" if not same_cuts else "") + ")")
    else:
        print(f"time target (audit <= a third of the reference): {'holds' if ratio <= TIME_SHARE else 'missed'}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} (1 min), {load[1]:.1f} (5 min) on {os.cpu_count()} CPUs")
    for name, *_, row in table:
        for note in row.get("notes") or ():
            print(f"  audit note at {name}: {note}")


if __name__ == "__main__":
    main()
