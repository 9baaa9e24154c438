"""How much of this machine's arithmetic the image demo's training uses, and where the rest of its time goes.

Three measurements, printed with the machine's facts:

1. **Peak.** The best matmul rate (GFLOP/s) of 1024- and 2048-square matrices, on the threads torch uses and on one
   thread (the local executor gives each of its parallel jobs ``threads // workers`` intra-op threads: one each on
   2 cores), for three kernels: float32 through ``torch.mm`` (MKL's sgemm on x86), float32 through oneDNN (the
   library the convolutions run in), and bfloat16 through ``torch.mm`` (oneDNN) where the CPU multiplies bf16
   natively. The fp32 peak is the faster of the two fp32 kernels: the machine does at least that. They can differ
   a lot: on an AMD EPYC with AVX-512, MKL reaches about 93 GFLOP/s on one thread (it appears to take its AVX2
   path on AMD) while oneDNN reaches about 210. One-thread rates are timed on the calling thread's CPU clock
   (``time.thread_time``), so other processes on a shared machine do not count against them; a multi-thread
   step that ran alone in the process on the process's CPU clock over its thread count; the rest on the wall clock.
2. **The demo.** ``splitaudit demo`` (builtin:lenet on builtin:mnist, the demo's defenses) runs in this
   process from a cold cache, with the one training loop (``splitaudit.attacks.training.train``)
   instrumented from here, its behaviour unchanged: every training step is timed (from the batch
   handed out to the next one asked for: forward, backward, optimizer step) on the wall clock and on the
   stepping thread's CPU clock, and the first step of every ``train`` call runs under
   ``torch.utils.flop_counter.FlopCounterMode``, which also records the precision each operation ran in (bf16
   under autocast, fp32 otherwise). Its FLOPs per sample times the samples of the other steps is that call's
   work (the counted step is left out of both the FLOPs and the time: the counter slows it). Achieved share of
   the fp32 peak = FLOPs / seconds inside steps / fp32 peak at the threads the step ran on, the seconds on the
   CPU clock for one-thread steps; the share of the precision's own peak divides bf16 FLOPs by the bf16 peak
   instead. Attack training is also broken out by cut. The run's wall time is then split by what was running:
   training steps, the validation inside training, the loop between steps, an attack job outside its training
   (setup, scoring), or only the driver (its phases as ``run_audit`` times them: capture, utility, latency,
   rows, ...), and the report's writing.
3. **A reference.** One isolated training step of the demo's own conv decoder (the standard profile's,
   at LeNet's first cut, with the attack's own loss and precision) at batch 128 and 64, on both thread counts.

What is not counted, and says so in the output: DP-SGD's fine-tuning runs through Opacus (its own
loader, per-sample gradients), so its steps are timed as a whole but not counted.

    python benchmarks/bench_efficiency.py [--profile quick|standard] [--workers N] [--skip-reference] [--skip-demo]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from splitaudit.attacks.base import cpu_bf16
from splitaudit.costs import flop_counter as flop_counter_of_this_thread


# --- counting --------------------------------------------------------------------------------------------


class _ByDtype(FlopCounterMode):
    """FlopCounterMode that also sums each counted operation's FLOPs by the dtype it ran in (that of its
    first tensor argument: under bf16 autocast a convolution and its backward run in bfloat16)."""

    def __init__(self):
        super().__init__(display=False)
        flop_counter_of_this_thread(self)  # its module tracker's hooks are process-wide
        self.by_dtype: dict[torch.dtype, int] = defaultdict(int)

    def _count_flops(self, func_packet, out, args, kwargs):
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor)), torch.float32)
            self.by_dtype[dtype] += flops
            self.flop_counts["Global"][func_packet] += flops
        return out


def flop_counter() -> _ByDtype:
    """A FlopCounterMode that counts only the calling thread's operations (mm, conv, ... forward and backward),
    with their split by precision in ``by_dtype``."""
    return _ByDtype()


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs ``fn()`` executes in this thread, as torch's flop counter counts them (a multiply-add is 2)."""
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops()


# --- the machine -----------------------------------------------------------------------------------------


