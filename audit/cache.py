"""A content-addressed cache for trained victims, captured activations and fitted attacks.

Keys are hashes of what determines the value (weights, data, config, package version), never file
names or modification times. Each entry is written atomically beside a sha256 of its bytes; an entry
whose bytes do not match (a partial write, a flipped bit) is treated as missing and recomputed.
Concurrent writers each rename a complete file into place, so readers see one whole entry or none; writers
of one key (threads or processes) take turns on an advisory lock beside the entry, so the entry and its
digest left at the end are one writer's pair, never one writer's bytes beside another's digest.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from splitaudit.results import atomic_write_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock (a torn pair there is a miss that a rerun rewrites)
    fcntl = None


def default_cache_dir() -> Path:
    env = os.environ.get("SPLITAUDIT_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitaudit"


def key_of(*parts: Any) -> str:
    """A stable hash of strings, numbers and nested tuples/dicts of them."""
    from splitaudit import __version__

    h = hashlib.sha256(__version__.encode())
    for p in parts:
        h.update(b"\x1f" + repr(p).encode())
    return h.hexdigest()[:40]


class Cache:
    def __init__(self, root: str | Path | None = None, *, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        self.by_kind: dict[str, dict[str, int]] = {}
        self.keys: dict[str, dict[str, None]] = {}  # kind -> every key asked for (results.json records them)
        self._lock = threading.Lock()  # jobs' threads and the fine-tuning thread count beside the driver

    def _count(self, kind: str, what: str, key: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)
            self.by_kind.setdefault(kind, {"hits": 0, "misses": 0})[what] += 1
            self.keys.setdefault(kind, {})[key] = None

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "enabled": self.enabled, "by_kind": self.by_kind,
                "keys": {k: list(v) for k, v in self.keys.items()}}

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{key}.pt"

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry exists (not whether it is whole: :meth:`get` checks that)."""
        return self.enabled and self._path(kind, key).is_file()

    def get(self, kind: str, key: str) -> Any | None:
        if not self.enabled:
            return None
        path = self._path(kind, key)
        try:
            data = path.read_bytes()
            digest = path.with_suffix(".sha256").read_text().strip()
        except OSError:
            self._count(kind, "misses", key)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            self._count(kind, "misses", key)
            return None
        try:
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            self._count(kind, "misses", key)
            return None
        self._count(kind, "hits", key)
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        if not self.enabled:
            return
        buf = io.BytesIO()
        torch.save(value, buf)
        data = buf.getvalue()
        path = self._path(kind, key)
        try:
            with _locked(path):
                atomic_write_bytes(path, data)
                atomic_write_bytes(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest().encode())
        except OSError:
            pass  # a read-only or full cache must not fail the audit


@contextmanager
def _locked(path: Path):
    """Hold an exclusive advisory lock on ``path``'s ``.lock`` file (created, never removed: removing it
    would let two writers lock two different files)."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
