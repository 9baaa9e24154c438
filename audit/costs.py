"""What a cut costs: bytes on the wire, FLOPs and latency of the head (device) and of the tail (server).

Latency is measured, never estimated from FLOPs: warm-up runs, then the median of repeats, with the
thread count recorded next to the number (STYLE habit 13).

The tail (everything after the cut, up to the model's output) is not a module either, and it cannot be
run on its own: replacing the cut's output by a saved activation (a hook that returns it) still runs
the head first. So the tail is measured inside one full forward pass: its FLOPs are the whole model's
minus the head's (exact, since the flop counter counts each op once), and its time runs from the
moment the cut module has produced its output to the moment ``forward`` returns
(:func:`tail_latency_ms`). That is one clock, in one pass, rather than a difference of two noisy
medians, so it is never negative.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from splitaudit.cuts import _module, _StopForward, head_forward, run_model
from splitaudit.errors import ModelError

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "int8": 1}


def bytes_per_sample(shape: tuple[int, ...], dtype: str = "float32") -> int:
    n = 1
    for s in shape:
        n *= s
    return n * BYTES_PER_ELEMENT[dtype]


@torch.no_grad()
def head_flops(model: nn.Module, cut: str | None, sample: torch.Tensor) -> int:
    """FLOPs of the head for one sample (``cut=None``: the whole model), by ``torch.utils.flop_counter``."""
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        try:
            if cut is None:
                run_model(model, sample[:1])
            else:
                head_forward(model, cut, sample[:1])
        except _StopForward:
            pass
    return int(counter.get_total_flops())


SMALL_MODEL_FLOPS = 10e6


def training_thread_count(model: nn.Module, sample: torch.Tensor) -> int:
    """Intra-op threads for training ``model`` beside the attack jobs (a defense's fine-tuning): one
    for a model under 10 MFLOPs per sample on a CPU (LeNet: 0.8), whose small ops would only hand work
    between threads while the jobs keep every core busy; all of them for a larger one."""
    if sample.device.type == "cpu" and head_flops(model, None, sample[:1]) < SMALL_MODEL_FLOPS:
        return 1
    return torch.get_num_threads()


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sync_for(t: torch.Tensor):
    return torch.cuda.synchronize if t.is_cuda else None


def tail_flops(model: nn.Module, cut: str, sample: torch.Tensor, *, full: int | None = None) -> int:
    """FLOPs of the tail (what the server runs) for one sample: the whole model's minus the head's."""
    full = head_flops(model, None, sample) if full is None else full
    return max(0, full - head_flops(model, cut, sample))


@torch.no_grad()
def model_latency_ms(model: nn.Module, sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median time of the whole model on ``sample``: all on one machine, nothing sent."""
    model.eval()
    return median_ms(lambda: run_model(model, sample), warmup=warmup, repeats=repeats, sync=_sync_for(sample))


@torch.no_grad()
def tail_latency_ms(model: nn.Module, cut: str, sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median time from the cut's output to the end of the forward pass: the server's share.

    A hook on the cut module reads the clock when the activation exists (after a device sync on
    CUDA); the clock is read again when ``forward`` returns. The head runs in every pass but is not
    timed.
    """
    model.eval()
    sync = _sync_for(sample)
    stamps: list[float] = []

    def hook(module, inputs, output):
        if sync:
            sync()
        stamps.append(time.perf_counter())

    handle = _module(model, cut).register_forward_hook(hook)
    times = []
    try:
        for i in range(warmup + repeats):
            stamps.clear()
            run_model(model, sample)
            if sync:
                sync()
            end = time.perf_counter()
            if len(stamps) != 1:
                raise ModelError(f"cut {cut!r} ran {len(stamps)} times in one forward pass, so its tail is not defined")
            if i >= warmup:
                times.append((end - stamps[0]) * 1e3)
    finally:
        handle.remove()
    return statistics.median(times)


@torch.no_grad()
def head_latency_ms(model: nn.Module, cut: str, sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median time of the head on ``sample`` (its batch size is the one timed)."""
    model.eval()
    return median_ms(lambda: head_forward(model, cut, sample), warmup=warmup, repeats=repeats, sync=_sync_for(sample))


def interleaved_medians_ms(fns: list[Callable[[], object]], *, warmup: int = 3, repeats: int = 15,
                           sync: Callable[[], None] | None = None) -> list[float]:
    """Medians of several functions timed in turn, round after round, so that load changes hit all equally.

    Used for defense overheads: the head alone and the head + each defense, measured side by side
    rather than minutes apart, where a busy machine would turn noise into a (possibly negative)
    overhead. One shared head-alone series serves every defense of a cut.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            if sync:
                sync()
            t0 = time.perf_counter()
            fn()
            if sync:
                sync()
            acc.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def defense_latency_ms(model: nn.Module, cut: str, sample: torch.Tensor, defended: list[tuple[nn.Module, Callable]], *,
                       repeats: int = 15) -> list[float]:
    """Medians of the head of ``model`` alone, then of each (model, transform)'s head + transform, timed in turn."""
    model.eval()
    for m, _ in defended:
        m.eval()
    fns: list[Callable[[], object]] = [lambda: head_forward(model, cut, sample)]
    fns += [lambda m=m, tf=tf: tf(head_forward(m, cut, sample)) for m, tf in defended]
    return interleaved_medians_ms(fns, repeats=repeats, sync=_sync_for(sample))
