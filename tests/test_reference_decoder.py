"""The reference decoder benchmark's helpers, and the residual example's choice of training images (nothing
is trained or timed here)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from splitaudit.data import SPLIT_AUX, SPLIT_EVAL, SPLIT_VICTIM, Dataset, make_splits

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)  # benchmarks/ and examples/ are not packages
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.fixture(scope="module")
def ref():
    return _load("reference_decoder", ROOT / "benchmarks" / "reference_decoder.py")


@pytest.fixture(scope="module")
def resnet_mlp():
    return _load("resnet_mlp", ROOT / "examples" / "resnet_mlp.py")


def test_standardizer_is_per_channel_for_maps_and_per_feature_for_vectors(ref):
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1e-3, 1.0, 1e3]).view(1, 3, 1, 1)
    z = (torch.randn(64, 3, 5, 5, generator=g) + 7.0) * scale  # float32 keeps about 7 digits of each
    mean, std = ref.standardizer(z)
    assert mean.shape == std.shape == (1, 3, 1, 1)
    u = (z - mean) / std
    assert torch.allclose(u.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(u.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    v = torch.randn(50, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 2.0])
    mean, std = ref.standardizer(v)
    assert mean.shape == (1, 4)
    assert torch.allclose(((v - mean) / std).std(dim=0), torch.ones(4), atol=1e-4)


def test_standardizer_leaves_a_dead_feature_at_zero(ref):
    z = torch.randn(20, 3, generator=torch.Generator().manual_seed(1))
    z[:, 1] = 5.0
    mean, std = ref.standardizer(z)
    assert float(std[0, 1]) == 1.0
    assert torch.all(((z - mean) / std)[:, 1] == 0)


def test_reference_split_draws_disjoint_train_and_validation_from_the_aux(ref):
    tr, va = ref.reference_split(2000, 1500, seed=0)
    assert (len(tr), len(va)) == (1350, 150)
    both = torch.cat([tr, va])
    assert len(set(both.tolist())) == 1500 and int(both.min()) >= 0 and int(both.max()) < 2000
    again = ref.reference_split(2000, 1500, seed=0)
    assert torch.equal(again[0], tr) and torch.equal(again[1], va)
    assert not torch.equal(ref.reference_split(2000, 1500, seed=1)[1], va)
    tr, va = ref.reference_split(40, 1500, seed=0)  # fewer aux images than asked: all of them
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(40)) and len(va) == 4


@pytest.mark.parametrize("act, inp", [
    ((16, 32, 32), (3, 32, 32)), ((32, 16, 16), (3, 32, 32)), ((64, 2, 2), (3, 32, 32)), ((128,), (3, 32, 32)),
    ((8, 24, 24), (1, 28, 28)), ((16, 10, 10), (1, 28, 28)), ((16, 5, 5), (1, 28, 28)), ((4, 40, 40), (1, 20, 20)),
])
def test_reference_decoder_maps_every_shape_to_an_image(ref, act, inp):
    net = ref.make_reference(act, inp, width=8, seed=0).eval()
    with torch.no_grad():
        y = net(torch.randn(2, *act))
    assert y.shape == (2, *inp)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_up_steps_doubles_to_the_nearest_power_of_two(ref):
    assert [ref.up_steps(n, 32) for n in (32, 16, 8, 4, 2)] == [0, 1, 2, 3, 4]
    assert [ref.up_steps(n, 28) for n in (28, 24, 10, 5, 56)] == [0, 0, 1, 2, 0]


def test_resnet_mlp_trains_on_images_the_audit_neither_scores_nor_gives_its_attacker(resnet_mlp):
    # photos32's layout in small: a predefined victim / aux / eval band, more victim and aux images than the
    # standard profile's attacker takes (2,000), so some victim-band images are left for training.
    n = {SPLIT_VICTIM: 2400, SPLIT_AUX: 800, SPLIT_EVAL: 1100}
    split = torch.cat([torch.full((k,), band, dtype=torch.int8) for band, k in n.items()])
    x = torch.rand(len(split), 1, 2, 2, generator=torch.Generator().manual_seed(0))
    ds = Dataset(spec="synthetic", x=x, y=torch.arange(len(split)) % 3, classes=("a", "b", "c"), split=split)
    idx = resnet_mlp.training_indices(ds, seed=0)
    splits = make_splits(ds, seed=0, n_eval=1000, max_aux=2000, policy="trained")
    audit = {tuple(v.flatten().tolist()) for part in (splits.aux, splits.eval) for v in part.x}
    train = {tuple(v.flatten().tolist()) for v in x[idx]}
    assert len(train) == len(idx) > 0 and not train & audit
    assert torch.all(split[idx] == SPLIT_VICTIM)
    left_out = [i for i in range(n[SPLIT_VICTIM]) if tuple(x[i].flatten().tolist()) not in audit]
    assert idx.tolist() == left_out  # every victim-band image the attacker leaves out
