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
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from splitaudit.cuts import _module, _StopForward, capture, head_forward, run_model
from splitaudit.errors import ModelError

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "int8": 1}


def bytes_per_sample(shape: tuple[int, ...], dtype: str = "float32") -> int:
    n = 1
    for s in shape:
        n *= s
    return n * BYTES_PER_ELEMENT[dtype]


class _ThisThreadOnly:
    """Stands in for FlopCounterMode's module tracker, whose hooks are process-wide: a count taken in one thread
    while attack jobs train in others would fire them on those jobs' modules. The totals come from the dispatch
    mode, which is thread-local, and need no module hierarchy."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter(counter: FlopCounterMode | None = None) -> FlopCounterMode:
    """``counter`` (default: a new ``FlopCounterMode(display=False)``) made to count only the calling thread's
    operations (matmuls and convolutions, forward and backward; a multiply-add is 2)."""
    counter = FlopCounterMode(display=False) if counter is None else counter
    counter.mod_tracker = _ThisThreadOnly()
    return counter


@torch.no_grad()
def head_flops(model: nn.Module, cut: str | None, sample: torch.Tensor) -> int:
    """FLOPs of the head for one sample (``cut=None``: the whole model), by ``torch.utils.flop_counter``."""
    model.eval()
    counter = flop_counter()
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


TIMING_BUDGET_S = 1.0  # a series stops after this many seconds once it has MIN_REPEATS timings (a transformer's head)
MIN_REPEATS = 3


def median_ms(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 15, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls; at least ``MIN_REPEATS``
    and at most ``repeats`` timings, fewer once the series has taken ``TIMING_BUDGET_S``."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start > TIMING_BUDGET_S:
            break
    if sync:
        sync()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        if len(times) >= MIN_REPEATS and time.perf_counter() - start > TIMING_BUDGET_S:
            break
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


@dataclass(frozen=True)
class CutLatencies:
    """Medians (ms) from one series of full forward passes: per cut, from the pass's start to the cut's output
    (the head) and from there to the end (the tail); and the whole pass."""

    head: dict[str, float]
    tail: dict[str, float]
    model: float


@torch.no_grad()
def cut_latencies(model: nn.Module, cuts: list[str], sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> CutLatencies:
    """Head and tail latency of every cut in ``cuts`` at once, from one series of full forward passes.

    A hook on each cut module reads the clock when its output exists (after a device sync on CUDA); the
    clock is also read before the pass and when ``forward`` returns. The head of a cut is everything that
    ran before its output, which is exactly what :func:`splitaudit.cuts.head_forward` runs; timing it inside
    the full pass costs one pass per repeat for all cuts together, where timing each head on its own cost a
    series per cut (a transformer's 8 cuts: 8 series of growing heads). A tail is one clock in one pass,
    never a difference of two noisy medians, so it is never negative. The series stops after
    ``TIMING_BUDGET_S`` once it has ``MIN_REPEATS`` timings, as :func:`median_ms` does.
    """
    model.eval()
    sync = _sync_for(sample)
    stamps: dict[str, float] = {}

    def make_hook(cut):
        def hook(module, inputs, output):
            if sync:
                sync()
            stamps.setdefault(cut, time.perf_counter())

        return hook

    def one_pass() -> tuple[float, float]:
        stamps.clear()
        if sync:
            sync()
        t0 = time.perf_counter()
        run_model(model, sample)
        if sync:
            sync()
        end = time.perf_counter()
        missing = [c for c in cuts if c not in stamps]
        if missing:
            raise ModelError(f"cut {missing[0]!r} was not reached in the forward pass")
        return t0, end

    handles = [_module(model, c).register_forward_hook(make_hook(c)) for c in cuts]
    heads: dict[str, list[float]] = {c: [] for c in cuts}
    tails: dict[str, list[float]] = {c: [] for c in cuts}
    whole: list[float] = []
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            one_pass()
            if time.perf_counter() - start > TIMING_BUDGET_S:
                break
        start = time.perf_counter()
        for r in range(repeats):
            if r >= MIN_REPEATS and time.perf_counter() - start > TIMING_BUDGET_S:
                break
            t0, end = one_pass()
            whole.append((end - t0) * 1e3)
            for c in cuts:
                heads[c].append((stamps[c] - t0) * 1e3)
                tails[c].append((end - stamps[c]) * 1e3)
    finally:
        for h in handles:
            h.remove()
    return CutLatencies(head={c: statistics.median(v) for c, v in heads.items()},
                        tail={c: statistics.median(v) for c, v in tails.items()}, model=statistics.median(whole))


def tail_latency_ms(model: nn.Module, cut: str, sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median time from the cut's output to the end of the forward pass: the server's share."""
    return cut_latencies(model, [cut], sample, warmup=warmup, repeats=repeats).tail[cut]


@torch.no_grad()
def head_latency_ms(model: nn.Module, cut: str, sample: torch.Tensor, *, warmup: int = 3, repeats: int = 15) -> float:
    """Median time of the head alone on ``sample`` (its batch size is the one timed): the forward pass stops at the cut."""
    model.eval()
    return median_ms(lambda: head_forward(model, cut, sample), warmup=warmup, repeats=repeats, sync=_sync_for(sample))


def interleaved_medians_ms(fns: list[Callable[[], object]], *, warmup: int = 3, repeats: int = 15,
                           sync: Callable[[], None] | None = None) -> list[float]:
    """Medians of several functions timed in turn, round after round, so that load changes hit all equally.

    Used for defense overheads: the head alone and the head + each defense, measured side by side
    rather than minutes apart, where a busy machine would turn noise into a (possibly negative)
    overhead. One shared head-alone series serves every defense of a cut.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        for fn in fns:
            fn()
        if time.perf_counter() - start > TIMING_BUDGET_S:
            break
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for _ in range(repeats):
        if len(times[0]) >= MIN_REPEATS and time.perf_counter() - start > TIMING_BUDGET_S * len(fns):
            break
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
    """Medians of the head of ``model`` alone, then of each (model, transform)'s head + transform.

    A transform on ``model`` itself (noise, dropout, quantization) adds its own time to the head's, so
    it is timed alone on the head's output and added: a direct measurement, where the difference of
    two series of the head would be noise of the head's own size (a transformer's head is 100 ms, its
    noise 0.1 ms), and one head series serves every such defense. A defense that runs another model
    (fine-tuned) is timed head + transform, in turn with the head alone."""
    model.eval()
    for m, _ in defended:
        m.eval()
    sync = _sync_for(sample)
    other = [(m, tf) for m, tf in defended if m is not model]
    fns: list[Callable[[], object]] = [lambda: head_forward(model, cut, sample)]
    fns += [lambda m=m, tf=tf: tf(head_forward(m, cut, sample)) for m, tf in other]
    base, *rest = interleaved_medians_ms(fns, repeats=repeats, sync=sync)
    own = [tf for m, tf in defended if m is model]
    alone: list[float] = []
    if own:
        z = head_forward(model, cut, sample)
        alone = interleaved_medians_ms([lambda tf=tf: tf(z) for tf in own], repeats=repeats, sync=sync)  # each returns a new tensor
    it_own, it_rest = iter(alone), iter(rest)
    return [base] + [base + next(it_own) if m is model else next(it_rest) for m, _ in defended]


# ------------------------------------------------------------------------------------------------
# The audit's two cost paths: latency (one timing loop) and utility (one prediction path)
# ------------------------------------------------------------------------------------------------
def defense_latencies(model: nn.Module, cut: str, sample1: torch.Tensor, sample64: torch.Tensor,
                      defended: list[tuple[str, nn.Module, Callable]], *, repeats: int) -> dict[str, tuple[float, float, float, float]]:
    """Per defense spec: (head alone, head + defense) in ms at batch 1 and at batch 64.

    ``defended`` holds (spec, the model that defense runs, its fitted transform). The victim's head alone
    and each defense on its own model are timed in turn, round after round, so one head-alone series
    serves every defense and load changes hit all equally. ``none`` is the head alone."""
    pairs = [(m, tf) for _, m, tf in defended]
    base1, *d1 = defense_latency_ms(model, cut, sample1, pairs, repeats=repeats)
    base64, *d64 = defense_latency_ms(model, cut, sample64, pairs, repeats=max(3, repeats // 3))
    out = {spec: (base1, a, base64, b) for (spec, _, _), a, b in zip(defended, d1, d64)}
    return out | {"none": (base1, base1, base64, base64)}


def agreement_of(pred: torch.Tensor, clean: torch.Tensor) -> float:
    """Top-1 agreement with the undefended model; for embeddings (float predictions, unit vectors) the
    mean cosine similarity to the undefended model's."""
    if pred.is_floating_point():
        return float((pred * clean).sum(dim=1).mean())
    return float((pred == clean).float().mean())


