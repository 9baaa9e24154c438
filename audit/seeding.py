"""Named random streams: every random draw of an audit comes from a generator seeded by what it is for.

A job, a defense's noise, a bootstrap or a victim's training each get a generator seeded by a hash of
(seed, *what it is for), so the order in which work runs, and where it runs, changes no number.
"""

from __future__ import annotations

import hashlib

import torch


def job_generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 62) - 1))
