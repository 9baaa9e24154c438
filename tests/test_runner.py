"""The grid: defenses against an adaptive attacker, flags, determinism."""

from __future__ import annotations

import pytest
import torch

from splitaudit.results import ResultRow
from splitaudit.config import AuditConfig
from splitaudit.rows import flag_inversions
from splitaudit.runner import run_audit
from splitaudit.seeding import job_generator
from tests.conftest import write_tiny_npz


@pytest.fixture(scope="module")
def noise_audit(tmp_path_factory):
    """One audit of the tiny model's first conv under rising noise (shared by several tests)."""
    d = tmp_path_factory.mktemp("noise")
    npz = write_tiny_npz(d / "d.npz", n=400)
    cfg = AuditConfig(
        model="tests/tiny.py:build", data=str(npz), cuts=("stem",), profile="quick", seed=1, use_cache=False,
        defenses=("none", "noise:sigma=0.3", "noise:sigma=1", "noise:sigma=3"),
    )
    return run_audit(cfg)


def test_ssim_falls_as_sigma_rises(noise_audit):
    ssims = [noise_audit.headline("stem", d).ssim for d in noise_audit.defenses()[1:]]  # sigma 0.3, 1, 3
    assert ssims == sorted(ssims, reverse=True), ssims
    assert ssims[0] - ssims[-1] > 0.1
    none = noise_audit.headline("stem", "none")
    # Undefended leaks at least as much as the loudest noise; if a weaker noise level beats it, the
    # undefended row must carry the under-training flag rather than read as more private.
    assert none.ssim > ssims[-1]
    if none.ssim_ci[1] < ssims[0]:
        assert any("under-trained" in f for f in none.flags)


def test_undefended_row_is_flagged_when_a_defended_attacker_beats_it():
    rows = [_row("a", 0.5, (0.48, 0.52)), _row("a", 0.7, (0.68, 0.72), "noise:sigma=0.1,kind=gaussian")]
    rows = flag_inversions(rows)
    assert rows[0].flags and "under noise:sigma=0.1" in rows[0].flags[0]
    rows = [_row("a", 0.5, (0.48, 0.52)), _row("a", 0.7, (0.68, 0.72), "dpsgd:epsilon=8")]
    rows = flag_inversions(rows)  # a fine-tuned model is another model: no comparison
    assert not rows[0].flags


def test_adaptive_attacker_does_at_least_as_well_as_the_naive_one_on_noise(noise_audit):
    for d in noise_audit.defenses()[1:]:
        adaptive = next(r for r in noise_audit.rows(defense=d) if r.adaptive)
        naive = next(r for r in noise_audit.rows(defense=d) if not r.adaptive)
        assert adaptive.ssim >= naive.ssim - 0.01, (d, adaptive.ssim, naive.ssim)
        assert noise_audit.headline("stem", d).ssim == max(adaptive.ssim, naive.ssim)


def test_defense_latency_is_measured_not_assumed(noise_audit):
    none = noise_audit.headline("stem", "none")
    assert none.latency_overhead_ms == 0
    noisy = noise_audit.rows(defense="noise:sigma=3,kind=gaussian")
    assert all(r.latency_ms > 0 and r.latency_overhead_ms != 0 for r in noisy)
    assert all(r.latency_ms_b64 is not None and r.latency_ms_b64 > 0 for r in noisy)
    assert noise_audit.environment["threads"] >= 1


def test_noise_costs_accuracy_and_agreement(noise_audit):
    none = noise_audit.headline("stem", "none")
    loud = noise_audit.headline("stem", "noise:sigma=3,kind=gaussian")
    assert none.agreement == 1.0
    assert loud.agreement < 1.0