def _clock(threads: int) -> Callable[[], float]:
    """The clock a rate on ``threads`` threads is timed with: the calling thread's CPU time for one thread (what
    other processes on a shared machine take from it is then not counted against it; a single-threaded torch
    kernel runs in the calling thread), else wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


def _has_onednn_fp32() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def matmul_peak(threads: int, kind: str = "fp32 mkl", sizes=(1024, 2048), repeats: int = 10) -> tuple[float, int]:
    """The best GFLOP/s of an n x n matmul over ``sizes`` on ``threads`` intra-op threads (after a warm-up).

    ``kind``: ``fp32 mkl`` (``torch.mm`` on float32: MKL's sgemm on x86), ``fp32 onednn`` (the same product
    through oneDNN, which the convolutions use too), ``bf16`` (``torch.mm`` on bfloat16: oneDNN). They differ
    by machine: on AMD, MKL takes an AVX2 path while oneDNN uses AVX-512, and measured 2-3x apart here.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = _clock(threads)
    best, best_n = 0.0, 0
    try:
        g = torch.Generator().manual_seed(0)
        for n in sizes:
            a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
            if kind == "fp32 mkl":
                out = torch.empty(n, n)
                fn = functools.partial(torch.mm, a, b, out=out)
            elif kind == "fp32 onednn":
                fn = functools.partial(_onednn_mm, a, b.t().contiguous())
            elif kind == "bf16":
                fn = functools.partial(torch.mm, a.bfloat16(), b.bfloat16())
            else:
                raise ValueError(kind)
            fn()  # warm-up
            for _ in range(repeats):
                t0 = clock()
                fn()
                rate = 2 * n**3 / max(clock() - t0, 1e-9) / 1e9
                if rate > best:
                    best, best_n = rate, n
    finally:
        torch.set_num_threads(before)
    return best, best_n


@dataclass
class Peaks:
    """Per thread count, the fp32 peak (the faster of MKL's and oneDNN's matmul: the machine's limit is at least
    that) and the bf16 peak (None where the CPU has no native bf16), measured once."""

    fp32: dict[int, float] = field(default_factory=dict)
    bf16: dict[int, float | None] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def measure(self, threads: int) -> None:
        rates = {"fp32 mkl": matmul_peak(threads, "fp32 mkl")}
        if _has_onednn_fp32():
            rates["fp32 onednn"] = matmul_peak(threads, "fp32 onednn")
        self.fp32[threads] = max(r for r, _ in rates.values())
        self.bf16[threads] = matmul_peak(threads, "bf16")[0] if cpu_bf16() else None
        clock = "CPU time of the thread" if threads == 1 else "wall time"
        parts = ", ".join(f"{k} {r:.1f} (n={n})" for k, (r, n) in rates.items())
        self.lines.append(f"{threads} thread(s), best of {', '.join(map(str, (1024, 2048)))}-square matmuls timed on {clock}: {parts}"
                          f" -> fp32 peak {self.fp32[threads]:.1f} GFLOP/s"
                          + (f"; bf16 (oneDNN) {self.bf16[threads]:.1f}" if self.bf16[threads] else "; no native bf16"))

    def of(self, threads: int, dtype: torch.dtype) -> float:
        if threads not in self.fp32:
            self.measure(threads)
        if dtype == torch.bfloat16 and self.bf16.get(threads):
            return self.bf16[threads]
        return self.fp32[threads]


def machine_facts() -> list[str]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [
        f"cpu: {model}; {os.cpu_count()} logical cores; torch.get_num_threads() = {torch.get_num_threads()}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; load average {os.getloadavg()[0]:.2f} at the start "
        "(anything else running lowers every rate below)",
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}, mkldnn {torch.backends.mkldnn.is_available()}, "
        f"mkl {torch.backends.mkl.is_available()}); python {platform.python_version()}; {platform.platform()}",
    ]


# --- instrumenting the training loop ---------------------------------------------------------------------


class Step(NamedTuple):
    start: float  # wall clock
    end: float
    cpu: float  # seconds on the stepping thread's CPU clock
    process_cpu: float  # seconds on the process's CPU clock (every thread of it)
    samples: int


