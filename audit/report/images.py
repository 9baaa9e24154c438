"""Image grids written with Pillow (no torchvision here): originals over reconstructions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from splitaudit.results import atomic_write_bytes


def _tile(x: torch.Tensor, scale: int) -> np.ndarray:
    """(C,H,W) in [0,1] -> uint8 (H*scale, W*scale, 3)."""
    a = (x.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    a = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a[:3]
    a = a.transpose(1, 2, 0)
    return np.kron(a, np.ones((scale, scale, 1), dtype=np.uint8)) if scale > 1 else a


def grid_png(
    originals: torch.Tensor, recons: torch.Tensor, *, fixed: torch.Tensor, worst: torch.Tensor, ssim: torch.Tensor | None = None
) -> bytes:
    """Two column groups: fixed samples, then the most recognizable ones; originals above, recons below."""
    c, h, w = originals.shape[1:]
    scale = max(1, 64 // max(h, w))
    th, tw, pad, gap, label_h = h * scale, w * scale, 2, 12, 12
    cols = list(fixed.tolist()) + list(worst.tolist())
    width = len(cols) * (tw + pad) + gap + pad
    height = label_h + 2 * (th + pad) + pad + (label_h if ssim is not None else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 0), "fixed samples", fill=(60, 60, 60))
    draw.text((len(fixed) * (tw + pad) + gap + pad, 0), "most recognizable", fill=(160, 30, 30))
    for j, idx in enumerate(cols):
        x0 = pad + j * (tw + pad) + (gap if j >= len(fixed) else 0)
        canvas.paste(Image.fromarray(_tile(originals[idx], scale)), (x0, label_h))
        canvas.paste(Image.fromarray(_tile(recons[idx], scale)), (x0, label_h + th + pad))
        if ssim is not None:
            draw.text((x0, label_h + 2 * (th + pad)), f"{float(ssim[idx]):.2f}", fill=(60, 60, 60))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def save_grid(path: Path, originals, recons, *, fixed, worst, ssim=None) -> Path:
    atomic_write_bytes(Path(path), grid_png(originals, recons, fixed=fixed, worst=worst, ssim=ssim))
    return Path(path)
