"""Faults: a process killed mid-run, two audits on one cache, a Ray worker killed mid-job, a full disk.

Each test injects one fault and checks what the user is promised: the rerun (or the retry) gives the
rows a clean run gives, no damaged cache entry is ever served, and no half-written file is left where
a later run or reader would take it for a whole one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitaudit.results import AuditResult, CutInfo, ResultRow

REPO = Path(__file__).resolve().parents[1]
TINY = "tests/tiny.py:build"  # resolved against the repository root: the subprocesses run there
ROW_KEYS = ("cut", "defense", "attack", "adaptive", "ssim", "psnr", "ssim_ci", "status")
KINDS = ("activations", "attacks", "flops", "models", "utility")


def _audit_cmd(data: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "splitaudit.cli", "audit", "--model", TINY, "--data", str(data), "--cut", "stem", "--cut", "block",
            "--defense", "none", "--defense", "noise:sigma=1", "--profile", "quick", "--seed", "0", "--out", str(out),
            "--cache-dir", str(cache)]


def _rows(out: Path) -> list[dict]:
    """The rows of out/results.json as written (NaN is null there, so equal rows compare equal)."""
    raw = json.loads((out / "results.json").read_text())
    return [{k: r[k] for k in ROW_KEYS} for r in raw["results"]]


def _whole(pt: Path) -> bool:
    """An entry whose bytes match its sidecar digest (what Cache.get checks before it loads)."""
    sha = pt.with_suffix(".sha256")
    try:
        return pt.is_file() and hashlib.sha256(pt.read_bytes()).hexdigest() == sha.read_text().strip()
    except OSError:
        return False


def _entries(cache: Path) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*.pt")}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _run(cmd: list[str], log: Path, timeout: float = 300) -> int:
    with open(log, "wb") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.conftest import write_tiny_npz

    return write_tiny_npz(tmp_path_factory.mktemp("faults") / "D.npz")


@pytest.fixture(scope="module")
def clean(tmp_path_factory, data):
    """The audit of :func:`_audit_cmd` run once, undisturbed, on a cache of its own: (out, cache)."""
    root = tmp_path_factory.mktemp("clean")
    out, cache = root / "out", root / "cache"
    rc = _run(_audit_cmd(data, out, cache), root / "log")
    assert rc == 0, (root / "log").read_text()
    return out, cache


# ------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-run, a half-written entry, then a rerun
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_run_killed_mid_audit_reruns_to_the_clean_rows_and_never_serves_a_broken_entry(tmp_path, data, clean):
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = _audit_cmd(data, out, cache)
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            # The first whole attack entry (its digest is written after it): the attacks are under way.
            while not list((cache / "attacks").glob("*.sha256")):
                assert proc.poll() is None, "the audit ended before it wrote an attack entry"
                assert time.monotonic() < deadline, "no attack entry within 240 s"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            rc = proc.wait(60)
    assert rc == -signal.SIGKILL  # killed, not finished
    assert not (out / "results.json").exists()

    # Emulate a half-written file (a crash on a file system without atomic renames): cut one whole entry in half.
    written = sorted((cache / "attacks").glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    victim = next(p for p in written if _whole(p))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    whole_before = {k: {p.stem for p in (cache / k).glob("*.pt") if _whole(p)} for k in KINDS}
    tmp_before = set(cache.rglob("*.tmp"))  # what the kill may have left mid-write

    assert _run(cmd, tmp_path / "rerun.log") == 0, (tmp_path / "rerun.log").read_text()

    assert _rows(out) == _rows(clean[0])
    stats = json.loads((out / "results.json").read_text())["config"]["cache"]
    assert stats["hits"] > 0  # the rerun resumed from what the killed run had cached ...
    for kind in KINDS:  # ... every whole entry it asked for was a hit, every other a miss
        asked = set(stats["keys"].get(kind, ()))
        counts = stats["by_kind"].get(kind, {"hits": 0, "misses": 0})
        assert counts["hits"] >= len(whole_before[kind] & asked), kind
        if kind == "attacks":  # each attack key is asked for once
            assert counts == {"hits": len(whole_before[kind] & asked), "misses": len(asked - whole_before[kind])}
    assert victim.stem in stats["keys"]["attacks"] and victim.stem not in whole_before["attacks"]  # the truncated entry: a miss
    assert _whole(victim)  # recomputed and rewritten whole, the same attack a clean run trains
    assert _same(torch.load(victim, weights_only=True)["state"], torch.load(clean[1] / "attacks" / victim.name, weights_only=True)["state"])
    assert _entries(cache) == _entries(clean[1]) and all(_whole(cache / e) for e in _entries(cache))

    assert not list(out.rglob("*.tmp"))
    left = set(cache.rglob("*.tmp"))
    assert left <= tmp_before  # the rerun leaves none of its own; a killed writer's are never read:
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in left)  # no entry is ever read from such a name


# ------------------------------------------------------------------------------------------------
# 2. two audits on one cache directory at the same time
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_audits_sharing_one_cache_directory_at_once_agree_and_leave_whole_entries(tmp_path, data, clean):
    cache = tmp_path / "cache"
    outs = [tmp_path / "out0", tmp_path / "out1"]
    logs = [open(tmp_path / f"log{i}", "wb") for i in range(2)]
    try:
        procs = [subprocess.Popen(_audit_cmd(data, o, cache), cwd=REPO, stdout=f, stderr=subprocess.STDOUT) for o, f in zip(outs, logs)]
        try:
            codes = [p.wait(300) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(60)
    finally:
        for f in logs:
            f.close()
    assert codes == [0, 0], [(tmp_path / f"log{i}").read_text()[-3000:] for i in range(2)]

    assert _rows(outs[0]) == _rows(outs[1]) == _rows(clean[0])
    assert _entries(cache) == _entries(clean[1])  # the same entries a lone run leaves, each whole and loadable
    for e in _entries(cache):
        assert _whole(cache / e), e
        torch.load(cache / e, weights_only=True)
    assert {str(p.relative_to(cache)) for p in cache.rglob("*.sha256")} == {e[:-3] + ".sha256" for e in _entries(cache)}
    assert not list(cache.rglob("*.tmp")) and not list(tmp_path.rglob("out*/**/*.tmp"))


def test_a_second_writer_of_a_key_cannot_land_between_an_entry_and_its_digest(tmp_path, monkeypatch):
    """The race behind the test above, made certain: writer A is held between its entry and its digest
    while writer B puts the same key. Without the lock B's pair lands in that gap and A's digest then
    sits beside B's bytes (seen in 2 of 30 lock-step pairs of processes); with it, B waits its turn."""
    import threading

    import splitaudit.cache as cache_mod
    from splitaudit.cache import Cache

    real, in_gap, b_done = cache_mod.atomic_write_bytes, threading.Event(), threading.Event()

    def slow_for_a(path, data):
        real(path, data)
        if threading.current_thread().name == "A" and path.suffix == ".pt":
            in_gap.set()
            b_done.wait(0.5)  # B finishes now if nothing holds it back

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", slow_for_a)

    def put(i):
        Cache(tmp_path).put("attacks", "k", {"w": torch.full((1000,), float(i))})

    a = threading.Thread(target=put, args=(0,), name="A")
    a.start()
    assert in_gap.wait(10)
    b = threading.Thread(target=lambda: (put(1), b_done.set()), name="B")
    b.start()
    a.join(10)
    b.join(10)
    assert _whole(tmp_path / "attacks" / "k.pt")
    value = Cache(tmp_path).get("attacks", "k")
    assert value is not None and float(value["w"][0]) == 1.0  # B's value, written after A's whole pair