@dataclass
class TrainCall:
    """One call of ``train``: who made it, on which thread, its steps and validations."""

    who: str
    thread: int
    threads: int  # intra-op threads when it started
    t0: float
    t1: float = 0.0
    cut: str = ""  # the attack job's cut ("" outside attack jobs)
    flops_per_sample: dict[torch.dtype, float] | None = None  # by the precision each operation ran in
    uncounted: str = ""  # why its FLOPs are not counted
    steps: list[Step] = field(default_factory=list)  # its timed steps
    evals: list[tuple[float, float]] = field(default_factory=list)
    alone: bool = False  # no other call's step overlapped its steps (set by the report)

    @property
    def clock(self) -> str:
        return "thread CPU" if self.threads == 1 else "process CPU" if self.alone else "wall"

    @property
    def step_seconds(self) -> float:
        """Seconds inside its steps, on a clock that other processes on a shared machine do not advance: on one intra-op
        thread the stepping thread's CPU time; on several, when nothing else of this process trained meanwhile (the
        victim and the judge train before the attack jobs start), the process's CPU time over the thread count;
        otherwise the wall clock."""
        if self.threads == 1:
            return sum(s.cpu for s in self.steps)
        if self.alone:
            return sum(s.process_cpu for s in self.steps) / self.threads
        return self.wall_seconds

    @property
    def wall_seconds(self) -> float:
        return sum(s.end - s.start for s in self.steps)

    def flops(self, dtype: torch.dtype | None = None) -> float:
        if self.flops_per_sample is None:
            return 0.0
        per = sum(self.flops_per_sample.values()) if dtype is None else self.flops_per_sample.get(dtype, 0.0)
        return per * sum(s.samples for s in self.steps)

    def peak_seconds(self, peaks: Peaks) -> float:
        """Seconds its FLOPs take at the peak of the precision each ran in."""
        if self.flops_per_sample is None:
            return 0.0
        return sum(self.flops(d) / 1e9 / peaks.of(self.threads, d) for d in self.flops_per_sample)


@dataclass
class JobCall:
    group: str
    cut: str
    thread: int
    t0: float
    t1: float = 0.0
    evals: list[tuple[float, float]] = field(default_factory=list)  # the decoder's validations outside train


