"""The image decoder for every pair of activation and input shapes (issue 17): it builds, returns exactly
the input's shape in [0, 1], and trains; it places a map on the input's grid where the head put it; and on
small invertible heads it trains no worse than a plain mirror of the head (He et al. 2019's inverse network:
transposed convolutions with the head's own kernels and strides), which needs the architecture that the
default, black-box attacker does not have."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.attacks.decoder import _standardizer
from splitaudit.attacks.image import ImageModality, InverseNet, _stride, folded
from splitaudit.attacks.training import TrainConfig, evaluate, train

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
SHAPES = [  # (activation, input): what makes each one different
    ((8, 24, 24), MNIST),  # an unpadded 5x5 conv (He et al.'s conv1)
    ((6, 28, 28), MNIST),  # a padded conv, at the input's size
    ((16, 8, 8), MNIST),  # conv, pool, unpadded conv (He et al.'s ReLU2)
    ((16, 4, 4), MNIST),  # and a pool after it
    ((16, 10, 10), MNIST),  # builtin:lenet's relu2
    ((4, 7, 7), MNIST),  # stride 4
    ((8, 13, 13), MNIST),  # a strided unpadded 3x3 conv
    ((2, 56, 56), MNIST),  # larger than the input (an upsampling head)
    ((3, 30, 30), MNIST),  # a little larger (a conv with more padding than its kernel needs)
    ((1, 28, 28), MNIST),  # one channel
    ((256, 7, 7), MNIST),  # wide
    ((256, 2, 2), MNIST),  # wide and nearly global
    ((4, 28, 7), MNIST),  # strided along one axis only
    ((120,), MNIST),  # a vector
    ((5, 12), MNIST),  # a sequence of vectors
    ((8, 21, 21), (1, 25, 25)),  # an odd input, unpadded 5x5
    ((8, 13, 13), (1, 25, 25)),  # an odd input, stride 2
    ((32, 15, 15), CIFAR),  # RGB, a strided 3x3 conv
    ((64, 8, 8), CIFAR),
    ((10,), CIFAR),  # logits
    ((6, 12, 12), (3, 12, 12)),  # a small input
    ((8, 3, 3), (1, 11, 13)),  # a non-square odd input
]


def _ids(pair):
    return "x".join(map(str, pair[0])) + "-from-" + "x".join(map(str, pair[1]))


@pytest.mark.parametrize("full_res", [False, True], ids=["half", "full"])
@pytest.mark.parametrize("shapes", SHAPES, ids=[_ids(p) for p in SHAPES])
def test_the_decoder_builds_returns_the_inputs_shape_in_unit_range_and_trains(shapes, full_res):
    act_shape, input_shape = shapes
    torch.manual_seed(0)
    net = ImageModality().decoder(act_shape, input_shape, width=16, full_res=full_res).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    z, x = torch.randn(8, *act_shape, generator=g), torch.rand(8, *input_shape, generator=g)
    y = net(z)
    assert y.shape == (8, *input_shape)
    assert float(y.detach().min()) >= 0 and float(y.detach().max()) <= 1
    u = net.fold(z)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):  # a fixed batch: the loss must fall
        opt.zero_grad()
        loss = ImageModality.reconstruction_loss(net.decode(u), x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    net.eval()
    with torch.no_grad():  # BatchNorm folded for inference gives the same images: in float32 up to its rounding,
        # and under bfloat16 autocast (where the CPU has it) up to bfloat16's (8 bits of mantissa)
        for bf16, tol in ((False, {"rtol": 1e-4, "atol": 1e-5}), (True, {"rtol": 0.0, "atol": 2e-2})):
            net.bf16 = bf16
            torch.testing.assert_close(folded(net)(z), net(z), **tol)


@pytest.mark.parametrize(("n_in", "n_act", "stride"), [
    (28, 24, 1), (28, 28, 1), (28, 30, 1), (28, 8, 2), (28, 10, 2), (28, 13, 2), (28, 14, 2), (28, 4, 4), (28, 5, 4),
    (28, 7, 4), (28, 56, 0.5), (32, 15, 2), (32, 5, 4), (25, 21, 1),
])
def test_the_stride_is_guessed_from_the_two_sizes(n_in, n_act, stride):
    assert _stride(n_in, n_act) == stride


def test_an_unpadded_conv_map_sits_at_the_centre_of_the_input_grid():
    """He et al.'s conv1: 24x24 from 28x28 is the valid region, two pixels in from every side."""
    z = torch.randn(2, 8, 24, 24) + 5
    full = InverseNet((8, 24, 24), MNIST, 16, full_res=True)
    assert full.r == 1
    u = full.fold(z)
    assert u.shape == (2, 8, 28, 28)
    assert torch.equal(u[..., 2:26, 2:26], z)
    assert float(u.abs().sum()) == pytest.approx(float(z.abs().sum()))  # zeros around it
    # At half resolution the same placement, folded 2x2 into channels: nothing is resampled away.
    half = InverseNet((8, 24, 24), MNIST, 16)
    assert half.r == 2 and half.fold(z).shape == (2, 32, 14, 14)
    assert torch.equal(F.pixel_shuffle(half.fold(z), 2), u)


