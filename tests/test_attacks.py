import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.attacks import AttackContext, make_attack
from splitaudit.attacks.decoder import _standardizer
from splitaudit.attacks.image import InverseNet
from splitaudit.attacks.training import TrainConfig, train
from splitaudit.errors import SpecError
from splitaudit.metrics import ssim


@pytest.mark.parametrize("act_shape", [(6, 12, 12), (4, 6, 6), (8, 3, 3), (16, 24, 24), (40,), (2, 5)])
def test_inverse_net_maps_any_activation_to_the_input_shape(act_shape):
    net = InverseNet(act_shape, (3, 12, 12), width=16)
    y = net(torch.randn(2, *act_shape))
    assert y.shape == (2, 3, 12, 12)
    assert float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1


def test_standardizer_gives_unit_scale_and_keeps_dead_channels_at_zero():
    z = torch.randn(64, 3, 4, 4) * torch.tensor([1000.0, 1e-3, 0.0]).view(1, 3, 1, 1) + 5
    mean, std = _standardizer(z)
    zn = (z - mean) / std
    assert torch.allclose(zn[:, :2].std(dim=(0, 2, 3)), torch.ones(2), atol=0.05)
    assert torch.all(zn[:, 2] == 0)


def test_standardizer_treats_a_feature_negligible_next_to_the_others_as_dead():
    """A feature that is ~1e-7 everywhere (as in MiniLM's last block) must not blow noise up by 1e8."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, 6, generator=gen) * 0.3
    z[..., 0] = -1e-7 + 1e-8 * torch.randn(200, 8, generator=gen)  # near-constant, far below the others' scale
    z[..., 1] *= 1e-3  # small, but not negligible: kept
    mean, std = _standardizer(z)
    assert float(std[..., 0]) == 1.0 and float(std[..., 1]) < 1e-2
    noisy = z + 0.05 * torch.randn(z.shape, generator=gen)
    assert float(((noisy - mean) / std)[..., 0].abs().max()) < 1.0
    assert torch.allclose(((z - mean) / std)[..., 1:].std(dim=(0, 1)), torch.ones(5), atol=0.1)


def _images(n, gen):
    """Smooth random images (structured enough to be invertible from a linear map)."""
    base = torch.rand(n, 1, 4, 4, generator=gen)
    return F.interpolate(base, size=(12, 12), mode="bilinear", align_corners=False)


def test_decoder_inverts_an_invertible_head_and_beats_the_baseline():
    gen = torch.Generator().manual_seed(0)
    x_aux, x_eval = _images(400, gen), _images(100, gen)
    head = nn.Conv2d(1, 4, 3, padding=1)
    with torch.no_grad():
        z_aux, z_eval = head(x_aux) * 50 + 3, head(x_eval) * 50 + 3  # a scale Adam would hate unstandardized
    attack = make_attack("decoder", profile="quick", params={"epochs": 8, "width": 16})
    ctx = AttackContext(input_shape=(1, 12, 12), act_shape=(4, 12, 12), profile="quick", generator=torch.Generator().manual_seed(1))
    report = attack.fit(z_aux, x_aux, ctx)
    rec = attack.reconstruct(z_eval)
    prior = x_aux.mean(0, keepdim=True).expand_as(x_eval)
    assert report.converged and report.val_loss < report.baseline_loss
    assert float(ssim(rec, x_eval).mean()) > float(ssim(prior, x_eval).mean()) + 0.3


def test_decoder_flags_an_attack_that_cannot_beat_the_prior():
    gen = torch.Generator().manual_seed(0)
    x = _images(200, gen)
    z = torch.randn(200, 8, generator=gen)  # independent of x: nothing to learn
    attack = make_attack("decoder", profile="quick", params={"epochs": 2, "width": 16, "restarts": 1})
    report = attack.fit(z, x, AttackContext((1, 12, 12), (8,), "quick", torch.Generator().manual_seed(0)))
    assert report.restarts == 1  # it was retried from a new initialization
    assert report.val_loss > 0.9 * report.baseline_loss
    assert any("does not beat the no-information guess" in n for n in report.notes)
    # Two starts that both fail to beat the guess are a finding: converged, and the report says which.
    assert report.converged and attack.prior_outcome == "not beaten after a restart"
    # One start alone says nothing yet: a decoder that never beat the guess is not converged.
    single = make_attack("decoder", profile="quick", params={"epochs": 2, "width": 16, "restarts": 0})
    rep1 = single.fit(z, x, AttackContext((1, 12, 12), (8,), "quick", torch.Generator().manual_seed(0)))
    assert not rep1.converged and single.prior_outcome == "not beaten, no restart"


def test_decoder_config_is_validated():
    with pytest.raises(SpecError, match="allowed"):
        make_attack("decoder", params={"lr": "-1"})
    with pytest.raises(SpecError, match="allowed keys"):
        make_attack("decoder", params={"depth": "3"})


def test_train_keeps_the_best_checkpoint_and_stops_early():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = x @ torch.tensor([[1.0], [2.0], [-1.0]])
    model = nn.Linear(3, 1)
    seen = []
    res = train(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y), config=TrainConfig(epochs=200, lr=0.05, patience=3),
                generator=gen, val_data=(x, y), on_epoch=lambda ep, tr, va: seen.append(va))
    assert res.epochs_run < 200  # early stopping fired
    assert math.isclose(res.best_val, min(seen), rel_tol=1e-9)
    final = float(F.mse_loss(model(x), y))
    assert math.isclose(final, res.best_val, rel_tol=1e-5)  # the best checkpoint is what the model holds


def test_train_reports_divergence():
    x = torch.randn(16, 2)
    model = nn.Linear(2, 1)
    res = train(model, lambda m, b: m(b[0]).sum() * float("nan"), (x,), config=TrainConfig(epochs=3), generator=torch.Generator().manual_seed(0))
    assert res.diverged


def test_training_is_reproducible_with_the_same_generator():
    def run(seed):
        torch.manual_seed(123)  # same init
        m = nn.Linear(3, 1)
        x = torch.randn(50, 3, generator=torch.Generator().manual_seed(9))
        train(m, lambda mm, b: mm(b[0]).pow(2).mean(), (x,), config=TrainConfig(epochs=2, batch_size=8), generator=torch.Generator().manual_seed(seed))
        return m.weight.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("kernel", [True, False], ids=["fused kernel stepped directly", "fallback: torch.optim"])
def test_training_steps_adam_as_torch_adam_does(kernel, monkeypatch):
    """The loop's Adam (the fused kernel stepped directly, or, without that torch internal, torch.optim's
    own) updates as torch.optim.Adam's default implementation does on the same batches, to float rounding."""
    from splitaudit import _torch_compat
    from splitaudit.attacks.training import _Shuffled

    if not kernel:
        monkeypatch.delattr(torch, "_fused_adam_")
    assert _torch_compat.has_fused_adam() == kernel
    made = []
    real = _torch_compat.adam
    monkeypatch.setattr("splitaudit.attacks.training.adam", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    torch.manual_seed(0)
    # No bias right before the BatchNorm: its gradient is rounding noise, which Adam scales up.
    ours = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    ref, start = copy.deepcopy(ours), copy.deepcopy(ours)
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(40, 2, 6, 6, generator=gen), torch.randn(40, 2, generator=gen))

    def loss(m, b):
        return F.mse_loss(m(b[0]), b[1])

    cfg = TrainConfig(epochs=3, lr=3e-3, batch_size=8, weight_decay=1e-4, patience=None, keep_best=False)
    train(ours, loss, data, config=cfg, generator=torch.Generator().manual_seed(2))
    (opt,) = made
    assert isinstance(opt, _torch_compat.FusedAdam) if kernel else (isinstance(opt, torch.optim.Adam) and not opt.defaults["fused"])

    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3, weight_decay=1e-4)  # foreach, not fused
    batches = _Shuffled(data, 8, torch.Generator().manual_seed(2))
    for _ in range(3):
        ref.train()
        for b in batches:
            ref_opt.zero_grad(set_to_none=True)
            loss(ref, b).backward()
            ref_opt.step()
    for (name, a), b, s0 in zip(ours.state_dict().items(), ref.state_dict().values(), start.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        if a.is_floating_point():
            assert not torch.equal(a, s0), name  # every weight and running statistic moved


def test_the_fused_kernel_stepped_directly_is_bitwise_torchs_fused_adam():
    from splitaudit._torch_compat import FusedAdam

    torch.manual_seed(0)
    a = nn.Linear(5, 3)
    b = copy.deepcopy(a)
    ours, theirs = FusedAdam(list(a.parameters()), lr=1e-2, weight_decay=1e-3), torch.optim.Adam(b.parameters(), lr=1e-2, weight_decay=1e-3, fused=True)
    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for m, o in ((a, ours), (b, theirs)):
            o.zero_grad(set_to_none=True)
            m(x).square().mean().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("act_shape", [(6, 28, 28), (16, 10, 10), (120,)])
def test_folded_decoder_reconstructs_as_the_decoder_does(act_shape):
    from splitaudit.attacks.decoder import _nhwc
    from splitaudit.attacks.image import folded as _folded

    torch.manual_seed(0)
    net = _nhwc(InverseNet(act_shape, (1, 28, 28), 32, bf16=False))  # float32: bf16's tolerance is test_decoder_shapes'
    for m in net.modules():  # running statistics and affine terms away from their initial values
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    net.eval()
    folded = _folded(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.head.modules())
    z = torch.randn(7, *act_shape)
    with torch.no_grad():
        torch.testing.assert_close(folded(z), net(z), rtol=1e-5, atol=1e-6)


def test_the_one_cycle_schedule_rises_peaks_and_decays_with_beta1_the_other_way():
    from splitaudit._torch_compat import FusedAdam
    from splitaudit.attacks.training import TrainConfig, _schedule, _set_lr

    rate = _schedule(TrainConfig(lr=1e-2, schedule="onecycle"), 100)
    lrs, betas = zip(*(rate(i) for i in range(101)))
    assert lrs[0] == pytest.approx(1e-2 / 25) and betas[0] == pytest.approx(0.95)
    assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 15 and betas[15] == pytest.approx(0.85)
    assert lrs[100] == pytest.approx(1e-6) and betas[100] == pytest.approx(0.95)
    assert all(a <= b for a, b in zip(lrs[:15], lrs[1:16])) and all(a >= b for a, b in zip(lrs[15:], lrs[16:]))
    assert _schedule(TrainConfig(), 100) is None
    with pytest.raises(ValueError, match="schedule"):
        _schedule(TrainConfig(schedule="cosine"), 100)
    p = torch.nn.Parameter(torch.zeros(2))
    for opt in (FusedAdam([p], lr=1.0), torch.optim.Adam([p], lr=1.0)):
        _set_lr(opt, 0.5, 0.9)
        got = (opt.lr, opt.betas) if isinstance(opt, FusedAdam) else (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"])
        assert got == (0.5, (0.9, 0.999))


def test_zero_linear_starts_at_zero_under_build_module():
    from splitaudit.attacks.base import ZeroLinear, build_module

    net = build_module(lambda: torch.nn.Sequential(torch.nn.Linear(4, 4), ZeroLinear(4, 3)), torch.Generator().manual_seed(0))
    assert net[0].weight.abs().sum() > 0
    assert net[1].weight.abs().sum() == 0 and net[1].bias.abs().sum() == 0
