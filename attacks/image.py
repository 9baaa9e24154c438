"""The image modality: SSIM and PSNR, the mean aux image as the no-information guess, grids of
originals over reconstructions, and the inverse network that decodes an activation into an image.

Everything in the audit that knows what a pixel is lives here or in what this module calls
(``splitaudit.metrics`` for the scores, ``splitaudit.report.images`` for the PNG grids).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from splitaudit.attacks.base import fast_autocast
from splitaudit.attacks.modality import MetricInfo, Modality, register_modality
from splitaudit.errors import DataError

SSIM_WINDOW = 11  # SSIM's Gaussian window, as in scikit-image: images must be at least this size
# The weight of (1 - SSIM) beside the MSE in the decoder's loss. Measured on builtin:lenet with the standard
# profile's fit, both in bfloat16 (SSIM on the fit's held-out aux data; every cut in docs/efficiency.md): conv2
# 0.916 -> 0.961, pool2 0.859 -> 0.920, fc2 0.770 -> 0.778, fc3 0.588 -> 0.628, the others within 0.004 but relu1
# (0.993 -> 0.989: that run stopped after 10 epochs, the MSE's after 18). It leads most in the first epochs (conv1
# after 5: 0.861 -> 0.984). A step costs 15-25% more (SSIM's small matmuls). With Adam's beta2 at 0.95 instead of
# 0.999 the MSE catches up at the spatial cuts, and SSIM still leads at 8 of 11 (fc3 +0.023). 0.3 and 1.0 gave the
# same SSIM with a higher MSE.
SSIM_WEIGHT = 0.1


@register_modality
class ImageModality(Modality):
    name = "image"
    metrics = (MetricInfo("ssim", "SSIM", 3, 5, (-1.0, 1.0)), MetricInfo("psnr", "PSNR (dB)", 2, 3, None))
    headline = "ssim"

    def load_data(self, spec: str, *, model: str | None = None):
        from splitaudit.data import load_data

        return load_data(spec)

    def check_data(self, dataset, spec: str) -> None:
        h, w = dataset.shape[-2:]
        if min(h, w) < SSIM_WINDOW:
            raise DataError(
                f"{spec!r} has {h}x{w} images; leakage is scored by SSIM with an 11x11 window (as in scikit-image), "
                "so images must be at least 11x11"
            )

    def score(self, recon, x):
        from splitaudit.metrics import psnr, ssim

        return {"ssim": ssim(recon, x), "psnr": psnr(recon, x, max_db=100.0)}

    def prior(self, x_aux):
        return x_aux.mean(dim=0, keepdim=True)

    def selection(self, recon, x) -> tuple[str, torch.Tensor]:
        """SSIM, the audit's own metric; images under 11x11 (unit tests) compare by negative MSE."""
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            from splitaudit.metrics import ssim

            return "ssim", ssim(recon, x)
        return "neg_mse", -(recon - x).square().flatten(1).mean(dim=1)

    def clip(self, recon):
        return recon.clamp(0, 1)

    def features(self, x):
        """Each image flattened and standardized to zero mean and unit norm: re-identification is then by
        correlation, so a reconstruction with another brightness or contrast still finds its original."""
        v = x.flatten(1).float()
        v = v - v.mean(dim=1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def judge(self, input_shape, num_classes):
        return JudgeNet(input_shape[0], num_classes)

    def decoder(self, act_shape, input_shape, *, width, full_res):
        return InverseNet(tuple(act_shape), tuple(input_shape), width, full_res=full_res)

    @staticmethod
    def reconstruction_loss(pred, x):
        """MSE plus :data:`SSIM_WEIGHT` x (1 - SSIM), the audit's own measure of recognizability, as SIMBA trains its
        decoder (an SSIM loss); differentiable (``splitaudit.metrics.ssim``). MSE alone spends its capacity on
        pixel errors SSIM barely sees and leaves the faint background noise SSIM punishes hardest on dark
        images. Images under SSIM's 11x11 window (unit tests) train on the MSE alone."""
        mse = F.mse_loss(pred, x)
        if min(x.shape[-2:]) < SSIM_WINDOW:
            return mse
        from splitaudit.metrics import ssim

        return mse + SSIM_WEIGHT * (1 - ssim(pred, x).mean())

    def examples(self, x, recon, *, fixed, ranked, values, data=None) -> bytes:
        from splitaudit.report.images import grid_png

        return grid_png(x, recon, fixed=fixed, worst=ranked, ssim=values)


OVERSHOOT = 1.1  # a map up to 10% larger than a grid counts as that grid (a padded conv's extra border), cropped


def _stride(n_in: int, n_act: int) -> float:
    """The activation's stride relative to the input along one axis, guessed from the two sizes alone: the
    largest power of two at most ``n_in / n_act`` (within :data:`OVERSHOOT`), so 1/2, 1, 2, 4...

    A floor, because what shrinks a map besides its strides (unpadded convolutions, floor-mode pooling)
    only ever makes it smaller: 28 -> 24 (an unpadded 5x5 conv) is stride 1, 28 -> 8 (He et al.'s ReLU2:
    conv, pool, conv) stride 2, 28 -> 4 stride 4, 28 -> 13 (a strided 3x3 conv) stride 2, 28 -> 56 stride 1/2.
    Powers of two, because that is how CNNs downsample. A wrong guess (a stride of 3, ceil-mode pooling)
    costs alignment, not information: the map is padded, not resampled (only a map that overshoots its
    grid loses its outer rows to the crop)."""
    return 2.0 ** math.floor(math.log2(n_in * OVERSHOOT / n_act))


def is_map(act_shape: tuple[int, ...]) -> bool:
    """A spatial activation (channels x height x width, both at least 3) that :class:`InverseNet` decodes as a map:
    placed on the input's grid and convolved. Anything else (a vector, a map under 3x3) goes through a dense stem."""
    return len(act_shape) == 3 and min(act_shape[1:]) >= 3


class _Fit(nn.Module):
    """Parameter-free: a centred zero pad (or crop) to ``size``, then a pixel unshuffle by ``k``."""

    def __init__(self, size: tuple[int, int], k: int):
        super().__init__()
        self.size, self.k = size, k

    def forward(self, z):
        (h, w), (th, tw) = z.shape[-2:], self.size
        if (h, w) != (th, tw):  # F.pad crops with negative amounts
            z = F.pad(z, ((tw - w) // 2, tw - w - (tw - w) // 2, (th - h) // 2, th - h - (th - h) // 2))
        return F.pixel_unshuffle(z, self.k) if self.k > 1 else z


class InverseNet(nn.Module):
    """Activation (standardized) -> image in [0, 1], for any pair of activation and input shapes.

    The architecture follows from the two shapes. A spatial activation is placed on the input's grid where a
    mirror of the head would place it, without knowing the head (the default attacker is black-box): its
    stride relative to the input is guessed from the sizes (:func:`_stride`); a map finer than the working
    grid is pixel-unshuffled into channels (nothing in it is thrown away), one coarser is upsampled by that
    stride in steps of 2; either is zero-padded, centred, to the grid, which is where an unpadded
    convolution's valid region lies (He et al. 2019's LeNet: conv1's 24x24 is the centre of 28x28, relu2's
    8x8 the centre of the 14x14 grid). The pad and the unshuffle have no parameters: training applies them
    once to the whole aux set (``fold``). Interpolating a map to the grid instead stretches it: its cells
    land off the grid by an amount that changes across the map, which a convolution (the same everywhere)
    cannot follow. Measured on builtin:lenet-he at the standard profile, interpolated against padded:
    conv1 SSIM 0.862 against 0.995, relu2 0.807 against 0.945, pool2 0.763 against 0.906; on
    builtin:lenet, relu2 (10x10 to 14x14) 0.885 against 0.959.

    A map coarser than the input (more than one layer of the head to undo) gets one more conv block on the
    grid: with it the decoder trains no worse than a mirror of the head (He et al.'s inverse network,
    transposed convolutions with the head's own kernels and strides), where without it a conv-pool-conv
    head's mirror was 4% ahead on validation MSE (``tests/test_decoder_shapes.py``); relu2 of lenet-he
    rises to 0.957, for 0.9 MFLOP more per image.

    All convolutions run at most at half the input's resolution; the last one predicts 4 sub-pixels per
    position and a pixel shuffle (Shi et al. 2016, sub-pixel convolution) lays them out at full size.
    That keeps every detail of the output trainable at a quarter of the cost of full-resolution
    convolutions, which dominates an attack's time on a CPU. With ``full_res``, an activation at the
    input's stride (a first conv) is decoded at full resolution instead: measured on LeNet's conv1, 20
    epochs reach SSIM 0.996 there against 0.988 at half resolution, for 2.6x the time per epoch; the
    standard and thorough profiles pay that, quick does not. Channels shrink as resolution grows
    (``width`` at a quarter of the input size, ``min_channels`` at the working size). A vector, or a map
    under 3x3, goes through a dense stem reshaped to a quarter of the working grid.
    """

    def __init__(self, act_shape: tuple[int, ...], input_shape: tuple[int, ...], width: int, min_channels: int = 16, full_res: bool = False,
                 bf16: bool = True):
        super().__init__()
        self.bf16 = bf16  # bfloat16 autocast where the hardware has it (:func:`splitaudit.attacks.base.fast_autocast`)
        c_out, h_out, w_out = input_shape
        self.out_hw = (h_out, w_out)
        spatial = is_map(tuple(act_shape))
        stride = (_stride(h_out, act_shape[1]), _stride(w_out, act_shape[2])) if spatial else (math.inf, math.inf)
        fine = max(stride) <= 1  # at the input's resolution or finer
        self.r = 2 if h_out >= 8 and w_out >= 8 and not (full_res and fine) else 1
        hw, ww = math.ceil(h_out / self.r), math.ceil(w_out / self.r)  # working resolution
        self.work_hw = (hw, ww)

        def ch(n: int) -> int:  # channels of a map n cells high across the input
            return int(min(width, max(min_channels, round(width * (h_out / 4) / max(n, 1)))))

        if spatial:
            s_h, s_w = stride[0] / self.r, stride[1] / self.r  # the map's stride on the working grid
            k = int(round(1 / min(s_h, s_w, 1.0)))  # folded into channels by k
            u = (int(round(s_h * k)), int(round(s_w * k)))  # then upsampled by u (powers of 2)
            h, w = math.ceil(hw / u[0]), math.ceil(ww / u[1])  # the grid the map is padded to, after the fold
            self.unshuffle: nn.Module = _Fit((h * k, w * k), k)
            self.stem = nn.Sequential(nn.Conv2d(act_shape[0] * k * k, ch(h), 3, padding=1), nn.BatchNorm2d(ch(h)), nn.ReLU())
            sizes = [(h * min(2**i, u[0]), w * min(2**i, u[1])) for i in range(1, max(u).bit_length())]  # doubling, then cropped
        else:
            self.unshuffle = nn.Identity()
            h, w = max(1, math.ceil(hw / 2)), max(1, math.ceil(ww / 2))
            hidden = min(1024, max(256, 4 * width))
            self.stem = nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(act_shape), hidden), nn.ReLU(), nn.Linear(hidden, ch(h) * h * w),
                nn.Unflatten(1, (ch(h), h, w)), nn.BatchNorm2d(ch(h)), nn.ReLU(),
            )
            steps = max(0, math.ceil(math.log2(max(hw / h, ww / w))))  # no geometry to keep: straight to the grid
            sizes = [(round(h * (hw / h) ** (i / steps)), round(w * (ww / w) ** (i / steps))) for i in range(1, steps + 1)]
        layers: list[nn.Module] = []
        c_prev = ch(h)
        for size in sizes:
            c_next = ch(size[0])
            layers += [nn.Upsample(size=size, mode="bilinear", align_corners=False),
                       nn.Conv2d(c_prev, c_next, 3, padding=1), nn.BatchNorm2d(c_next), nn.ReLU()]
            c_prev = c_next
        if spatial and not fine:  # more than one layer to undo: one more block on the grid
            layers += [nn.Conv2d(c_prev, c_prev, 3, padding=1), nn.BatchNorm2d(c_prev), nn.ReLU()]
        self.up = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(c_prev, c_prev, 3, padding=1), nn.BatchNorm2d(c_prev), nn.ReLU(),
            nn.Conv2d(c_prev, c_out * self.r * self.r, 3, padding=1), nn.PixelShuffle(self.r) if self.r > 1 else nn.Identity(),
        )

    def forward(self, z):
        return self.decode(self.unshuffle(z))

    def fold(self, z):
        """The parameter-free part before the first layer, which training applies once to the whole aux set."""
        return self.unshuffle(z)

    def for_inference(self) -> InverseNet:
        return folded(self)

    def decode(self, u):
        """The decoder after its parameter-free input fold (``unshuffle``), which training applies
        once to the whole aux set instead of to every batch of every epoch (8% of a first conv's time)."""
        with fast_autocast(u) if self.bf16 else contextlib.nullcontext():
            # Channels-last from the stem on (a dense stem's reshape gives the default layout): every layer
            # after it then runs in one layout, without conversions (a quarter of a vector decoder's time).
            y = self.up(self.stem(u).contiguous(memory_format=torch.channels_last))
            if tuple(y.shape[-2:]) != self.work_hw:  # upsampled past the grid: the centre is kept
                (h, w), (th, tw) = y.shape[-2:], self.work_hw
                y = y[..., (h - th) // 2 : (h - th) // 2 + th, (w - tw) // 2 : (w - tw) // 2 + tw]
            y = self.head(y)
        if tuple(y.shape[-2:]) != self.out_hw:  # odd input sizes: the sub-pixel grid is one pixel larger
            y = y[..., : self.out_hw[0], : self.out_hw[1]]
        return torch.sigmoid(y.float())  # the image and the loss in float32




def folded(net: InverseNet) -> InverseNet:
    """A copy for inference with each BatchNorm folded into the convolution before it (with its
    running statistics): the same outputs up to float rounding (6e-8 measured), 10-20% less time per
    reconstruction of 1,000 images. Made from the weights it is given: a later change to ``net``
    needs a new copy (``fit`` and ``load_state`` drop the one ``reconstruct`` keeps)."""
    folded = copy.deepcopy(net).eval()
    for seq in (folded.stem, folded.up, folded.head):
        mods = list(seq)
        for i in range(len(mods) - 1):
            if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(mods[i], mods[i + 1]), nn.Identity()
    return folded.to(memory_format=torch.channels_last)


class JudgeNet(nn.Module):
    """The independent classifier that labels reconstructions: a strided 3x3 conv, two 3x3 conv blocks with
    BatchNorm, and global average pooling, unlike the victims here (LeNet's 5x5 convolutions and dense
    layers), so it does not share their blind spots. Small on purpose: it labels every reconstruction of
    every row (about 0.15 MMAC per 28x28 image). Trained by the tool on the attacker's aux split only."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 8):
        super().__init__()

        def block(cin, cout, stride=1, pool=True):
            layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*layers, *([nn.MaxPool2d(2, ceil_mode=True)] if pool else []))

        self.body = nn.Sequential(block(in_channels, width, stride=2, pool=False), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.body(x)

    def classify(self, features):
        return self.fc(features)

    def forward(self, x):
        return self.fc(self.body(x))
