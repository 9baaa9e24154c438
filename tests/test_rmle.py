"""The white-box rMLE attack (attacks/optimization.py) and worst-case selection across attacks."""

import functools
import math

import pytest
import torch

from splitaudit.attacks import AttackContext, make_attack
from splitaudit.attacks.optimization import total_variation
from splitaudit.cuts import capture, head_forward
from splitaudit.errors import SpecError
from splitaudit.metrics import ssim
from splitaudit.results import AuditResult, CutInfo, ResultRow
from tests.tiny import TinyNet, smooth_images, white_box_setup


@pytest.fixture(scope="module")
def setup():
    return white_box_setup(96, 48)


def _fit(model, cut, x_aux, params):
    z_aux = capture(model, cut, x_aux)
    attack = make_attack("rmle", profile="quick", params=params)
    ctx = AttackContext(
        input_shape=(1, 12, 12), act_shape=tuple(z_aux.shape[1:]), profile="quick",
        generator=torch.Generator().manual_seed(1), head=functools.partial(head_forward, model, cut),
    )
    return attack, attack.fit(z_aux, x_aux, ctx)


def test_rmle_at_the_first_layer_beats_the_mean_image_and_leaves_the_weights_alone(setup):
    model, x_aux, x_eval = setup
    attack, report = _fit(model, "stem", x_aux, {"iterations": 20, "select": 16})
    with torch.no_grad():  # the runner may score under no_grad: reconstruct must turn gradients on itself
        rec = attack.reconstruct(capture(model, "stem", x_eval), batch_size=32)  # chunked
    prior = x_aux.mean(0, keepdim=True).expand_as(x_eval)
    assert rec.shape == x_eval.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    assert float(ssim(rec, x_eval).mean()) > float(ssim(prior, x_eval).mean()) + 0.3
    assert report.converged and report.val_loss < 0.5 * report.baseline_loss
    assert any(n.startswith("lambda=") for n in report.notes)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is False


def test_rmle_runs_at_a_vector_cut(setup):
    model, x_aux, x_eval = setup
    attack, report = _fit(model, "fc", x_aux, {"iterations": 5, "select": 8})
    rec = attack.reconstruct(capture(model, "fc", x_eval[:8]))
    assert rec.shape == (8, 1, 12, 12) and torch.isfinite(rec).all()
    assert math.isfinite(report.val_loss)


def test_rmle_is_deterministic_and_keeps_the_best_restart(setup):
    model, x_aux, x_eval = setup
    z = capture(model, "stem", x_eval[:8])
    one, _ = _fit(model, "stem", x_aux, {"iterations": 3, "select": 4, "tv": 0.01, "restarts": 0})
    two, _ = _fit(model, "stem", x_aux, {"iterations": 3, "select": 4, "tv": 0.01, "restarts": 2})
    assert torch.equal(two.reconstruct(z), two.reconstruct(z))

    def objective(attack, x):
        with torch.no_grad():
            return attack._objective(x, z, torch.full((8,), 0.01))

    # The first run of both starts from the same point, so extra restarts can only lower each sample's objective.
    assert torch.all(objective(two, two.reconstruct(z)) <= objective(one, one.reconstruct(z)) + 1e-6)


def test_rmle_notes_a_head_whose_output_depends_on_the_batch():
    torch.manual_seed(0)
    model = TinyNet()
    x = smooth_images(8, torch.Generator().manual_seed(0))
    z = capture(model, "block", x)  # leaves the model in eval mode
    model.train()  # BatchNorm on batch statistics: samples are coupled
    attack = make_attack("rmle", profile="quick", params={"iterations": 1, "select": 2, "tv": 0.0})
    ctx = AttackContext((1, 12, 12), tuple(z.shape[1:]), "quick", torch.Generator().manual_seed(0),
                        head=functools.partial(head_forward, model, "block"))
    assert any("training mode" in n for n in attack.fit(z, x, ctx).notes)


def test_rmle_needs_the_head_and_a_fit():
    attack = make_attack("rmle", profile="quick")
    assert attack.white_box and attack.needs_fit and not attack.warm_start  # declared: refitted per defense, never refined
    with pytest.raises(RuntimeError, match="fit"):
        attack.reconstruct(torch.zeros(2, 4))
    ctx = AttackContext((1, 12, 12), (4,), "quick", torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="white-box"):
        attack.fit(torch.zeros(4, 4), torch.zeros(4, 1, 12, 12), ctx)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"iterations": -1}, r"iterations=-1 is out of range; allowed: \[0, 100000\]"),
        ({"tv": -0.5}, r"tv=-0.5 is out of range; allowed: -1"),
        ({"lr": "fast"}, r"lr='fast' is not a float"),
        ({"steps": 3}, r"unknown key 'steps' \(allowed keys: iterations, lr, restarts, tv, select, batch_size\)"),
        ({"batch_size": -1}, r"batch_size=-1 is out of range"),
    ],
)
def test_rmle_config_is_validated(params, match):
    with pytest.raises(SpecError, match=match):
        make_attack("rmle", params=params)


def test_total_variation_is_zero_on_flat_images_and_works_at_any_size():
    assert torch.allclose(total_variation(torch.full((2, 3, 5, 7), 0.4)), torch.zeros(2))
    assert total_variation(torch.rand(1, 1, 1, 1)).item() == 0
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 1
    assert total_variation(edge).item() > 0.2


def _row(attack, ssim_value, *, adaptive=False, status="ok", defense="none", cut="conv1"):
    return ResultRow(
        cut=cut, defense=defense, attack=attack, adaptive=adaptive, ssim=ssim_value, ssim_ci=(ssim_value - 0.01, ssim_value + 0.01),
        psnr=20.0, psnr_ci=(19.0, 21.0), baseline_ssim=0.1, n_eval=1000, status=status,
    )


def test_headline_is_the_strongest_attack_and_ignores_failed_rows():
    rows = (
        _row("decoder", 0.62),
        _row("rmle", 0.81),
        _row("decoder", 0.40, defense="noise:sigma=1"),
        _row("decoder", 0.55, defense="noise:sigma=1", adaptive=True),
        _row("rmle", 0.97, defense="noise:sigma=1", status="failed"),  # a failed row never wins
        _row("rmle", 0.30, defense="noise:sigma=1"),
        _row("rmle", 0.99, cut="conv2", status="failed"),
    )
    cuts = (
        CutInfo(name="conv1", shape=(6, 28, 28), bytes_per_sample=18816, head_flops=1, head_latency_ms=0.1),
        CutInfo(name="conv2", shape=(16, 10, 10), bytes_per_sample=6400, head_flops=1, head_latency_ms=0.1),
    )
    result = AuditResult(created="2026-01-01T00:00:00+00:00", seed=0, model={"spec": "m"}, data={"spec": "d"}, environment={},
                         cuts=cuts, results=rows)
    assert (result.headline("conv1", "none").attack, result.headline("conv1", "none").ssim) == ("rmle", 0.81)
    h = result.headline("conv1", "noise:sigma=1")
    assert (h.attack, h.adaptive, h.ssim) == ("decoder", True, 0.55)
    assert result.headline("conv2", "none") is None  # every attack failed: no number, not "private"
    assert "SSIM 0.810" in result.summary() and "(rmle)" in result.summary()