def test_job_generator_depends_on_the_job_not_the_order():
    a = torch.rand(3, generator=job_generator(0, "conv1", "none", "decoder"))
    b = torch.rand(3, generator=job_generator(0, "conv1", "none", "decoder"))
    c = torch.rand(3, generator=job_generator(0, "conv2", "none", "decoder"))
    d = torch.rand(3, generator=job_generator(1, "conv1", "none", "decoder"))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def _row(cut, ssim, ci, defense="none"):
    return ResultRow(cut=cut, defense=defense, attack="decoder", adaptive=False, ssim=ssim, ssim_ci=ci, psnr=20.0,
                     psnr_ci=(19.0, 21.0), baseline_ssim=0.1, n_eval=100)


def test_a_cut_that_leaks_less_than_a_deeper_one_is_flagged():
    rows = [_row("a", 0.5, (0.48, 0.52)), _row("b", 0.7, (0.68, 0.72)), _row("c", 0.51, (0.49, 0.53))]
    rows = flag_inversions(rows)
    assert rows[0].flags and "deeper cut b" in rows[0].flags[0]
    assert not rows[1].flags and not rows[2].flags
    # overlapping intervals are not flagged, and noise rows are never compared across cuts
    rows = [_row("a", 0.5, (0.4, 0.6)), _row("b", 0.55, (0.5, 0.6))]
    noisy = [_row("a", 0.2, (0.19, 0.21), "noise:sigma=1"), _row("b", 0.7, (0.69, 0.71), "noise:sigma=1")]
    rows = flag_inversions(rows)
    noisy = flag_inversions(noisy)
    assert not any(r.flags for r in rows + noisy)
    # Quantization at different cuts, and NoPeek's per-cut models, are not ordered either; DP-SGD's
    # one fine-tuned model is.
    for spec in ("quant:bits=4", "nopeek:weight=1"):
        other = [_row("a", 0.2, (0.19, 0.21), spec), _row("b", 0.7, (0.69, 0.71), spec)]
        other = flag_inversions(other)
        assert not any(r.flags for r in other), spec
    dp = [_row("a", 0.2, (0.19, 0.21), "dpsgd:epsilon=8"), _row("b", 0.7, (0.69, 0.71), "dpsgd:epsilon=8")]
    dp = flag_inversions(dp)
    assert dp[0].flags


def test_attacker_knowledge_options_are_recorded_and_weaken_the_attack(tmp_path):
    npz = write_tiny_npz(tmp_path / "d.npz", n=300)
    other = write_tiny_npz(tmp_path / "other.npz", n=300, seed=5)
    base = dict(model="tests/tiny.py:build", data=str(npz), cuts=("fc",), profile="quick", use_cache=False)
    same = run_audit(AuditConfig(**base))
    ood = run_audit(AuditConfig(**base, aux_data=str(other)))
    noise = run_audit(AuditConfig(**base, aux_queries="noise"))
    assert "disjoint" in same.data["attacker_aux"]
    assert "another distribution" in ood.data["attacker_aux"] and ood.data["aux_data"] == str(other)
    assert "random inputs" in noise.data["attacker_aux"]
    # At a deep cut, random queries teach the decoder far less about real images than real aux images
    # do (at the first conv they can be enough: a near-linear layer is inverted from any inputs).
    assert noise.headline("fc", "none").ssim < same.headline("fc", "none").ssim - 0.2


def test_aux_data_must_match_the_input_shape(tmp_path):
    import numpy as np

    from splitaudit.errors import DataError

    npz = write_tiny_npz(tmp_path / "d.npz", n=100)
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, x=np.zeros((50, 3, 12, 12), np.uint8))
    with pytest.raises(DataError, match="shape"):
        run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), aux_data=str(rgb), profile="quick", use_cache=False))