def test_a_coarse_map_is_upsampled_by_its_stride_not_stretched_to_the_grid():
    """He et al.'s pool2 (4x4, stride 4): padded to 7x7 and upsampled twice to 14x14 (the half-resolution
    grid), never interpolated from 4 to 14, which would misalign its cells by a different amount at each
    place (and a convolution is the same everywhere)."""
    net = InverseNet((16, 4, 4), MNIST, 16)
    assert net.fold(torch.zeros(1, 16, 4, 4)).shape[-2:] == (7, 7)
    assert [m.size for m in net.up if isinstance(m, nn.Upsample)] == [(14, 14)]


# ------------------------------------------------------------------------------------------------
# Against a mirror of the head
# ------------------------------------------------------------------------------------------------
def _smooth_images(n: int, shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Digit-like test images: a few bright broken strokes on black, blurred (structure a decoder can learn)."""
    c, size, _ = shape
    x = torch.zeros(n, c, size, size)
    for _ in range(3):
        r = torch.randint(2, size - 2, (n, 2), generator=gen)
        x[torch.arange(n), :, r[:, 0], :] += (torch.rand(n, c, size, generator=gen) > 0.5).float()
        x[torch.arange(n), :, :, r[:, 1]] += (torch.rand(n, c, size, generator=gen) > 0.5).float()
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1)), 3, stride=1)
    return x.clamp(0, 1)


def _mirror(head: nn.Sequential, input_shape) -> nn.Sequential:
    """He et al.'s inverse network: the head's layers reversed, each conv (and pool) as a transposed conv
    with its kernel, stride and padding, ReLUs between them, and output padding where the head's floor
    dropped a row (every transposed conv returns the size its conv was given)."""
    shapes, x = [tuple(input_shape)], torch.zeros(1, *input_shape)
    for m in head:
        x = m(x)
        shapes.append(tuple(x.shape[1:]))
    layers: list[nn.Module] = []
    for i in reversed(range(len(head))):
        m, (c_to, *size_to), (c_from, *size_from) = head[i], shapes[i], shapes[i + 1]
        if isinstance(m, nn.Conv2d):
            k, s, p = m.kernel_size, m.stride, m.padding
        elif isinstance(m, nn.MaxPool2d):
            k, s, p = (m.kernel_size,) * 2, (m.stride,) * 2, (0, 0)
        else:
            continue
        pad = tuple(t - ((f - 1) * si - 2 * pi + ki) for t, f, si, pi, ki in zip(size_to, size_from, s, p, k))
        layers += [nn.ConvTranspose2d(c_from, c_to, k, s, p, output_padding=pad), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class _Plain(nn.Module):
    """A network trained on raw activations: ``fold`` is the identity, ``decode`` the network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def fold(self, z):
        return z

    def decode(self, u):
        return self.net(u)


def _loss(model, batch):
    """MSE; in eval mode on reconstructions clipped to [0, 1], as the audit scores them (the mirror's output is unbounded)."""
    u, x = batch
    y = model.decode(u)
    return F.mse_loss(y if model.training else y.clamp(0, 1), x)


def _val_mse_of(net_fold, z, x, *, epochs: int, seed: int) -> float:
    """Validation MSE after ``epochs`` of the one training loop, on activations standardized as the decoder
    attack standardizes them: the same data, order, budget and optimizer for every network compared."""
    n_val = z.shape[0] // 5
    mean, std = _standardizer(z[n_val:])
    u = net_fold.fold(((z - mean) / std).contiguous(memory_format=torch.channels_last))
    loss = _loss
    train(net_fold, loss, (u[n_val:], x[n_val:]), config=TrainConfig(epochs=epochs, lr=2e-3, batch_size=32, patience=None),
          generator=torch.Generator().manual_seed(seed), val_data=(u[:n_val], x[:n_val]))
    return evaluate(net_fold, loss, (u[:n_val], x[:n_val]))


HEADS = {  # (head, input shape), each with the shapes the decoder must guess
    "unpadded conv": (lambda: nn.Sequential(nn.Conv2d(1, 8, 5)), (1, 16, 16)),
    "strided conv": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU()), (1, 16, 16)),
    "conv pool conv": (lambda: nn.Sequential(nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 5), nn.ReLU()),
                       (1, 28, 28)),
    "two strided convs": (lambda: nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                                nn.ReLU()), (1, 28, 28)),
    "rgb conv pool": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)), (3, 16, 16)),
}