def accuracy_of(pred: torch.Tensor, y: torch.Tensor, clean: torch.Tensor | None) -> float:
    """Accuracy on the labels; for embeddings, of the nearest class centroid of the undefended model's
    embeddings of the same inputs (a defense that moves embeddings off their class loses it)."""
    if not pred.is_floating_point():
        return float((pred == y).float().mean())
    ref = clean if clean is not None else pred
    k = int(y.max()) + 1
    centroids = torch.zeros(k, ref.shape[1], dtype=ref.dtype, device=ref.device).index_add_(0, y, ref)
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    return float(((pred @ centroids.T).argmax(dim=1) == y).float().mean())


class UtilityMeter:
    """Accuracy and top-1 agreement with the undefended model, per (cut, defense), from one path.

    A defense's transforms (``draws`` of a stochastic one, averaged) and the model it runs share passes
    over the evaluation data where the model allows it (:func:`splitaudit.cuts.predict_each`). Results
    are cached; a defense that only changes the model predicts the same at every cut and is measured once.
    """

    def __init__(self, scenario, cache):
        from splitaudit import cache_keys

        self.s, self.cache, self.keys = scenario, cache, cache_keys
        # The evaluation samples it measures on: the first n (the split is a random draw), all unless the modality caps it.
        cap = scenario.modality.utility_samples
        self.n = scenario.n_eval if cap is None else min(scenario.n_eval, cap)
        self.x = scenario.x_eval[: self.n]
        self.y = None if scenario.y_eval is None else scenario.y_eval[: self.n]
        self.clean = None if scenario.clean_pred is None else scenario.clean_pred[: self.n]
        self.results: dict[tuple[str, str], dict] = {}  # (cut, defense spec) -> {"accuracy", "agreement"}
        self.notes: list[str] = []
        self._same: dict[tuple[str, str], dict] = {}  # (model hash, spec) -> a cut-independent result

    def measure(self, cut: str, todo: list[tuple[object, nn.Module, str, object, torch.Tensor | None]]) -> None:
        """``todo``: (defense, the model it runs, that model's hash, its fitted transform or None, that model's
        evaluation activations at ``cut`` or None)."""
        s = self.s
        pending: dict[str, tuple[nn.Module, torch.Tensor | None, list]] = {}  # model hash -> (model, activations, [(defense, key, same, transform)])
        for d, model_d, hash_d, fitted, z_eval in todo:
            key = self.keys.utility(model_hash=hash_d, victim=s.model_hash, data_hash=s.data_hash, cut=cut, defense=d.spec,
                                    seed=s.config.seed, profile=s.config.profile, code=self.keys.code_of(type(d), UtilityMeter, capture),
                                    state=None if fitted is None else {**fitted.state, "n": self.n})
            same = (hash_d, d.spec) if not d.transforms_activation and not d.per_cut_model else None
            hit = self.cache.get("utility", key)
            if hit is None and same in self._same:
                hit = self._same[same]
            if hit is None:
                pending.setdefault(hash_d, (model_d, z_eval, []))[2].append((d, key, same, fitted))
            else:
                self._record(cut, d.spec, hit, same)
        for model_d, z_eval, items in pending.values():
            z = None if z_eval is None else z_eval[: self.n]
            for (d, key, same, _), (acc, agree) in zip(items, self._measure(model_d, cut, [(d, f) for d, _, _, f in items], z)):
                hit = {"accuracy": acc, "agreement": agree}
                self.cache.put("utility", key, hit)
                self._record(cut, d.spec, hit, same)

    def _record(self, cut: str, spec: str, hit: dict, same) -> None:
        if same is not None:
            self._same[same] = hit
        self.results[(cut, spec)] = hit

    def _measure(self, model_d: nn.Module, cut: str, ds: list, z_eval: torch.Tensor | None = None) -> list[tuple[float | None, float | None]]:
        from splitaudit.seeding import job_generator

        s = self.s
        draws: list[tuple[int, Callable | None]] = []  # (which defense, transform at the cut; None: the model as it is)
        for k, (d, fitted) in enumerate(ds):
            for i in range(min(s.settings["draws"], s.modality.utility_draws) if d.stochastic else 1):
                gen = job_generator(s.config.seed, cut, d.spec, "utility", i)
                draws.append((k, None if fitted is None else (lambda z, _f=fitted, _g=gen: _f(z, generator=_g))))
        preds = self._predict_each(model_d, cut, [t for _, t in draws], z_eval)
        out = []
        for k in range(len(ds)):
            mine = [p for (j, _), p in zip(draws, preds) if j == k and p is not None]
            accs = [accuracy_of(p, self.y, self.clean) for p in mine] if self.y is not None else []
            agrees = [agreement_of(p, self.clean) for p in mine] if self.clean is not None else []
            out.append((sum(accs) / len(accs) if accs else None, sum(agrees) / len(agrees) if agrees else None))
        return out

    def _predict_each(self, model: nn.Module, cut: str, transforms: list[Callable | None],
                      z_eval: torch.Tensor | None = None) -> list[torch.Tensor | None]:
        """Predictions with each transform applied at ``cut`` (None: the model as it is), sharing passes. A model
        that runs its tail alone (``forward_from``) runs it on the transformed ``z_eval``, its captured evaluation
        activations, instead of running the head again. Where the shared passes fail, each transform is measured
        on its own: one defense the model rejects leaves the others their numbers."""
        from splitaudit.cuts import predict, predict_each, predict_from, runs_from

        s = self.s
        try:
            plain = None
            if None in transforms:
                plain = self.clean if model is s.model and self.clean is not None else predict(model, self.x)
            given = [t for t in transforms if t is not None]
            if z_eval is not None and runs_from(model, cut):
                applied = iter(predict_from(model, self.x, cut, z_eval, given))
            else:
                applied = iter(predict_each(model, self.x, cut, given))
            return [plain if t is None else next(applied) for t in transforms]
        except ModelError as exc:
            if len(transforms) > 1:
                return [self._predict_each(model, cut, [t], z_eval)[0] for t in transforms]
            self.notes.append(f"accuracy not measured: {exc}")
            return [None]


