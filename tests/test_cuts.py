import math

import pytest

import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.costs import bytes_per_sample, cut_latencies, head_flops, head_latency_ms, tail_flops, tail_latency_ms
from splitaudit.cuts import capture, capture_many, discover_cuts, forward_with, head_forward, predict, predict_each
from splitaudit.errors import ModelError
from tests.tiny import TinyNet


class Functional(nn.Module):
    """forward mixes modules with functional ops and reuses one module twice."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.shared = nn.ReLU()
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        x = self.shared(self.a(x))
        x = F.avg_pool2d(x, 2)
        x = self.shared(self.b(x)) + x
        x = self.drop(F.avg_pool2d(x, 2))
        return self.fc(x.flatten(1))


def test_discovery_sees_residual_and_functional_modules_in_order():
    torch.manual_seed(0)
    d = discover_cuts(TinyNet().eval(), torch.rand(2, 1, 12, 12))
    assert d.names() == ["stem", "block.conv", "block.bn", "block", "fc"]
    assert d.get("block").shape == (4, 12, 12)
    assert d.get("fc").shape == (4,)


def test_discovery_skips_reused_modules_and_merges_aliases():
    d = discover_cuts(Functional().eval(), torch.rand(2, 1, 16, 16))
    assert "shared" not in d.names()
    assert any(name == "shared" and "2 times" in why for name, why in d.skipped)
    # Dropout in eval mode returns its input: an alias of nothing we list (its input is functional),
    # so it is a cut of its own.
    assert d.names() == ["a", "b", "drop", "fc"]


def test_sequential_container_and_view_are_aliases():
    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    d = discover_cuts(net.eval(), torch.rand(2, 1, 8, 8))
    assert d.names() == ["0.0", "0.1", "2"]
    assert set(d.get("0.1").aliases) == {"0", "1"}
    assert d.get("1").name == "0.1"  # an alias resolves to its cut


def test_inplace_relu_is_not_merged_with_its_input():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    d = discover_cuts(net.eval(), torch.rand(2, 1, 8, 8))
    assert d.names()[:2] == ["0", "1"]


def test_head_forward_stops_at_the_cut():
    torch.manual_seed(0)
    net = TinyNet().eval()
    calls = []
    net.fc.register_forward_hook(lambda *a: calls.append("fc"))
    x = torch.rand(3, 1, 12, 12)
    z = head_forward(net, "block", x)
    assert calls == []  # the tail never ran
    expected = F.relu(net.stem(x))
    expected = F.relu(expected + net.block.bn(net.block.conv(expected)))
    torch.testing.assert_close(z, expected)
    torch.testing.assert_close(capture(net, "block", x, batch_size=2), expected)


def test_forward_with_replaces_the_activation():
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(2, 1, 12, 12)
    out = forward_with(net, "block", x, lambda z: torch.zeros_like(z))
    torch.testing.assert_close(out, net.fc.bias.expand(2, -1))


def test_costs_count_only_the_head():
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(1, 1, 12, 12)
    stem = head_flops(net, "stem", x)
    assert stem == 2 * 4 * 1 * 9 * 144  # 2 * Cout * Cin * k^2 * H * W
    assert head_flops(net, "fc", x) > head_flops(net, "block", x) > stem
    assert bytes_per_sample((4, 12, 12)) == 4 * 576 and bytes_per_sample((4, 12, 12), "int8") == 576


def test_tail_flops_are_the_rest_of_the_model():
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(1, 1, 12, 12)
    full = head_flops(net, None, x)
    for cut in discover_cuts(net, x).names():
        assert head_flops(net, cut, x) + tail_flops(net, cut, x) == full
    assert tail_flops(net, "fc", x) == 0  # nothing runs after the last layer
    assert tail_flops(net, "stem", x) == full - 2 * 4 * 1 * 9 * 144


class HeavyTail(nn.Module):
    """A one-layer head and a tail of 24 large matmuls: the tail's time must dwarf the head's."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 512)
        self.tail = nn.Sequential(*[nn.Linear(512, 512) for _ in range(24)])

    def forward(self, x):
        return self.tail(self.head(x))


def test_tail_latency_times_the_tail_not_the_head():
    torch.manual_seed(0)
    net = HeavyTail().eval()
    x = torch.rand(1, 16)
    tail = tail_latency_ms(net, "head", x, repeats=9)
    head = head_latency_ms(net, "head", x, repeats=9)
    # A hook returning a saved activation would still run (and time) the head; this clock starts after it.
    assert tail > 0 and math.isfinite(tail)
    assert tail > 5 * head
    # At the last layer there is (almost) nothing left to run.
    assert tail_latency_ms(net, "tail", x, repeats=9) < tail / 5


