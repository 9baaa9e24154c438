"""A residual, BatchNorm classifier with a hidden fully connected layer, for ``builtin:photos32``: the
test model of ``benchmarks/reference_decoder.py``, a shape splitaudit did not grow up with.

Its cuts, shallow to deep: ``stem`` (conv, BN, ReLU: 16x32x32), ``layer1`` (a BasicBlock, 16x32x32),
``layer2`` (stride 2, 32x16x16), ``layer3`` (stride 2, 64x8x8), ``pool`` (2x2 average: 64x2x2), ``fc1``
(a 128-d vector that is not the logits; the ReLU after it is functional) and ``fc2`` (the 11 logits).

``build()`` returns it untrained. Run the file to train it and save its state dict:

    python examples/resnet_mlp.py /tmp/ref/resnet_mlp.pt
    splitaudit audit --model examples/resnet_mlp.py:build --weights /tmp/ref/resnet_mlp.pt --data builtin:photos32

It trains on images the audit never shows its attacker or scores: a model given with ``--weights`` gets
no victim split (DESIGN.md, "Split policy"), so the audit's evaluation images are photos32's eval band
and its attacker draws from the victim and aux bands together. :func:`training_indices` keeps the
victim band's images that the standard and quick profiles (seed 0) do not give the attacker; the
thorough profile gives the attacker everything outside the eval band, these images included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _basic_block():
    """examples/small_resnet.py's BasicBlock, loaded from its file (an example is loaded by path, not as a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("splitaudit_example_small_resnet", Path(__file__).with_name("small_resnet.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BasicBlock


BasicBlock = _basic_block()


class ResNetMLP(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 11):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.layer3 = BasicBlock(32, 64, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64 * 4, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc2(F.relu(self.fc1(self.pool(x).flatten(1))))


def build() -> nn.Module:
    torch.manual_seed(0)
    return ResNetMLP()


def training_indices(dataset, *, seed: int = 0, profile: str = "standard"):
    """Indices of ``dataset`` (photos32) in its victim band that are neither evaluation nor attacker images
    of an audit of a trained model at ``profile`` and ``seed``. Images are matched by content, so the
    answer does not depend on how ``make_splits`` orders its parts."""
    from splitaudit.config import PROFILES
    from splitaudit.data import SPLIT_VICTIM, make_splits

    s = PROFILES[profile]
    splits = make_splits(dataset, seed=seed, n_eval=s["n_eval"], max_aux=s["max_aux"], policy="trained")
    seen = {bytes(x.numpy().tobytes()) for part in (splits.aux, splits.eval) for x in part.x}
    band = torch.nonzero(dataset.split == SPLIT_VICTIM).flatten()
    return torch.tensor([int(i) for i in band if dataset.x[i].numpy().tobytes() not in seen], dtype=torch.int64)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 20, seed: int = 0) -> nn.Module:
    """Adam with a cosine schedule, random horizontal flips; returns ``model`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-x.shape[0] // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(64):
            xb = x[idx]
            flip = torch.rand(xb.shape[0], generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            opt.zero_grad()
            F.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    import argparse
    import time

    from splitaudit.data import SPLIT_EVAL, load_data

    ap = argparse.ArgumentParser(description="Train ResNetMLP on photos32 images no audit scores or attacks with; save its state dict.")
    ap.add_argument("out", help="where to save the state dict")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="the audit's seed: it decides which images the attacker gets")
    args = ap.parse_args()
    ds = load_data("builtin:photos32")
    idx = training_indices(ds, seed=args.seed)
    t0 = time.perf_counter()
    model = train(build(), ds.x[idx], ds.y[idx], epochs=args.epochs, seed=args.seed)
    ev = torch.nonzero(ds.split == SPLIT_EVAL).flatten()
    with torch.no_grad():
        acc = float((model(ds.x[ev]).argmax(1) == ds.y[ev]).float().mean())
    torch.save(model.state_dict(), args.out)
    print(f"trained on {len(idx)} victim-band images in {time.perf_counter() - t0:.0f} s; "
          f"accuracy {acc:.3f} on the {len(ev)} eval-band images; saved {args.out}")


if __name__ == "__main__":
    main()