def _compare(name: str, n: int, epochs: int) -> tuple[float, float]:
    build, input_shape = HEADS[name]
    torch.manual_seed(0)
    head = build().eval()
    x = _smooth_images(n, input_shape, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = head(x)
    torch.manual_seed(1)
    ours = InverseNet(tuple(z.shape[1:]), input_shape, 16).to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    mirror = _Plain(_mirror(head, input_shape)).to(memory_format=torch.channels_last)
    return _val_mse_of(ours, z, x, epochs=epochs, seed=2), _val_mse_of(mirror, z, x, epochs=epochs, seed=2)


def test_the_decoder_trains_no_worse_than_a_mirror_of_an_unpadded_conv():
    ours, mirror = _compare("unpadded conv", 400, 6)
    assert ours <= mirror


@pytest.mark.slow
@pytest.mark.parametrize("name", list(HEADS))
def test_the_decoder_trains_no_worse_than_a_mirror_of_the_head(name):
    ours, mirror = _compare(name, 2000, 15)
    assert ours <= mirror, f"{name}: decoder {ours:.5f} against the mirror's {mirror:.5f}"


# ------------------------------------------------------------------------------------------------
# The loss and the precision
# ------------------------------------------------------------------------------------------------
def test_the_loss_adds_an_ssim_term_that_is_differentiable_and_zero_for_a_perfect_reconstruction():
    from splitaudit.attacks.image import SSIM_WEIGHT
    from splitaudit.metrics import ssim

    g = torch.Generator().manual_seed(0)
    x = _smooth_images(6, (1, 16, 16), g)
    pred = x.flip(0).clone().requires_grad_()
    loss = ImageModality.reconstruction_loss(pred, x)
    expected = F.mse_loss(pred, x) + SSIM_WEIGHT * (1 - ssim(pred, x).mean())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert pred.grad is not None and bool(torch.isfinite(pred.grad).all()) and float(pred.grad.abs().sum()) > 0
    # the SSIM term's own gradient is there: it differs from the MSE's alone
    mse_grad = torch.autograd.grad(F.mse_loss(pred, x), pred)[0]
    assert not torch.allclose(pred.grad, mse_grad)
    assert float(ImageModality.reconstruction_loss(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_images_under_the_ssim_window_train_on_the_mse_alone():
    x, pred = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(ImageModality.reconstruction_loss(pred, x), F.mse_loss(pred, x))


def test_the_decoder_returns_float32_images_in_either_precision():
    """bfloat16 autocast (where the CPU multiplies in it) stops before the sigmoid: the images, the loss and the
    metrics stay float32; without it the network runs in float32 throughout."""
    z = torch.randn(4, 120)
    for bf16 in (True, False):
        net = InverseNet((120,), MNIST, 16, bf16=bf16).to(memory_format=torch.channels_last)
        y = net(z)
        assert y.dtype == torch.float32 and y.shape == (4, *MNIST)


def test_the_standard_profile_decodes_maps_wider_than_vectors_and_a_refit_does_not_carry_the_width_over():
    from splitaudit.attacks.base import AttackContext, make_attack

    attack = make_attack("decoder", profile="standard", params={"epochs": 1})
    assert attack.width_for((8, 6, 6)) == 64 and attack.width_for((16,)) == 32 and attack.width_for((8, 2, 2)) == 32
    x = torch.rand(40, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    for act, width in (((8, 6, 6), 64), ((16,), 32)):  # the same object fitted at a map, then at a vector
        z = torch.randn(40, *act, generator=torch.Generator().manual_seed(1))
        attack.fit(z, x, AttackContext((1, 12, 12), act, "standard", torch.Generator().manual_seed(0)))
        assert attack.width == width and attack.state()["width"] == width
        built = {k: v.shape for k, v in attack.net.state_dict().items()}
        assert built == {k: v.shape for k, v in InverseNet(act, (1, 12, 12), width, full_res=True).state_dict().items()}
    assert make_attack("decoder", profile="standard", params={"width": 48}).width_for((8, 6, 6)) == 48  # an explicit width is kept
    assert make_attack("decoder", profile="quick").width_for((8, 6, 6)) == 32
