"""The efficiency benchmark's FLOP counting and time-line arithmetic (no timing is asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_efficiency.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_efficiency", _PATH)  # benchmarks/ is not a package
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_counts_a_linear_forward_and_backward(bench):
    batch, n_in, n_out = 8, 5, 3
    layer = nn.Linear(n_in, n_out)
    x = torch.randn(batch, n_in, requires_grad=True)
    assert bench.count_flops(lambda: layer(x)) == 2 * batch * n_in * n_out
    # backward: the gradient of the input and of the weight, one matmul each as large as the forward's
    assert bench.count_flops(lambda: layer(x).sum().backward()) == 3 * 2 * batch * n_in * n_out
    # without a gradient for the input, only the weight's is computed
    assert bench.count_flops(lambda: layer(x.detach()).sum().backward()) == 2 * 2 * batch * n_in * n_out


def test_time_line_gives_each_instant_to_the_first_activity(bench):
    layers = [("steps", [(1.0, 2.0), (1.5, 3.0)]), ("loop", [(0.5, 4.0)]), ("never", [(2.0, 2.5)])]
    parts = bench.attribute(0.0, 5.0, layers)
    assert parts["steps"] == pytest.approx(2.0)
    assert parts["loop"] == pytest.approx(1.5)
    assert "never" not in parts
    assert parts["driver, outside every phase (setup, bookkeeping)"] == pytest.approx(1.5)
    assert bench.union_seconds([(0, 1), (0.5, 2), (3, 4)]) == pytest.approx(3.0)


def test_counts_flops_by_the_precision_they_ran_in(bench):
    batch, n_in, n_out = 8, 5, 3
    layer, x = nn.Linear(n_in, n_out), torch.randn(batch, n_in)
    with bench.flop_counter() as counter:
        layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the image decoder's precision where the CPU has bf16
            layer(x)
    assert counter.by_dtype[torch.float32] == counter.by_dtype[torch.bfloat16] == 2 * batch * n_in * n_out
    assert counter.get_total_flops() == 2 * 2 * batch * n_in * n_out


def test_a_step_is_timed_on_the_cpu_clock_and_charged_at_the_peak_of_its_precision(bench):
    peaks = bench.Peaks(fp32={1: 100.0, 2: 150.0}, bf16={1: 400.0, 2: None})
    call = bench.TrainCall(who="attack", thread=0, threads=1, t0=0.0, flops_per_sample={torch.float32: 1e9, torch.bfloat16: 4e9})
    call.steps.append(bench.Step(0.0, 5.0, 2.0, 3.0, 10))  # 10 samples: 2 s on the thread's CPU clock, 5 s on the wall clock
    assert call.step_seconds == 2.0 and call.wall_seconds == 5.0  # one thread: the CPU clock
    assert call.flops() == 5e10 and call.flops(torch.bfloat16) == 4e10
    assert call.peak_seconds(peaks) == pytest.approx(10 / 100 + 40 / 400)
    two = bench.TrainCall(who="judge", thread=0, threads=2, t0=0.0, flops_per_sample={torch.bfloat16: 1e9})
    two.steps.append(bench.Step(0.0, 5.0, 2.0, 6.0, 10))
    assert two.step_seconds == 5.0  # several threads beside other training: the wall clock
    two.alone = True
    assert two.step_seconds == 3.0  # alone in the process: its CPU clock over the thread count
    assert two.peak_seconds(peaks) == pytest.approx(10 / 150)  # no bf16 peak there: charged at the fp32 one
