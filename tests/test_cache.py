"""Tests for the content-addressed cache (audit.cache) and its use by audits and `splitaudit gate`.

A corrupt or partial entry must be detected and recomputed, never used; concurrent writers must not
leave a corrupt entry; `--no-cache` and `--cache-dir` must do what they say.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from splitaudit.cache import Cache, key_of
from splitaudit.cli import main
from splitaudit.results import AuditResult

TINY = Path(__file__).with_name("tiny.py")


def _entries(root: Path, kind: str) -> list[Path]:
    return sorted((root / kind).glob("*.pt"))


def _valid(path: Path) -> bool:
    return hashlib.sha256(path.read_bytes()).hexdigest() == path.with_suffix(".sha256").read_text().strip()


# ------------------------------------------------------------------------------------------------
# the Cache on its own
# ------------------------------------------------------------------------------------------------
def test_key_depends_on_every_part_and_the_package_version(monkeypatch):
    import splitaudit as audit

    k = key_of("act", "model-hash", "data-hash", 0, "quick", "stem")
    assert k == key_of("act", "model-hash", "data-hash", 0, "quick", "stem")
    assert k != key_of("act", "model-hash", "data-hash", 1, "quick", "stem")
    assert k != key_of("act", "other-model", "data-hash", 0, "quick", "stem")
    monkeypatch.setattr(audit, "__version__", "9.9.9")
    assert k != key_of("act", "model-hash", "data-hash", 0, "quick", "stem")


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "no_digest", "garbage_with_matching_digest"])
def test_a_damaged_entry_is_a_miss_never_a_value(tmp_path, damage):
    cache = Cache(tmp_path)
    value = {"z": torch.arange(1000, dtype=torch.float32)}
    cache.put("activations", "k", value)
    path = tmp_path / "activations" / "k.pt"
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:500] + bytes([data[500] ^ 0x01]) + data[501:])
    elif damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "no_digest":
        path.with_suffix(".sha256").unlink()
    else:  # bytes that hash right but are no torch file: still not used
        path.write_bytes(b"not a torch file")
        path.with_suffix(".sha256").write_text(hashlib.sha256(b"not a torch file").hexdigest())
    assert cache.get("activations", "k") is None
    assert (cache.hits, cache.misses) == (0, 1)
    cache.put("activations", "k", value)  # recomputed and rewritten: whole again
    assert torch.equal(cache.get("activations", "k")["z"], value["z"])


def test_disabled_cache_neither_reads_nor_writes(tmp_path):
    Cache(tmp_path).put("attacks", "k", {"a": torch.ones(3)})
    off = Cache(tmp_path / "off", enabled=False)
    off.put("attacks", "k", {"a": torch.ones(3)})
    assert not (tmp_path / "off").exists()
    assert Cache(tmp_path, enabled=False).get("attacks", "k") is None


def test_location_follows_splitaudit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITAUDIT_CACHE_DIR", str(tmp_path / "here"))
    assert Cache().root == tmp_path / "here"


def test_concurrent_writers_of_one_key_never_leave_a_corrupt_entry(tmp_path):
    """Eight threads rewrite one key with different values while a reader polls it.

    Every read is either a miss or one writer's whole value (all elements equal), never a mix or an
    exception; after the writers finish, the entry is either whole or a miss that a rerun rewrites.
    """
    writers, rounds = 8, 15
    seen, errors = [], []
    done = threading.Event()

    def write(i):
        c = Cache(tmp_path)
        for _ in range(rounds):
            c.put("attacks", "same", {"w": torch.full((20_000,), float(i))})

    def read():
        c = Cache(tmp_path)
        while not done.is_set():
            try:
                v = c.get("attacks", "same")
            except Exception as exc:  # a reader must never see an exception
                errors.append(exc)
                return
            if v is not None:
                seen.append((float(v["w"].min()), float(v["w"].max())))

    reader = threading.Thread(target=read)
    reader.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    reader.join()
    assert not errors
    assert all(lo == hi and lo in range(writers) for lo, hi in seen)
    final = Cache(tmp_path).get("attacks", "same")
    assert final is None or float(final["w"].min()) == float(final["w"].max())
    assert not list((tmp_path / "attacks").glob("*.tmp"))  # no temporary file is left behind


# ------------------------------------------------------------------------------------------------
# through `splitaudit gate`: --cache-dir, hits on rerun, a broken entry recomputed
# ------------------------------------------------------------------------------------------------
def test_gate_rerun_hits_the_cache_and_a_broken_entry_is_recomputed(tmp_path, capsys):
    from tests.conftest import write_tiny_npz

    write_tiny_npz(tmp_path / "tiny.npz")
    cfg = tmp_path / "splitaudit.toml"
    cfg.write_text(f'model = "{TINY}:build"\ndata = "tiny.npz"\ncuts = ["stem"]\nprofile = "quick"\n'
                   "[thresholds]\nmax_ssim = 1.0\n")
    cache = tmp_path / "my-cache"

    def gate(out: str) -> AuditResult:
        code = main(["gate", "--config", str(cfg), "--cache-dir", str(cache), "--out", str(tmp_path / out)])
        assert code == 0, capsys.readouterr().out
        return AuditResult.load(tmp_path / out / "results.json")

    first = gate("run1")
    assert first.config["cache"]["hits"] == 0 and first.config["cache"]["misses"] >= 2

    def counts(r, kind):
        return r.config["cache"]["by_kind"].get(kind, {"hits": 0, "misses": 0})
    acts, atts = _entries(cache, "activations"), _entries(cache, "attacks")
    # one activation entry; two attack entries: the base decoder and its equal-budget refinement
    assert len(acts) == 1 and len(atts) == 2 and all(_valid(p) for p in acts + atts)

    second = gate("run2")
    assert second.config["cache"]["misses"] == 0 and second.config["cache"]["enabled"] is True
    assert counts(second, "activations") == {"hits": 1, "misses": 0} and counts(second, "attacks") == {"hits": 2, "misses": 0}
    assert second.results[0].attack_info.get("cached") is True
    assert second.results[0].ssim == first.results[0].ssim

    # Break the captured activations on purpose, as a crash mid-write would: cut the file in half.
    # (Refitting the attack would cost a full training; the unit tests above break every kind the same way.)
    acts[0].write_bytes(acts[0].read_bytes()[: acts[0].stat().st_size // 2])
    assert not _valid(acts[0])
    third = gate("run3")
    # activations recaptured, attack reused
    assert counts(third, "activations") == {"hits": 0, "misses": 1} and counts(third, "attacks") == {"hits": 2, "misses": 0}
    assert third.results[0].ssim == first.results[0].ssim  # recaptured activations are the same activations
    assert _valid(acts[0])  # and the entry is whole again
