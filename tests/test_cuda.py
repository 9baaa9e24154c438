"""``--device cuda``: the grid on a GPU gives the CPU's answers. Skipped where CUDA is not available
(CI has none); run on a GPU machine with ``pytest tests/test_cuda.py``."""

from __future__ import annotations

import json

import pytest
import torch

from splitaudit.cli import app
from splitaudit.runner import AuditConfig, run_audit
from tests.conftest import write_tiny_npz

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEFENSES = ("none", "noise:sigma=1", "dropout:p=0.5", "dpsgd:epsilon=8")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    npz = write_tiny_npz(d / "d.npz", n=400)
    out = {}
    for device in ("cpu", "cuda"):
        cfg = AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem", "block.bn"), profile="quick", seed=3,
                          use_cache=False, defenses=DEFENSES, attacks=("decoder", "rmle"), device=device)
        out[device] = run_audit(cfg)
    return out


def test_every_row_runs_on_cuda(both):
    res = both["cuda"]
    assert res.environment["device"].startswith("cuda")
    assert res.config["workers"] == 1  # one accelerator: jobs would only queue on it
    failed = [(r.cut, r.defense, r.attack, r.error) for r in res.results if r.status != "ok"]
    assert not failed
    assert len(res.results) == len(both["cpu"].results)


def test_cuda_leakage_agrees_with_the_cpu(both):
    """Same seeds, different kernels (training follows another path): SSIM within 0.1 of the CPU's."""
    cpu = {(r.cut, r.defense, r.attack, r.adaptive): r for r in both["cpu"].results}
    for r in both["cuda"].results:
        if r.defense.startswith("dpsgd") and not r.adaptive:
            continue  # a decoder of the victim applied to another model (fine-tuned on each device): chaotic
        c = cpu[(r.cut, r.defense, r.attack, r.adaptive)]
        assert abs(r.ssim - c.ssim) < 0.1, (r.cut, r.defense, r.attack, r.ssim, c.ssim)
        if r.accuracy is not None:
            assert abs(r.accuracy - c.accuracy) < 0.1


def test_dpsgd_rows_carry_epsilon_and_cuda_latency(both):
    rows = [r for r in both["cuda"].results if r.defense.startswith("dpsgd")]
    assert rows and all(r.epsilon is not None and 0 < r.epsilon <= 8.5 for r in rows)
    assert all(r.latency_ms is not None and r.latency_ms > 0 for r in rows)


def test_cli_demo_quick_on_cuda(tmp_path):
    from typer.testing import CliRunner

    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--profile", "quick", "--device", "cuda", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "results.json").read_text())
    assert data["environment"]["device"].startswith("cuda")
    conv1 = next(r for r in data["results"] if r["cut"] == "conv1" and r["defense"] == "none")
    assert conv1["ssim"] > 0.9