# ------------------------------------------------------------------------------------------------
# 3. a Ray worker process killed mid-job
# ------------------------------------------------------------------------------------------------
# A model whose forward kills the process it runs in, once, when that is not the driver: only the
# white-box attack runs the head inside a job, so capture, utility and latency (in the driver) are
# untouched and the first rmle job to start dies with its Ray worker.
KILLER = '''
import os
import signal

import torch
from torch import nn

DRIVER_PID = {pid}
MARKER = {marker!r}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 4)

    def forward(self, x):
        if os.getpid() != DRIVER_PID:
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # a worker has died already: run
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
'''


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra splitaudit[ray]")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_a_ray_worker_killed_mid_job_is_retried_and_the_rows_equal_local_rows(tmp_path, ray_runtime):
    from splitaudit.runner import AuditConfig, run_audit
    from tests.conftest import write_tiny_npz

    npz = write_tiny_npz(tmp_path / "d.npz")
    marker = tmp_path / "killed.pid"
    model = tmp_path / "killer.py"
    model.write_text(KILLER.format(pid=os.getpid(), marker=str(marker)))

    def config(**kw):
        return AuditConfig(model=f"{model}:build", data=str(npz), profile="quick", seed=0, use_cache=False, device="cpu",
                           attacks=("rmle",), cuts=("conv",), defenses=("none",), **kw)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks get one thread each; so does the local job here
    try:
        local = run_audit(config(workers=1))
    finally:
        torch.set_num_threads(threads)
    assert not marker.exists()  # the local executor runs the jobs in this process: nothing died

    on_ray = run_audit(config(executor="ray"))
    assert marker.exists(), "no Ray worker ran the head: the fault was not injected"
    dead = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)  # that worker is gone ...
    assert on_ray.config["executor"] == "ray"
    assert [r.status for r in local.results] == ["ok"]
    assert [r.status for r in on_ray.results] == ["ok"]  # ... and its job was retried

    def values(result):
        return [(r.key, r.ssim, r.ssim_ci, r.psnr, r.status, r.accuracy) for r in result.results]

    assert values(on_ray) == values(local)