class Probe:
    """Patches, for this process only, the names the demo's code looks up: the training loop's batcher, its
    ``evaluate``, ``train`` where it is imported, ``run_job`` in the local executor and the runner's phase
    timer. Nothing computed changes; each patch records intervals."""

    def __init__(self):
        self.calls: list[TrainCall] = []
        self.jobs: list[JobCall] = []
        self.phases: list[tuple[str, float, float]] = []
        self.local = threading.local()
        self._undo: list[tuple[object, str, object]] = []

    def _set(self, obj, name, value):
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def __enter__(self):
        import splitaudit.attacks.decoder as decoder
        import splitaudit.attacks.training as training
        import splitaudit.defenses.dpsgd as dpsgd
        import splitaudit.defenses.nopeek as nopeek
        import splitaudit.executors as executors
        import splitaudit.judge as judge
        import splitaudit.runner as runner

        probe = self
        base_shuffled, base_train, base_eval, base_run_job = training._Shuffled, training.train, training.evaluate, executors.run_job

        class TimedShuffled(base_shuffled):
            def __iter__(self):
                call: TrainCall | None = getattr(probe.local, "call", None)
                for batch in super().__iter__():
                    n = int(batch[0].shape[0])
                    if call is None:
                        yield batch
                    elif call.flops_per_sample is None and n:
                        with flop_counter() as counter:  # the first step, counted and not timed
                            yield batch
                        call.flops_per_sample = {d: f / n for d, f in counter.by_dtype.items()}
                    else:
                        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
                        yield batch  # the loop's step runs here: zero_grad, forward, backward, optimizer step
                        call.steps.append(Step(t0, time.perf_counter(), time.thread_time() - c0, time.process_time() - p0, n))

        def make_train(who):
            @functools.wraps(base_train)
            def timed_train(*args, **kwargs):
                call = TrainCall(who=who, thread=threading.get_ident(), threads=torch.get_num_threads(), t0=time.perf_counter())
                job = getattr(probe.local, "job", None)
                if job is not None:
                    call.who, call.cut = job.group, job.cut
                if kwargs.get("wrap") is not None:
                    call.uncounted = "DP-SGD through Opacus (its own loader and per-sample gradients): timed as a whole, not counted"
                probe.calls.append(call)
                outer, probe.local.call = getattr(probe.local, "call", None), call
                try:
                    return base_train(*args, **kwargs)
                finally:
                    call.t1 = time.perf_counter()
                    probe.local.call = outer

            return timed_train

        @functools.wraps(base_eval)
        def timed_eval(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return base_eval(*args, **kwargs)
            finally:
                call, job = getattr(probe.local, "call", None), getattr(probe.local, "job", None)
                if call is not None:
                    call.evals.append((t0, time.perf_counter()))
                elif job is not None:
                    job.evals.append((t0, time.perf_counter()))

        @functools.wraps(base_run_job)
        def timed_run_job(spec, inputs, **kwargs):
            kind = "fit" if spec.kind == "fit" else "refine, clean" if spec.defense == "none" else "refine, adaptive"
            job = JobCall(group=f"attack job: {spec.attack} {kind}", cut=spec.cut, thread=threading.get_ident(), t0=time.perf_counter())
            probe.jobs.append(job)
            probe.local.job = job
            try:
                return base_run_job(spec, inputs, **kwargs)
            finally:
                job.t1 = time.perf_counter()
                probe.local.job = None

        class Timings(runner._Timings):
            def phase(self, name):
                inner = super().phase(name)

                class Recorded:
                    def __enter__(self_):
                        self_.t0 = time.perf_counter()
                        return inner.__enter__()

                    def __exit__(self_, *exc):
                        try:
                            return inner.__exit__(*exc)
                        finally:
                            probe.phases.append((name, self_.t0, time.perf_counter()))

                return Recorded()

        self._set(training, "_Shuffled", TimedShuffled)
        self._set(training, "evaluate", timed_eval)
        self._set(decoder, "evaluate", timed_eval)
        self._set(training, "train", make_train("victim training"))  # builtin victims import it at call time
        for module, who in ((decoder, "attack"), (judge, "judge"), (dpsgd, "defense fine-tuning: dpsgd"),
                            (nopeek, "defense fine-tuning: nopeek")):
            self._set(module, "train", make_train(who))
        self._set(executors, "run_job", timed_run_job)
        self._set(runner, "_Timings", Timings)
        return self

    def __exit__(self, *exc):
        for obj, name, value in reversed(self._undo):
            setattr(obj, name, value)
        return False


# --- the time line ---------------------------------------------------------------------------------------


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``spans`` merged into sorted, disjoint (start, end) pairs."""
    out: list[tuple[float, float]] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _subtract(spans: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``spans`` minus the union of ``holes``, as sorted, disjoint pairs (one pass over both)."""
    holes, out, i = _union(holes), [], 0
    for a, b in _union(spans):
        while i < len(holes) and holes[i][1] <= a:
            i += 1
        cur, j = a, i
        while j < len(holes) and holes[j][0] < b:
            if holes[j][0] > cur:
                out.append((cur, holes[j][0]))
            cur = max(cur, holes[j][1])
            j += 1
        if cur < b:
            out.append((cur, b))
    return out


def union_seconds(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in _union(spans))


def attribute(t0: float, t1: float, layers: list[tuple[str, list[tuple[float, float]]]]) -> dict[str, float]:
    """Seconds of [t0, t1] per layer, each instant going to the first layer active then; the rest is 'other'."""
    remaining = [(t0, t1)]
    out: dict[str, float] = {}
    for name, spans in layers:
        spans = [(max(a, t0), min(b, t1)) for a, b in spans if b > t0 and a < t1]
        secs = union_seconds(remaining) - union_seconds(_subtract(remaining, spans))  # |remaining ∩ spans|
        if secs > 0:
            out[name] = out.get(name, 0.0) + secs
        remaining = _subtract(remaining, spans)
    out["driver, outside every phase (setup, bookkeeping)"] = sum(b - a for a, b in remaining)
    return out


# --- the demo --------------------------------------------------------------------------------------------


def run_demo(profile: str, workers: int) -> tuple[Probe, float, float, float, dict, str]:
    from splitaudit.cli import DEMO_DEFENSES, keep_freed_memory
    from splitaudit.runner import AuditConfig, run_audit
    from splitaudit.writer import write

    keep_freed_memory()  # as the console script does

    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        command = f"splitaudit demo --profile {profile} --workers {workers} --cache-dir {cache} --out {out}"
        config = AuditConfig(model="builtin:lenet", data="builtin:mnist", defenses=DEMO_DEFENSES, profile=profile, out=out,
                             cache_dir=cache, command=command, workers=workers)
        with Probe() as probe:
            t0 = time.perf_counter()
            result = run_audit(config)
            t_written = time.perf_counter()
            write(result, out)
            t1 = time.perf_counter()
    return probe, t0, t_written, t1, result.config, command


def report(probe: Probe, t0: float, t_written: float, t1: float, cfg: dict, peaks: Peaks, all_threads: int) -> float:
    wall = t1 - t0
    calls = probe.calls
    by_group: dict[str, list[TrainCall]] = defaultdict(list)
    for c in calls:
        by_group[c.who].append(c)
    jobs_by_group: dict[str, list[JobCall]] = defaultdict(list)
    for j in probe.jobs:
        jobs_by_group[j.group].append(j)

    def precision(cs: list[TrainCall]) -> str:
        fl = sum(c.flops() for c in cs)
        bf = sum(c.flops(torch.bfloat16) for c in cs)
        return "fp32" if bf == 0 else "bf16" if bf >= 0.995 * fl else f"bf16 {bf / max(fl, 1e-9):.0%}"

    def row(label: str, cs: list[TrainCall], tail: str = "") -> None:
        steps = sum(len(c.steps) for c in cs)
        secs = sum(c.step_seconds for c in cs)
        flops = sum(c.flops() for c in cs)
        thr = ",".join(map(str, sorted({c.threads for c in cs})))
        fp32 = sum(c.flops() / 1e9 / peaks.of(c.threads, torch.float32) for c in cs) / max(secs, 1e-9)
        own = sum(c.peak_seconds(peaks) for c in cs) / max(secs, 1e-9)
        clocks = ",".join(sorted({c.clock for c in cs}))
        print(f"  {label:<34} {len(cs):>5} {steps:>6} {flops / 1e9:>8.1f} {precision(cs):>9} {secs:>7.1f} "
              f"{flops / 1e9 / max(secs, 1e-9):>8.1f} {thr:>3} {fp32:>7.1%} {own:>8.1%}  {clocks:<11}{tail}")

    counted = [c for c in calls if c.flops_per_sample is not None]
    spans = [(s.start, s.end, id(c)) for c in counted for s in c.steps]
    for c in counted:  # did any other call step while this one did?
        mine = _union([(s.start, s.end) for s in c.steps])
        others = [(a, b) for a, b, who in spans if who != id(c)]
        c.alone = union_seconds(mine) - union_seconds(_subtract(mine, others)) < 1e-6
    print("\n  step s: the seconds inside training steps, on a clock other processes do not advance: the stepping thread's CPU")
    print("  clock for one-thread steps; the process's CPU clock over the thread count for multi-thread steps that ran alone in")
    print("  this process; else the wall clock (the 'clock' column). 'of fp32' is the share of those seconds the FLOPs would take")
    print("  at the fp32 peak; 'of own' at the peak of the precision each operation ran in (bf16 under autocast).")
    print(f"\n  {'training, by who':<34} {'calls':>5} {'steps':>6} {'GFLOP':>8} {'precision':>9} {'step s':>7} {'GFLOP/s':>8} {'thr':>3} "
          f"{'of fp32':>7} {'of own':>8}  {'clock':<11}  {'job s':>6} {'outside steps':>13}")
    for who in sorted(by_group):
        cs = by_group[who]
        uncounted = [c for c in cs if c.flops_per_sample is None]
        if uncounted and len(uncounted) == len(cs):
            reason = uncounted[0].uncounted or "no step reached the counter"
            train_s = sum(c.t1 - c.t0 for c in cs)
            print(f"  {who:<34} {len(cs):>5} {'-':>6} {'-':>8} {'-':>9} {train_s:>7.1f} {'-':>8} {cs[0].threads:>3} {'-':>7} {'-':>8}"
                  f"  ({reason})")
            continue
        tail = ""
        js = jobs_by_group.get(who)
        if js:
            job_s = sum(j.t1 - j.t0 for j in js)
            wall_steps = sum(c.wall_seconds for c in cs)
            tail = f"  {job_s:>6.1f} {1 - wall_steps / job_s:>12.0%}"
        row(who, [c for c in cs if c.flops_per_sample is not None],
            tail + (f"  ({len(uncounted)} calls not counted)" if uncounted else ""))
    total_flops = sum(c.flops() for c in counted)
    share = sum(c.flops() / 1e9 / peaks.of(c.threads, torch.float32) for c in counted) / max(sum(c.step_seconds for c in counted), 1e-9)
    own = sum(c.peak_seconds(peaks) for c in counted) / max(sum(c.step_seconds for c in counted), 1e-9)
    wall_share = sum(c.flops() / 1e9 / peaks.of(c.threads, torch.float32) for c in counted) / max(sum(c.wall_seconds for c in counted), 1e-9)
    print(f"  {'all counted training':<34} {'':>5} {'':>6} {total_flops / 1e9:>8.1f} {precision(counted):>9} {'':>7} {'':>8} {'':>3} "
          f"{share:>7.1%} {own:>8.1%}")
    print(f"  the same on the wall clock of every step (waiting for a core included): {wall_share:.1%} of the fp32 peak")

    by_cut: dict[str, list[TrainCall]] = defaultdict(list)
    for c in counted:
        if c.cut:
            by_cut[c.cut].append(c)
    if by_cut:
        print(f"\n  {'attack training, by cut':<34} {'calls':>5} {'steps':>6} {'GFLOP':>8} {'precision':>9} {'step s':>7} {'GFLOP/s':>8} "
              f"{'thr':>3} {'of fp32':>7} {'of own':>8}")
        for cut in sorted(by_cut, key=lambda k: min(c.t0 for c in by_cut[k])):
            row(cut, by_cut[cut])

    counted_steps = [(s.start, s.end) for c in counted for s in c.steps]
    busy = union_seconds(counted_steps)
    print(f"\n  machine level: {total_flops / 1e9:.1f} GFLOP over {busy:.1f} s of wall time with a counted step in flight = "
          f"{total_flops / 1e9 / max(busy, 1e-9):.1f} GFLOP/s, {total_flops / 1e9 / max(busy, 1e-9) / peaks.of(all_threads, torch.float32):.1%} "
          f"of the {all_threads}-thread fp32 peak (idle cores and other processes count against it)")

    # Where the wall time goes: each instant to the first activity running then.
    layers: list[tuple[str, list[tuple[float, float]]]] = []
    for who in sorted(by_group):
        cs = by_group[who]
        if all(c.uncounted for c in cs):
            layers.append((f"training (not counted): {who}", [(c.t0, c.t1) for c in cs]))
        else:
            layers.append((f"training steps: {who}", [(s.start, s.end) for c in cs for s in c.steps]))
    layers.append(("validation inside training", [e for c in calls for e in c.evals] + [e for j in probe.jobs for e in j.evals]))
    layers.append(("training loop between steps (batching, checkpoints, counted steps)", [(c.t0, c.t1) for c in calls]))
    layers.append(("attack job outside training (setup, scoring)", [(j.t0, j.t1) for j in probe.jobs]))
    phase_names = sorted({p for p, _, _ in probe.phases if p not in ("attacks", "defense fine-tuning")})
    for name in phase_names:
        layers.append((f"driver: {name}", [(a, b) for p, a, b in probe.phases if p == name]))
    layers.append(("driver: waiting for jobs", [(a, b) for p, a, b in probe.phases if p == "attacks"]))
    layers.append(("writing results.json, report.html, images", [(t_written, t1)]))
    parts = attribute(t0, t1, layers)
    inside = sum(v for k, v in parts.items() if k.startswith("training steps") or k.startswith("training (not counted)"))
    print(f"\n  wall {wall:.1f} s (run_audit {t_written - t0:.1f} s, then the writer {t1 - t_written:.1f} s); "
          f"{1 - inside / wall:.0%} of it with no training step in flight")
    for name, secs in sorted(parts.items(), key=lambda kv: -kv[1]):
        if secs >= 0.05:
            print(f"    {name:<70} {secs:6.1f} s {secs / wall:5.1%}")
    timings = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cfg.get("timings", {}).items(), key=lambda kv: -kv[1]))
    print(f"  run_audit's own phase timings (s, overlapping the jobs): {timings}")
    print(f"  executor: {cfg.get('executor')}, {cfg.get('workers')} workers, {cfg.get('threads_per_job')} thread(s) per job")
    return share, own


