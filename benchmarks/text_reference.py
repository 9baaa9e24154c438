"""The reference the text inverter is held to: a position-wise MLP (hidden 384 -> 512 -> vocabulary,
6 epochs), trained on the same aux hidden states of MiniLM as the audit's attacker, scored on the same
evaluation texts.

It builds the audit's own scenario (``builtin:minilm`` on ``builtin:pii-text``, the standard profile:
2,000 aux and 1,000 evaluation texts, the same seed and splits), captures every cut, trains the MLP
on each, and prints its token accuracy per cut next to the audit's (from ``--results``, the
``results.json`` of ``splitaudit demo --text``; omitted: the reference alone). The vocabulary is the
attacker's, the tokens of its aux texts, as the audit's inverter uses: a classifier over the full
30,522 ids learns nothing about ids it never sees, and spends 7x the time.

    python benchmarks/text_reference.py [--results splitaudit-demo-text/results.json] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--profile", default="standard")
    args = ap.parse_args()

    from splitaudit.activations import ActivationStore
    from splitaudit.cache import Cache
    from splitaudit.config import AuditConfig
    from splitaudit.costs import cached_flops
    from splitaudit.progress import Reporter
    from splitaudit.scenario import build_scenario
    from splitaudit.text_data import PAD
    from splitaudit.text_metrics import token_accuracy

    torch.manual_seed(0)
    config = AuditConfig(model="builtin:minilm", data="builtin:pii-text", profile=args.profile)
    cache = Cache(None, enabled=False)
    from contextlib import nullcontext

    s = build_scenario(config, cache=cache, reporter=Reporter(), phase=lambda _: nullcontext())
    store = ActivationStore(s, cache, cached_flops(s, cache))
    theirs = {}
    if args.results:
        res = json.loads(args.results.read_text())
        theirs = {r["cut"]: r["token_accuracy"] for r in res["results"] if r["defense"] == "none" and not r.get("adaptive")}
    xa, xe = s.x_aux, s.x_eval
    vocab = torch.unique(xa[:, 0][xa[:, 1] != PAD])
    table = torch.full((int(max(xa[:, 0].max(), xe[:, 0].max())) + 1,), -1, dtype=torch.int64)
    table[vocab] = torch.arange(vocab.numel())
    print(f"{s.x_aux.shape[0]} aux, {s.n_eval} eval texts; attacker vocabulary {vocab.numel()} tokens")
    print(f"{'cut':<12}{'reference':>10}{'audit':>10}{'seconds':>9}")
    for cut in s.cuts:
        za, ze = store.get(s.model, s.model_hash, cut.name)
        if za.dim() != 3:
            print(f"{cut.name:<12}{'(vector)':>10}{theirs.get(cut.name, float('nan')):>10.4f}")
            continue
        t0 = time.perf_counter()
        mean, std = za.mean(dim=(0, 1)), za.std(dim=(0, 1)).clamp_min(1e-6)
        ma = xa[:, 1] != PAD
        h, y = ((za - mean) / std)[ma], table[xa[:, 0][ma]]
        g = torch.Generator().manual_seed(0)
        mlp = nn.Sequential(nn.Linear(za.shape[-1], 512), nn.ReLU(), nn.Linear(512, vocab.numel()))
        opt = torch.optim.Adam(mlp.parameters(), lr=1e-3)
        for _ in range(args.epochs):
            for idx in torch.randperm(h.shape[0], generator=g).split(1024):
                opt.zero_grad()
                F.cross_entropy(mlp(h[idx]), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            pred = vocab[mlp((ze - mean) / std).argmax(-1)]
        acc = float(token_accuracy(torch.stack([pred, torch.zeros_like(pred)], 1), xe).mean())
        print(f"{cut.name:<12}{acc:>10.4f}{theirs.get(cut.name, float('nan')):>10.4f}{time.perf_counter() - t0:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