def test_fine_tuning_beside_the_attack_jobs_is_reproducible(tmp_path):
    """DP-SGD and NoPeek fine-tune on a thread of their own while the attack jobs run, and a model with
    dropout draws from torch's global generator while doing so: two runs still agree to the last
    digit, and every fine-tuned row has its utility, its info and a latency measured after the jobs."""
    npz = write_tiny_npz(tmp_path / "d.npz", n=240)
    cfg = AuditConfig(model="tests/tiny.py:build_with_dropout", data=str(npz), cuts=("stem", "block"), profile="quick", seed=2,
                      use_cache=False, defenses=("none", "dpsgd:epsilon=8", "nopeek:weight=1"), device="cpu", workers=2)
    a, b = run_audit(cfg), run_audit(cfg)

    def key(r):
        return (r.cut, r.defense, r.adaptive, r.ssim, r.psnr, r.accuracy, r.agreement, r.epsilon)

    assert [key(r) for r in a.results] == [key(r) for r in b.results]
    tuned = [r for r in a.results if r.defense != "none"]
    assert len(tuned) == 8  # 2 cuts x 2 defenses x (adaptive, naive)
    assert all(r.status == "ok" and r.accuracy is not None and r.latency_ms is not None and r.latency_ms > 0 for r in tuned)
    assert all(r.epsilon is not None and 0 < r.epsilon <= 8.5 for r in tuned if r.defense.startswith("dpsgd"))
    assert {r.defense_info["cut"] for r in tuned if r.defense.startswith("nopeek")} == {"stem", "block"}


@pytest.mark.parametrize("attack", ["decoder", "rmle"])
def test_a_failed_fine_tuning_fails_only_its_own_rows(tmp_path, monkeypatch, attack):
    """The undefended attacker also scores on the fine-tuned model's activations; when that model
    never comes, its rows say why and every other row keeps its numbers (a refined or a fitted attack)."""
    from splitaudit.prepared import PreparedModels

    def crash(*args, **kwargs):
        raise RuntimeError("fine-tuning crashed")

    monkeypatch.setattr(PreparedModels, "_fine_tune", crash)
    npz = write_tiny_npz(tmp_path / "d.npz", n=240)
    res = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",), profile="quick", use_cache=False,
                                defenses=("none", "noise:sigma=1", "dpsgd:epsilon=8"), attacks=(attack,), device="cpu"))
    dp = [r for r in res.results if r.defense.startswith("dpsgd")]
    others = [r for r in res.results if not r.defense.startswith("dpsgd")]
    assert dp and all(r.status != "ok" and "fine-tuning crashed" in r.error for r in dp)
    assert others and all(r.status == "ok" for r in others), [(r.defense, r.adaptive, r.error) for r in others]
    assert all(r.latency_ms is None for r in dp) and all(r.latency_ms is not None for r in others)


def test_a_defense_list_without_none_gets_the_undefended_baseline(tmp_path):
    npz = write_tiny_npz(tmp_path / "d.npz", n=100)
    result = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",), defenses=("noise:sigma=1",),
                                   profile="quick", use_cache=False))
    by = {(r.defense, r.adaptive): r for r in result.results}
    assert set(by) == {("none", False), ("noise:sigma=1,kind=gaussian", False), ("noise:sigma=1,kind=gaussian", True)}
    assert all(r.status == "ok" for r in result.results)
    assert any("defense 'none' added" in n for n in result.notes)


def test_a_defense_the_model_rejects_leaves_the_others_their_utility(tmp_path):
    import dataclasses

    import torch.nn.functional as F

    from splitaudit.defenses.base import DEFENSES, Defense, register_defense

    @dataclasses.dataclass(frozen=True)
    class _Cfg:
        pass

    @register_defense("halvefortest")
    class _Halve(Defense):  # pools the activation 2x: the tail cannot take it
        Config = _Cfg
        transforms_activation = True

        def transform(self, z, state, *, generator):
            return F.avg_pool2d(z, 2)

    try:
        npz = write_tiny_npz(tmp_path / "d.npz", n=100)
        result = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",),
                                       defenses=("none", "noise:sigma=1", "halvefortest"), profile="quick", use_cache=False))
    finally:
        DEFENSES.pop("halvefortest", None)
    by = {r.defense.split(":")[0]: r for r in result.results if not r.adaptive}
    assert by["none"].accuracy is not None and by["none"].agreement == 1.0
    assert by["noise"].accuracy is not None and by["noise"].agreement is not None
    assert by["halvefortest"].accuracy is None and any("accuracy not measured" in n for n in result.notes)
