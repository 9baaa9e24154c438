"""The command line: one end-to-end run on a tiny model, and exit 2 for every kind of bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from splitaudit.cli import main
from splitaudit.results import AuditResult
from tests.conftest import write_tiny_npz

TINY = "tests/tiny.py:build"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture
def npz(tmp_path):
    return str(write_tiny_npz(tmp_path / "d.npz"))


def test_audit_end_to_end_on_a_tiny_model(capsys, tmp_path, npz):
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, "audit", "--model", TINY, "--data", npz, "--cut", "stem", "--cut", "fc", "--profile", "quick",
        "--defense", "none", "--defense", "noise:sigma=1", "--out", str(out), "--seed", "3",
    )
    assert code == 0, err
    result = AuditResult.load(out / "results.json")
    raw = json.loads((out / "results.json").read_text())
    assert raw["schema"] == "splitaudit/1"
    for key in ("created", "seed", "model", "data", "environment", "cuts", "results"):
        assert key in raw
    assert [c["name"] for c in raw["cuts"]] == ["stem", "fc"]
    for c in raw["cuts"]:
        assert {"name", "shape", "bytes_per_sample", "head_flops", "head_latency_ms"} <= set(c)
    row_keys = {"cut", "defense", "attack", "adaptive", "ssim", "ssim_ci", "psnr", "psnr_ci", "baseline_ssim", "n_eval",
                "accuracy", "agreement", "latency_ms", "latency_overhead_ms", "epsilon"}
    for r in raw["results"]:
        assert row_keys <= set(r)
    # A user's model arrives trained: no victim split, a third of the 240 samples to evaluation, the rest to the attacker
    assert result.seed == 3 and raw["data"]["n_eval"] == 80 and raw["data"]["n_aux"] == 160 and raw["data"]["n_victim"] == 0
    assert raw["data"]["split_policy"] == {"policy": "trained", "victim": 0, "aux": 160, "eval": 80, "unused": 0}
    # none: one row per cut; noise: adaptive + non-adaptive per cut.
    assert len(result.results) == 2 + 4
    stem = result.headline("stem", "none")
    # The first conv of a 1-channel image is easily inverted: far above the no-information baseline.
    assert stem.ssim > stem.baseline_ssim + 0.2
    assert stem.ssim_ci[0] <= stem.ssim <= stem.ssim_ci[1]
    assert (out / stem.images).is_file() and (out / "report.html").is_file()
    assert "stem" in stdout and "SSIM" in stdout


def test_cuts_command_lists_cuts(capsys):
    code, out, err = run(capsys, "cuts", "--model", TINY, "--input-shape", "1,12,12", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["stem", "block.conv", "block.bn", "block", "fc"]
    assert rows[0]["bytes_per_sample"] == 4 * 4 * 144 and rows[0]["bytes_int8"] == 4 * 144
    assert all(r["head_latency_ms"] > 0 for r in rows)


def _bad_npz(tmp_path, kind):
    p = tmp_path / f"{kind}.npz"
    if kind == "empty":
        np.savez(p, x=np.zeros((0, 12, 12), np.uint8))
    elif kind == "corrupt":
        p.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "range":
        np.savez(p, x=np.full((20, 12, 12), 3.0, np.float32))
    return str(p)


def test_bad_inputs_exit_2_with_one_error_line(capsys, tmp_path, npz):
    cases = []
    cases.append((["audit", "--model", "missing.py:build", "--data", npz], ["not found"]))
    cases.append((["audit", "--model", "tests/tiny.py", "--data", npz], ["CALLABLE"]))
    (tmp_path / "raises.py").write_text("def build():\n    raise RuntimeError('boom')\n")
    cases.append((["audit", "--model", f"{tmp_path}/raises.py:build", "--data", npz], ["boom"]))
    (tmp_path / "notmodule.py").write_text("def build():\n    return 42\n")
    cases.append((["audit", "--model", f"{tmp_path}/notmodule.py:build", "--data", npz], ["not a torch.nn.Module"]))
    cases.append((["audit", "--model", TINY, "--data", npz, "--cut", "nope"], ["unknown cut 'nope'", "stem, block.conv"]))
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((30, 3, 16, 16), np.uint8))
    cases.append((["audit", "--model", TINY, "--data", str(rgb)], ["rejected input of shape"]))
    small = tmp_path / "small.npz"
    np.savez(small, x=np.zeros((30, 8, 8), np.uint8))
    cases.append((["audit", "--model", TINY, "--data", str(small)], ["8x8 images", "at least 11x11"]))
    for kind, needle in (("empty", "empty"), ("corrupt", "corrupt"), ("range", "[0, 1]")):
        cases.append((["audit", "--model", TINY, "--data", _bad_npz(tmp_path, kind)], [needle]))
    img_dir = tmp_path / "imgs" / "a"
    img_dir.mkdir(parents=True)
    (img_dir / "bad.png").write_bytes(b"\x89PNG broken")
    cases.append((["audit", "--model", TINY, "--data", str(tmp_path / "imgs")], ["bad.png"]))
    pickled = tmp_path / "w.pt"
    torch.save([1, 2, 3], pickled)
    cases.append((["audit", "--model", TINY, "--data", npz, "--weights", str(pickled)], ["not hold a state dict"]))
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    cases.append((["audit", "--model", TINY, "--data", npz, "--weights", str(wrong)], ["does not match the model"]))
    notpt = tmp_path / "text.pt"
    notpt.write_text("hello")
    cases.append((["audit", "--model", TINY, "--data", npz, "--weights", str(notpt)], ["not a loadable state dict"]))
    cases.append((["audit", "--model", TINY, "--data", npz, "--defense", "noise:sigma=-1"], ["out of range", "allowed"]))
    cases.append((["audit", "--model", TINY, "--data", npz, "--attack", "telepathy"], ["known attacks: decoder"]))
    cases.append((["audit", "--model", TINY, "--data", npz, "--profile", "huge"], ["huge"]))
    cases.append((["audit", "--model", TINY], ["--data"]))
    cases.append((["report", str(tmp_path / "nothing.json")], ["not found"]))
    cases.append((["cuts", "--model", TINY, "--input-shape", "1,x,12"], ["C,H,W"]))
    for argv, needles in cases:
        code, _, err = run(capsys, *argv)
        assert_user_error(code, err, *needles)


def test_malicious_pickle_in_weights_never_runs(capsys, tmp_path, npz):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": Evil()}, evil)
    code, _, err = run(capsys, "audit", "--model", TINY, "--data", npz, "--weights", str(evil))
    assert_user_error(code, err)
    assert not marker.exists()


def test_folder_of_pngs_is_accepted_by_cuts(capsys, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((12, 12), 40 * i, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    code, out, err = run(capsys, "cuts", "--model", TINY, "--data", str(tmp_path / "imgs"), "--json")
    assert code == 0, err
    assert json.loads(out)[0]["shape"] == [4, 12, 12]


def test_progress_keeps_phases_on_screen_and_drops_finished_jobs():
    from io import StringIO

    from rich.console import Console

    from splitaudit.progress import RichReporter

    buf = StringIO()
    with RichReporter(Console(file=buf, width=120)) as reporter:
        with reporter.task("training builtin:lenet", total=2, keep=True) as task:
            task.advance(2)
        job = reporter.open("conv1: decoder on clean activations", total=3)
        job.update(3)
        job.close()
        running = reporter.open("relu1: decoder on clean activations", total=3)
    shown = buf.getvalue()
    assert "training builtin:lenet" in shown and "relu1: decoder" in shown  # a phase, and a job still running
    assert "conv1: decoder" not in shown  # a finished job leaves the screen
    running.close()


def test_audit_help_names_every_registered_attack(capsys):
    from splitaudit.attacks.base import ATTACKS

    code, out, _ = run(capsys, "audit", "--help")
    assert code == 0
    assert set(ATTACKS) <= set(out.replace(",", " ").replace("(", " ").replace(";", " ").split())
