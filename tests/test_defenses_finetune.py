"""The model-changing defenses: DP-SGD through Opacus and NoPeek's distance-correlation penalty."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from splitaudit.attacks.training import TrainConfig, train
from splitaudit.cuts import capture, discover_cuts
from splitaudit.errors import UserError
from splitaudit.defenses import PrepareContext, make_defense
from splitaudit.defenses.dpsgd import fix_model
from splitaudit.defenses.nopeek import distance_correlation
from tests.conftest import write_tiny_npz
from tests.tiny import TinyNet


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Distance correlation: a pure function, checked against a direct transcription of Székely et al.


def _dcor_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Székely, Rizzo & Bakirov (2007), eqs. 2.8-2.10, with explicit loops (float64)."""
    n = x.shape[0]
    a = np.array([[np.linalg.norm(x[k] - x[l]) for l in range(n)] for k in range(n)])
    b = np.array([[np.linalg.norm(y[k] - y[l]) for l in range(n)] for k in range(n)])
    A = a - a.mean(axis=0, keepdims=True) - a.mean(axis=1, keepdims=True) + a.mean()
    B = b - b.mean(axis=0, keepdims=True) - b.mean(axis=1, keepdims=True) + b.mean()
    dcov2, dvx, dvy = (A * B).mean(), (A * A).mean(), (B * B).mean()
    return float(np.sqrt(dcov2 / np.sqrt(dvx * dvy)))


def test_distance_correlation_matches_the_reference():
    x = torch.randn(24, 5, generator=_gen(0))
    y = torch.tanh(x[:, :3]) + 0.5 * torch.randn(24, 3, generator=_gen(1))
    got = float(distance_correlation(x, y))
    assert got == pytest.approx(_dcor_reference(x.double().numpy(), y.double().numpy()), abs=1e-4)
    assert 0.2 < got < 0.99  # dependent but not a similarity transform


def test_distance_correlation_extremes():
    x = torch.randn(500, 2, generator=_gen(2))
    assert float(distance_correlation(x, x)) == pytest.approx(1.0, abs=1e-4)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)  # similarity transform
    # Independent samples: small, not zero (the V-statistic is biased upward, about 0.12 at n=500).
    independent = float(distance_correlation(x, torch.randn(500, 2, generator=_gen(3))))
    assert 0.0 <= independent < 0.2
    assert float(distance_correlation(x, x**2)) > 2 * independent  # uncorrelated, yet dependent: dCor sees it
    assert float(distance_correlation(x, torch.ones(500, 4))) < 1e-3  # a constant side carries nothing
    images = torch.rand(64, 1, 8, 8, generator=_gen(4))  # any shape: flattened per sample
    assert float(distance_correlation(images, F.relu(images - 0.5))) <= 1.0


def test_distance_correlation_gradient_is_finite_on_repeated_rows():
    z = torch.randn(32, 50, generator=_gen(5))
    z[1] = z[0]
    z[2:4] = 0.0
    z.requires_grad_(True)
    distance_correlation(torch.randn(32, 10, generator=_gen(6)), z).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# Fine-tuning on the tiny residual net with BatchNorm.


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: a second intra-op thread only adds contention on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TinyNet trained briefly on the tiny data, and a PrepareContext over its splits."""
    data = np.load(write_tiny_npz(tmp_path_factory.mktemp("ft") / "d.npz", n=240))
    x = torch.from_numpy(data["x"]).float()[:, None]
    y = torch.from_numpy(data["y"]).long()
    torch.manual_seed(0)
    model = TinyNet()
    train(model, lambda net, b: F.cross_entropy(net(b[0]), b[1]), (x[:160], y[:160]),
          config=TrainConfig(epochs=8, lr=1e-2, batch_size=32, patience=None), generator=_gen(0))
    ctx = PrepareContext(x_train=x[:160], y_train=y[:160], x_eval=x[160:], y_eval=y[160:], profile="quick", generator=_gen(1))
    return model.eval(), ctx


@pytest.fixture(scope="module")
def dpsgd_change(tiny):
    model, ctx = tiny
    return make_defense("dpsgd:epsilon=4,epochs=2").prepare_model(copy.deepcopy(model), cut=None, ctx=ctx)


def test_dpsgd_reports_an_epsilon_close_to_and_within_the_budget(dpsgd_change):
    info = dpsgd_change.info
    assert 3.6 <= info["epsilon"] <= 4.0
    assert info["delta"] == 1e-5 and info["epochs"] == 2
    assert 0.0 <= info["accuracy_before"] <= 1.0 and 0.0 <= info["accuracy_after"] <= 1.0
    assert info["train_seconds"] > 0
    assert "not what an activation reveals about an inference input" in info["note"]
    assert "fine-tuning" in info["epsilon_scope"]


def test_dpsgd_swaps_batchnorm_and_keeps_every_cut_name(tiny, dpsgd_change):
    model, ctx = tiny
    assert dpsgd_change.info["changed_layers"] == [{"name": "block.bn", "from": "BatchNorm2d", "to": "GroupNorm"}]
    tuned = dpsgd_change.model
    assert type(tuned) is TinyNet and not tuned.training
    assert [n for n, _ in tuned.named_modules()] == [n for n, _ in model.named_modules()]
    assert discover_cuts(tuned, ctx.x_eval[:2]).names() == discover_cuts(model, ctx.x_eval[:2]).names()
    assert capture(tuned, "block", ctx.x_eval).shape == (80, 4, 12, 12)
    # A plain module: no Opacus hooks or per-sample gradients left behind, and the original untouched.
    assert not any(m._forward_hooks or m._backward_hooks for m in tuned.modules())
    assert not any(hasattr(p, "grad_sample") for p in tuned.parameters())
    assert isinstance(model.block.bn, torch.nn.BatchNorm2d)
    assert not torch.equal(tuned.stem.weight, model.stem.weight)  # it did train


def test_dpsgd_fixes_norm_layers_that_opacus_skips():
    """Opacus fixes only trainable modules; a BatchNorm without affine parameters still mixes a batch."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4, affine=False), torch.nn.InstanceNorm2d(4, track_running_stats=True)
    )
    fixed, changed = fix_model(model)
    assert [c["name"] for c in changed] == ["1", "2"]
    assert changed[0]["to"] == "GroupNorm" and "track_running_stats=False" in changed[1]["to"]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # the input is left alone


