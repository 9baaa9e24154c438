"""Shared fixtures: an isolated cache per test session, tiny models and tiny data files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny import TinyNet


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Never read or write the user's ~/.cache/splitaudit from tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SPLITAUDIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    mp.undo()


@pytest.fixture
def tiny_npz(tmp_path):
    """120 labelled 12x12 gray images with a simple structure (a bright square whose place is the label)."""
    return write_tiny_npz(tmp_path / "tiny.npz")


def write_tiny_npz(path, n: int = 240, size: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.2, size=(n, size, size)).astype(np.float32)
    y = rng.integers(0, 4, size=n)
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        s = size // 2
        x[i, r * s : (r + 1) * s, c * s : (c + 1) * s] += rng.uniform(0.5, 0.8)
    np.savez(path, x=np.clip(x, 0, 1), y=y)
    return path


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return TinyNet()