class Branchy(nn.Module):
    """``b`` exists but this forward never calls it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x)


def test_one_series_of_full_passes_times_every_cut_s_head_and_tail():
    torch.manual_seed(0)
    net = HeavyTail().eval()
    lat = cut_latencies(net, ["head", "tail.11", "tail"], torch.rand(1, 16), repeats=9)
    assert lat.head["head"] > 0 and lat.tail["tail"] >= 0
    # The 24 matmuls are in the last cut's head and in the first cut's tail; half of them on each side of the middle.
    assert lat.head["tail"] > 5 * lat.head["head"] and lat.tail["head"] > 5 * lat.tail["tail"]
    assert lat.head["head"] < lat.head["tail.11"] < lat.head["tail"]
    assert lat.head["tail.11"] + lat.tail["tail.11"] == pytest.approx(lat.model, rel=0.3)
    with pytest.raises(ModelError, match="not reached"):
        cut_latencies(Branchy(), ["b"], torch.rand(1, 4), repeats=3)


def _noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda z: z + 0.5 * torch.randn(z.shape, generator=gen)


class BatchMixing(nn.Module):
    """A tail that mixes samples: each output row depends on the whole batch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        z = self.a(x)
        return self.b(z - z.mean(dim=0, keepdim=True))


@pytest.mark.parametrize("cut, shared", [("stem", True), ("block", True), ("block.bn", False), ("fc", True)])
def test_predict_each_shares_the_head_only_where_the_tail_allows_it(cut, shared):
    torch.manual_seed(0)
    net = TinyNet().eval()
    x = torch.rand(10, 1, 12, 12)
    stem_calls = []
    net.stem.register_forward_hook(lambda *a: stem_calls.append(1))
    each = predict_each(net, x, cut, [_noise(1), _noise(2), lambda z: z.flip(0)], batch_size=4)
    n_shared = len(stem_calls)
    alone = [predict(net, x, cut=cut, transform=t, batch_size=4) for t in (_noise(1), _noise(2), lambda z: z.flip(0))]
    for a, b in zip(each, alone):
        assert torch.equal(a, b)  # the same noise draws, the same predictions
    assert len({tuple(p.tolist()) for p in each}) > 1  # the transforms did differ
    # Batches of 4, 4 and 2, after the two-sample check (one stacked pass, then one per transform):
    # shared heads run once per batch; a skip connection across the cut (block.bn) fails the check.
    assert n_shared == (4 + 3 if shared else 1 + 3 * 3)


def test_predict_each_does_not_stack_a_tail_that_mixes_samples():
    torch.manual_seed(0)
    net = BatchMixing().eval()
    x = torch.randn(8, 6)
    calls = []
    net.a.register_forward_hook(lambda *a: calls.append(1))
    each = predict_each(net, x, "a", [_noise(1), _noise(2)], batch_size=8)
    # The check (stacked, then the first change alone, which differs), then one pass per transform.
    assert len(calls) == 2 + 2
    alone = [predict(net, x, cut="a", transform=t, batch_size=8) for t in (_noise(1), _noise(2))]
    assert all(torch.equal(a, b) for a, b in zip(each, alone))


def test_capture_many_is_capture_for_each_cut_in_one_pass():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(2 * 6 * 6, 3), nn.ReLU())
    x = torch.randn(10, 1, 8, 8)
    calls = []
    net[0].register_forward_hook(lambda *a: calls.append(1))
    tail = []
    net[4].register_forward_hook(lambda *a: tail.append(1))
    many = capture_many(net, ["3", "0"], x, batch_size=4)
    assert len(calls) == 3 and tail == []  # one pass per batch, stopped after the last cut asked for
    for cut in ("0", "3"):  # against the head alone, batch by batch (it stops at the cut, before the in-place ReLU)
        alone = torch.cat([head_forward(net, cut, x[i : i + 4]) for i in range(0, 10, 4)])
        torch.testing.assert_close(many[cut], alone, rtol=0, atol=0)
        torch.testing.assert_close(capture(net, cut, x, batch_size=4), alone, rtol=0, atol=0)
    assert (many["0"] < 0).any()  # captured before the in-place ReLU after it


def test_predict_each_gives_each_transform_an_activation_of_its_own():
    # A defense written in place (z.mul_) must not change what the next transform sees.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    x = torch.randn(64, 6)

    def transforms():
        return [lambda z: z.mul_(-1.0), lambda z: z.neg(), lambda z: z.add_(1.0)]

    each = predict_each(net, x, "0", transforms(), batch_size=32)
    alone = [predict(net, x, cut="0", transform=t, batch_size=32) for t in transforms()]
    assert all(torch.equal(a, b) for a, b in zip(each, alone))


def test_he_et_al_lenet_has_their_unpadded_shapes_under_lenets_layer_names():
    from splitaudit.models import build_model

    model = build_model("builtin:lenet-he", in_channels=1, num_classes=10)
    shapes = {c.name: c.shape for c in discover_cuts(model, torch.zeros(2, 1, 28, 28)).cuts}
    assert (shapes["conv1"], shapes["relu2"], shapes["pool2"], shapes["fc1"]) == ((8, 24, 24), (16, 8, 8), (16, 4, 4), (120,))