def test_dpsgd_is_reproducible_and_reloads_from_state(tiny, dpsgd_change):
    model, ctx = tiny
    ctx2 = replace(ctx, generator=_gen(1))
    first = make_defense("dpsgd:epsilon=4,epochs=2").prepare_model(copy.deepcopy(model), cut=None, ctx=ctx2)
    second = make_defense("dpsgd:epsilon=4,epochs=2").prepare_model(copy.deepcopy(model), cut=None, ctx=replace(ctx, generator=_gen(1)))
    assert torch.equal(first.model(ctx.x_eval), second.model(ctx.x_eval))  # same seed, same model

    state = {k: v.clone() for k, v in dpsgd_change.model.state_dict().items()}
    reloaded = make_defense("dpsgd:epsilon=4,epochs=2").prepare_model(copy.deepcopy(model), cut=None, ctx=ctx, state=state)
    assert torch.equal(reloaded.model(ctx.x_eval), dpsgd_change.model(ctx.x_eval))
    assert reloaded.info["changed_layers"] == dpsgd_change.info["changed_layers"]
    assert not reloaded.model.training


@pytest.mark.parametrize("spec", ["dpsgd", "nopeek"])
def test_finetuning_needs_labels(tiny, spec):
    model, ctx = tiny
    unlabelled = replace(ctx, y_train=None, y_eval=None)
    with pytest.raises(UserError, match="no labels"):
        make_defense(spec).prepare_model(copy.deepcopy(model), cut="block", ctx=unlabelled)


def test_nopeek_lowers_distance_correlation_at_the_cut(tiny):
    model, ctx = tiny
    changes = {
        w: make_defense(f"nopeek:weight={w},epochs=15").prepare_model(
            copy.deepcopy(model), cut="block", ctx=replace(ctx, generator=_gen(2))
        )
        for w in (0, 5)
    }
    plain, penalized = changes[0].info, changes[5].info
    assert plain["dcor_before"] == penalized["dcor_before"] > 0.9
    assert penalized["dcor_after"] < penalized["dcor_before"] - 0.02
    assert penalized["dcor_after"] < plain["dcor_after"] - 0.02  # the penalty, not the fine-tuning, did it
    measured = float(distance_correlation(ctx.x_eval, capture(changes[5].model, "block", ctx.x_eval)))
    assert measured == pytest.approx(penalized["dcor_after"], abs=1e-4)
    assert penalized["accuracy_after"] is not None and penalized["train_seconds"] > 0
    assert not changes[5].model.training
    assert not any(m._forward_hooks for m in changes[5].model.modules())  # the capture hook is gone

    state = {k: v.clone() for k, v in changes[5].model.state_dict().items()}
    reloaded = make_defense("nopeek:weight=5,epochs=15").prepare_model(copy.deepcopy(model), cut="block", ctx=ctx, state=state)
    assert torch.equal(reloaded.model(ctx.x_eval), changes[5].model(ctx.x_eval))


def test_nopeek_is_prepared_per_cut():
    defense = make_defense("nopeek")
    assert defense.changes_model and defense.per_cut_model
    assert make_defense("dpsgd").changes_model and not make_defense("dpsgd").per_cut_model


def test_canonical_specs_carry_every_value():
    assert make_defense("dpsgd:epsilon=8").spec.startswith("dpsgd:epsilon=8,delta=1e-05,epochs=")
    assert make_defense("nopeek:weight=0.5").spec.startswith("nopeek:weight=0.5,epochs=")


@pytest.mark.slow
def test_audit_rows_carry_epsilon_and_the_swapped_layers(tmp_path):
    from splitaudit.runner import AuditConfig, run_audit

    npz = write_tiny_npz(tmp_path / "d.npz", n=300)
    result = run_audit(AuditConfig(
        model="tests/tiny.py:build", data=str(npz), cuts=("block.bn", "block"), profile="quick", use_cache=False,
        defenses=("none", "dpsgd:epsilon=2", "nopeek:weight=1"),
    ))
    dp_rows = [r for r in result.results if r.defense.startswith("dpsgd")]
    assert {(r.cut, r.adaptive) for r in dp_rows} == {(c, a) for c in ("block.bn", "block") for a in (True, False)}
    assert all(0 < r.epsilon <= 2 and r.delta == 1e-5 for r in dp_rows)
    assert dp_rows[0].defense_info["changed_layers"] == [{"name": "block.bn", "from": "BatchNorm2d", "to": "GroupNorm"}]
    nopeek_cuts = {r.defense_info["cut"] for r in result.results if r.defense.startswith("nopeek")}
    assert nopeek_cuts == {"block.bn", "block"}  # one fine-tuned model per cut
    assert all(r.epsilon is None for r in result.results if not r.defense.startswith("dpsgd"))