# --- the reference step ----------------------------------------------------------------------------------


def reference_step(batch: int, threads: int, *, act_shape=(6, 28, 28), width: int = 32, full_res: bool = True,
                   repeats: int = 30) -> tuple[dict[torch.dtype, float], float]:
    """GFLOP per step by precision and the median seconds of one training step of the image decoder for
    ``act_shape`` on 1x28x28 inputs, as the decoder attack runs it: channels last, the modality's training loss,
    backward, fused Adam. Timed on the thread's CPU clock on one thread, on the wall clock on more."""
    from splitaudit._torch_compat import adam
    from splitaudit.attacks.decoder import _nhwc
    from splitaudit.attacks.image import ImageModality, InverseNet

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = _clock(threads)
    try:
        g = torch.Generator().manual_seed(0)
        net = _nhwc(InverseNet(act_shape, (1, 28, 28), width, full_res=full_res))
        u = _nhwc(net.fold(torch.randn(batch, *act_shape, generator=g)))
        x = torch.rand(batch, 1, 28, 28, generator=g)
        opt = adam([p for p in net.parameters()], lr=1e-3)
        modality = ImageModality()

        def step():
            opt.zero_grad(set_to_none=True)
            loss = modality.training_loss(net, u, x)
            loss.backward()
            opt.step()

        for _ in range(3):
            step()
        with flop_counter() as counter:
            step()
        times = []
        for _ in range(repeats):
            t0 = clock()
            step()
            times.append(clock() - t0)
        times.sort()
        return {d: f / 1e9 for d, f in counter.by_dtype.items()}, times[len(times) // 2]
    finally:
        torch.set_num_threads(before)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="standard", choices=("quick", "standard"))
    ap.add_argument("--workers", type=int, default=0, help="parallel attack jobs (0: the demo's default)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-demo", action="store_true", help="the peak and the reference step only")
    args = ap.parse_args()

    all_threads = torch.get_num_threads()
    print(f"== bench_efficiency: {' '.join(['python', *sys.argv])}")
    for line in machine_facts():
        print(f"   {line}")
    peaks = Peaks()
    for t in sorted({1, all_threads}):
        peaks.measure(t)
    for line in peaks.lines:
        print(f"   peak on {line}")

    if not args.skip_reference:
        print("\n== reference: one isolated training step of the standard profile's conv decoder at LeNet's conv1 (6x28x28 -> 1x28x28)")
        for batch in (128, 64):
            for t in sorted({1, all_threads}):
                gflop, secs = reference_step(batch, t)
                total = sum(gflop.values())
                at_peak = sum(f / peaks.of(t, d) for d, f in gflop.items())
                prec = "bf16" if gflop.get(torch.bfloat16, 0) >= 0.995 * total else "fp32" if not gflop.get(torch.bfloat16) else "mixed"
                print(f"   batch {batch:>3}, {t} thread(s), {prec}: {total:.3f} GFLOP per step, {secs * 1e3:.1f} ms median "
                      f"({'CPU' if t == 1 else 'wall'} clock), {total / secs:.1f} GFLOP/s, {total / secs / peaks.of(t, torch.float32):.1%} "
                      f"of the fp32 peak, {at_peak / secs:.1%} of its own precision's")

    if args.skip_demo:
        return
    probe, t0, t_written, t1, cfg, command = run_demo(args.profile, args.workers)
    print(f"\n== {command} (in this process, cold cache, training loop instrumented)")
    share, own = report(probe, t0, t_written, t1, cfg, peaks, all_threads)
    print(f"\n   training at {share:.1%} of the fp32 peak ({own:.1%} of the peak of the precision each operation ran in); "
          "FLOPs are torch's flop counter's (matmuls and convolutions, forward and backward; elementwise ops, norms and "
          "Adam's update are not counted)")


if __name__ == "__main__":
    main()