class LatencyMeter:
    """Every latency of an audit, timed on a quiet machine: the heads, tails and same-model defenses
    before the attack jobs start, the models the defenses change after the jobs end."""

    FIT_SAMPLES = 64  # aux samples a defense is fitted on for timing (its cost does not depend on its fit)

    def __init__(self, scenario, flops: Callable[[str | None], int], phase):
        self.s, self.flops, self.phase = scenario, flops, phase
        self.latency: dict[tuple[str, str], tuple[float, float, float, float]] = {}  # (cut, spec) -> see defense_latencies

    def _time(self, cut: str, defended: list[tuple[object, nn.Module]]) -> None:
        from splitaudit.cuts import capture
        from splitaudit.seeding import job_generator

        s = self.s
        rows = []
        for d, model_d in defended:
            fitted = d.fit(capture(model_d, cut, s.x_aux[: self.FIT_SAMPLES]) if d.transforms_activation else None)
            gen = job_generator(s.config.seed, cut, d.spec, "latency")
            rows.append((d.spec, model_d, lambda z, _f=fitted, _g=gen: _f(z, generator=_g)))
        by = defense_latencies(s.model, cut, s.x_eval[:1], s.x_eval[:64], rows, repeats=s.settings["latency_repeats"])
        # The head alone is kept from its first timing (the one its CutInfo reports); each defense's overhead is
        # against the head-alone series timed beside it.
        self.latency.update({(cut, spec): v for spec, v in by.items() if spec != "none" or (cut, "none") not in self.latency})

    def cut_infos(self) -> list:
        """A :class:`CutInfo` per cut (bytes, FLOPs and latency of head and tail), timing the victim's heads and
        tails (one series of full passes for every cut, at batch 1 and at batch 64) and each defense that leaves
        the model as it is (its transform timed alone on the head's output, added to the head's time)."""
        from splitaudit.results import CutInfo

        s = self.s
        same_model = [d for d in s.defenses if d.spec != "none" and not d.changes_model]
        reps, names = s.settings["latency_repeats"], [c.name for c in s.cuts]
        infos = []
        with self.phase("latency"):
            b1 = cut_latencies(s.model, names, s.x_eval[:1], repeats=reps)
            b64 = cut_latencies(s.model, names, s.x_eval[:64], repeats=max(3, reps // 3))
            if "flops" not in s.model_info:  # the planner's all-on-the-device and all-on-the-server placements
                s.model_info.update(flops=self.flops(None), latency_ms=round(b1.model, 4))
            own = self._transform_ms(names, same_model, reps) if same_model else {}
            for cut in s.cuts:
                h1, h64 = b1.head[cut.name], b64.head[cut.name]
                self.latency[(cut.name, "none")] = (h1, h1, h64, h64)
                for d in same_model:
                    t1, t64 = own[(cut.name, d.spec)]
                    self.latency[(cut.name, d.spec)] = (h1, h1 + t1, h64, h64 + t64)
                head = self.flops(cut.name)
                infos.append(CutInfo(
                    name=cut.name, shape=cut.shape, bytes_per_sample=cut.sent_bytes or bytes_per_sample(cut.shape), head_flops=head,
                    head_latency_ms=round(h1, 4), bytes_fp16=bytes_per_sample(cut.shape, "float16"),
                    bytes_int8=bytes_per_sample(cut.shape, "int8"), index=cut.index, module_type=cut.module_type,
                    aliases=cut.aliases, head_latency_ms_b64=round(h64, 4),
                    tail_flops=max(0, s.model_info["flops"] - head), tail_latency_ms=round(b1.tail[cut.name], 4),
                ))
        return infos

    def _transform_ms(self, cuts: list[str], defenses: list, reps: int) -> dict[tuple[str, str], tuple[float, float]]:
        """(cut, spec) -> the median time (ms) of the defense's transform alone on the head's output, at batch 1 and
        64, each cut's transforms timed in turn. A defense is fitted (its cost does not depend on its fit) on the
        activations of a few aux samples, captured with the two timing samples in one pass per batch for every cut."""
        from splitaudit.cuts import capture_many
        from splitaudit.seeding import job_generator

        s = self.s
        z_fit = capture_many(s.model, cuts, s.x_aux[: self.FIT_SAMPLES])
        z1, z64 = capture_many(s.model, cuts, s.x_eval[:1]), capture_many(s.model, cuts, s.x_eval[:64])
        sync = _sync_for(s.x_eval)
        out = {}
        for cut in cuts:
            tfs = []
            for d in defenses:
                fitted, gen = d.fit(z_fit[cut] if d.transforms_activation else None), job_generator(s.config.seed, cut, d.spec, "latency")
                tfs.append(lambda z, _f=fitted, _g=gen: _f(z, generator=_g))
            at1 = interleaved_medians_ms([lambda tf=tf: tf(z1[cut]) for tf in tfs], repeats=reps, sync=sync)
            at64 = interleaved_medians_ms([lambda tf=tf: tf(z64[cut]) for tf in tfs], repeats=max(3, reps // 3), sync=sync)
            out.update({(cut, d.spec): (a, b) for d, a, b in zip(defenses, at1, at64)})
        return out

    def changed_models(self, prepared, *, wait: bool) -> None:
        """Time the heads of the changed models that exist (after the attack jobs: a quiet machine again).
        ``wait``: first let a fine-tuning that no job needed finish."""
        s = self.s
        if wait:
            prepared.wait()
        for cut in s.cuts:
            pairs = [(d, prepared.get(d, cut.name)[0]) for d in s.defenses if d.changes_model and prepared.ready(d, cut.name)]
            if pairs:
                with self.phase("latency"):
                    self._time(cut.name, pairs)

    def row_fields(self, cut: str, spec: str) -> dict[str, float | None]:
        """The latency fields of a row; None where not measured (yet: a changed model is timed last)."""
        if (cut, spec) not in self.latency:
            return dict.fromkeys(("latency_ms", "latency_overhead_ms", "latency_ms_b64", "latency_overhead_ms_b64"))
        base1, lat_d1, base64, lat_d64 = self.latency[(cut, spec)]
        return dict(latency_ms=round(lat_d1, 4), latency_overhead_ms=round(lat_d1 - base1, 4),
                    latency_ms_b64=round(lat_d64, 4), latency_overhead_ms_b64=round(lat_d64 - base64, 4))


def cached_flops(scenario, cache) -> Callable[[str | None], int]:
    """Head FLOPs for one sample at a cut (None: the whole model), from the cache: counting is slow to
    start and never changes for the same model and input shape."""
    from splitaudit import cache_keys

    def flops(cut: str | None) -> int:
        key = cache_keys.flops(scenario.model_hash, tuple(scenario.x_eval.shape[1:]), cut)
        hit = cache.get("flops", key)
        if hit is not None:
            return int(hit["flops"])
        value = head_flops(scenario.model, cut, scenario.x_eval[:1])
        cache.put("flops", key, {"flops": value})
        return value

    return flops