# ------------------------------------------------------------------------------------------------
# 4. the disk fills while the results are written
# ------------------------------------------------------------------------------------------------
class _FullDisk:
    """``os`` as splitaudit.results sees it, on a disk with ``free`` bytes left.

    ``mode="write"``: the write that runs out puts what fits on the disk, then raises ENOSPC;
    ``mode="fsync"``: the writes are taken (delayed allocation) and the fsync of the file raises.
    """

    def __init__(self, free: int, mode: str):
        self.free, self.mode, self.failures = free, mode, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def _enospc(self):
        self.failures += 1
        return OSError(errno.ENOSPC, "No space left on device")

    def fdopen(self, fd, *args, **kwargs):
        return _File(self, os.fdopen(fd, *args, **kwargs))

    def fsync(self, fd):
        if self.free < 0:
            raise self._enospc()
        os.fsync(fd)


class _File:
    def __init__(self, disk: _FullDisk, f):
        self.disk, self.f = disk, f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def fileno(self):
        return self.f.fileno()

    def flush(self):
        self.f.flush()

    def write(self, data):
        disk = self.disk
        if disk.mode == "write" and len(data) > disk.free:
            fits = max(0, disk.free)
            self.f.write(data[:fits])
            self.f.flush()  # the part that fit is on the disk: a half-written temporary file
            disk.free = -1
            raise disk._enospc()
        disk.free -= len(data)
        return self.f.write(data)


def _small_result(seed: int = 0, grid: bytes = b"") -> AuditResult:
    cut = CutInfo(name="stem", shape=(4, 12, 12), bytes_per_sample=2304, head_flops=100, head_latency_ms=0.1)
    row = ResultRow(cut="stem", defense="none", attack="decoder", adaptive=False, ssim=0.5, ssim_ci=(0.45, 0.55), psnr=20.0,
                    psnr_ci=(19.0, 21.0), baseline_ssim=0.1, n_eval=80, images="images/stem.png" if grid else None)
    return AuditResult(created="2026-01-01T00:00:00+00:00", seed=seed, model={"spec": "m"}, data={"spec": "d"}, environment={},
                       cuts=(cut,), results=(row,), grids={"images/stem.png": grid} if grid else {})


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["write", "fsync"])
@pytest.mark.parametrize("where", ["image", "results.json"])
def test_a_full_disk_while_writing_is_a_clear_error_and_leaves_no_half_file(tmp_path, monkeypatch, mode, where):
    import splitaudit.results as results_mod
    from splitaudit.errors import UserError
    from splitaudit.writer import write

    out = tmp_path / "out"
    write(_small_result(seed=1), out)  # a previous, complete audit
    before = _files(out)
    assert "results.json" in before and "report.html" in before

    grid = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
    new = _small_result(seed=2, grid=grid)
    text = new.to_json() + "\n"
    # The disk runs out inside the image, or half-way into results.json (after the image was written whole).
    free = len(grid) // 2 if where == "image" else len(grid) + len(text) // 2
    disk = _FullDisk(free, mode)
    monkeypatch.setattr(results_mod, "os", disk)
    with pytest.raises(UserError, match="cannot write") as info:
        write(new, out)
    monkeypatch.undo()
    assert disk.failures == 1  # the fault was hit, once
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)

    after = _files(out)
    assert after["results.json"] == before["results.json"]  # the previous complete file, unchanged
    assert after["report.html"] == before["report.html"]
    AuditResult.load(out / "results.json")  # and it still loads
    assert not [p for p in after if p.endswith(".tmp")], after.keys()
    if where == "image":
        assert "images/stem.png" not in after
    else:
        assert after["images/stem.png"] == grid  # written whole before the disk filled

    fresh = tmp_path / "fresh"  # no previous results: none is left at all
    monkeypatch.setattr(results_mod, "os", _FullDisk(free, mode))
    with pytest.raises(UserError, match="cannot write"):
        write(new, fresh)
    monkeypatch.undo()
    left = _files(fresh) if fresh.exists() else {}
    assert "results.json" not in left and not [p for p in left if p.endswith(".tmp")]


def test_a_full_disk_under_the_cli_is_one_error_line_exit_2_and_no_half_results(tmp_path, monkeypatch, capsys):
    import splitaudit.results as results_mod
    import splitaudit.writer as writer_mod
    from splitaudit.cli import main
    from tests.conftest import write_tiny_npz

    npz = write_tiny_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    writer_mod.write(_small_result(seed=1), out)  # a previous, complete audit
    before = (out / "results.json").read_bytes()

    real_write, disks = writer_mod.write, []

    def write_on_a_filling_disk(result, where, **kw):
        # The disk fills once the images are written, a little way into results.json.
        disks.append(_FullDisk(sum(len(png) for png in result.grids.values()) + 1000, "write"))
        with monkeypatch.context() as m:
            m.setattr(results_mod, "os", disks[-1])
            return real_write(result, where, **kw)

    monkeypatch.setattr(writer_mod, "write", write_on_a_filling_disk)
    code = main(["audit", "--model", TINY, "--data", str(npz), "--cut", "stem", "--profile", "quick", "--seed", "0", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(disks) == 1 and disks[0].failures == 1  # the writer ran, and the disk filled in it
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "No space left on device" in errors[0], err
    assert "Traceback" not in err
    assert (out / "results.json").read_bytes() == before
    assert not list(out.rglob("*.tmp"))
