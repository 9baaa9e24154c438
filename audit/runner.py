"""``run_audit``: the audit as its data flow (shared/DESIGN.md), one stage per module.

config -> scenario (model, data, splits, cuts) -> costs timed on a quiet machine -> prepared models
(fine-tuned on a thread of their own) -> the job graph run through an executor, each cut's activations
captured just before its jobs -> rows (scores, intervals, example grids), flagged -> AuditResult.

Every (cut, defense, attack) job draws its randomness from a generator seeded by a hash of
(seed, cut, defense, attack), so the order of jobs changes nothing. The runner writes only cache
entries; :func:`splitaudit.writer.write` writes the files.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import threading
import time
from contextlib import contextmanager
from typing import Any

import torch

from splitaudit import __version__
from splitaudit.activations import ActivationStore
from splitaudit.cache import Cache
from splitaudit.config import PROFILES, AuditConfig, resolve_device  # noqa: F401  (re-exported)
from splitaudit.costs import LatencyMeter, UtilityMeter, cached_flops
from splitaudit.executors import make_executor
from splitaudit.judge import train_judge
from splitaudit.prepared import PreparedModels
from splitaudit.progress import Reporter
from splitaudit.results import AuditResult
from splitaudit.rows import RowBuilder
from splitaudit.scenario import Scenario, build_scenario
from splitaudit.scheduler import MAX_CUTS_IN_FLIGHT, NOT_RUN, Scheduler  # noqa: F401  (re-exported)


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during the attacks: ``result`` holds the rows that finished (the others failed, not run)."""

    def __init__(self, result: AuditResult):
        super().__init__("interrupted")
        self.result = result


class _Timings(dict):
    """Wall time per phase, for the benchmark and the report."""

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def run_audit(config: AuditConfig, *, reporter: Reporter | None = None) -> AuditResult:
    """Run the whole audit and return its result. On Ctrl-C, raises :class:`AuditInterrupted` holding
    the rows that finished (the caller writes them)."""
    config.validate()
    reporter = reporter or Reporter()
    t_start, timings = time.perf_counter(), _Timings()
    cache = Cache(config.cache_dir, enabled=config.use_cache)
    s = build_scenario(config, cache=cache, reporter=reporter, phase=timings.phase)
    flops = cached_flops(s, cache)
    latency, utility = LatencyMeter(s, flops, timings.phase), UtilityMeter(s, cache)
    cut_infos = latency.cut_infos()  # before anything else runs: latency needs a quiet machine
    # The judge trains before the fine-tuning thread starts: beside it, both ran three times slower.
    judge = train_judge(s, cache, reporter, timings.phase)  # labels reconstructions: the attack accuracy
    prepared = PreparedModels(s, cache, reporter, timings.phase)
    prepared.start()  # DP-SGD and NoPeek fine-tune on a thread of their own from here on
    warming = _warm_report(config) if config.out else None
    executor = make_executor(config.executor, workers=config.workers, device=s.device, ray_address=config.ray_address)
    interrupted = False
    try:
        with executor:
            store = ActivationStore(s, cache, flops)
            sched = Scheduler(s, executor, prepared, store, utility, cache, reporter, timings.phase, judge=judge)
            rows = RowBuilder(s, sched, latency, utility, prepared, timings.phase, grids=config.out is not None, judge=judge,
                              cache=cache)
            sched.on_cut_done = rows.build  # a cut's rows are built while the next cuts train
            try:
                sched.run()
            except KeyboardInterrupt:
                executor.cancel()
                prepared.cancel()
                interrupted = True
        latency.changed_models(prepared, wait=not interrupted)  # quiet again: the jobs have ended
    except BaseException:
        prepared.cancel()  # no fine-tuning left running behind an error
        raise
    if warming is not None:
        warming.join()  # pyplot is not thread-safe: the report is drawn after the warm-up, never beside it
    executor_info = {"executor": executor.name, "workers": executor.workers, "threads_per_job": sched.threads_per_job}
    result_rows = rows.all()
    result = _result(s, cut_infos, result_rows, rows.grids, utility.notes + rows.notes, cache, timings, executor_info, t_start, interrupted, judge,
                     dfil=rows.dfil_info, budget=sched.budget_summary())
    if interrupted:
        raise AuditInterrupted(result)
    return result


def _warm_report(config: AuditConfig) -> threading.Thread:
    """Import and warm up the report's libraries (1.4 s) on a background thread while the workers train;
    a failure shows when the report is written."""

    def warm():
        try:
            from splitaudit.report.html import warm

            warm(config.threshold)
        except Exception:  # noqa: BLE001
            pass

    t = threading.Thread(target=warm, name="splitaudit-warm-report", daemon=True)
    t.start()
    return t


def _environment(device: torch.device) -> dict[str, Any]:
    import numpy

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__, "splitaudit": __version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
    }
    for dist in ("opacus", "scikit-image"):
        try:  # the version only: importing opacus costs seconds
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


def _result(s: Scenario, cut_infos, rows, grids, notes_extra, cache, timings, executor_info, t_start, interrupted, judge,
            dfil: dict | None = None, budget: dict | None = None) -> AuditResult:
    cfg = s.config
    notes = list(s.notes) + list(notes_extra)
    if interrupted:
        done = sum(1 for r in rows if r.error != NOT_RUN)
        notes.insert(0, f"interrupted: {done} of {len(rows)} rows finished; the others are marked failed. Rerun to complete "
                        "(finished attacks are cached).")
    return AuditResult(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        seed=cfg.seed,
        model=s.model_info,
        data={
            "spec": cfg.data, **s.splits.summary(), "shape": list(s.dataset.shape), "labelled": s.dataset.y is not None,
            "hash": s.data_hash, "license": s.dataset.license, "attacker_aux": s.attacker, "aux_data": cfg.aux_data,
            "aux_queries": cfg.aux_queries, "modality": s.modality.name, "warnings": list(s.warnings),
            "judge": None if judge is None else {
                "accuracy": round(judge.accuracy, 5), "chance": round(judge.chance, 5), "classes": judge.num_classes,
                "architecture": type(judge.model).__name__, "trained_on": f"the aux split ({s.splits.aux.n} samples)"},
        },
        environment=_environment(s.device),
        cuts=tuple(cut_infos),
        results=tuple(rows),
        config={
            "profile": cfg.profile, "defenses": [d.spec for d in s.defenses], "attacks": list(cfg.attacks),
            "cuts": [c.name for c in s.cuts], "threshold": cfg.threshold, "reid_threshold": cfg.reid_threshold, "command": cfg.command,
            "skipped_cuts": [list(x) for x in s.discovery.skipped], "seconds": round(time.perf_counter() - t_start, 1),
            "cache": cache.stats(),
            "timings": {k: round(v, 2) for k, v in list(timings.items())},  # a snapshot: a fine-tuning may still add to it
            **executor_info, "interrupted": interrupted,
            **({"dfil": dfil} if dfil is not None else {}),  # how the noise defenses' dFIL references were estimated
            **({"budget": budget} if budget else {}),  # each ledgered attack's training budget across cuts (splitaudit.ledger)
        },
        threshold=cfg.threshold,
        reid_threshold=cfg.reid_threshold,
        notes=tuple(dict.fromkeys(notes)),
        grids=grids,
    )


def list_cuts(model: str, *, weights: str | None = None, data: str | None = None, input_shape: tuple[int, ...] | None = None,
              device: str = "cpu", output: str | None = None, input_norm: str | None = None) -> list[dict[str, Any]]:
    """One dict per candidate cut: name, shape, bytes (f32/fp16/int8), FLOPs and median latency of head and tail.

    Needs no training: a builtin model is measured with its untrained architecture (shapes, bytes,
    FLOPs and latency do not depend on the weights).
    """
    from splitaudit.attacks.modality import modality_for
    from splitaudit.costs import bytes_per_sample, cut_latencies, head_flops
    from splitaudit.cuts import discover_cuts
    from splitaudit.errors import SpecError, UserError
    from splitaudit.models import build_model, check_model_accepts, load_weights
    from splitaudit.outputs import adapt_model, parse_input_norm

    if (data is None) == (input_shape is None):
        raise UserError("give exactly one of --data or --input-shape")
    dev = resolve_device(device)
    if data is not None:
        sample = modality_for(data).load_data(data).x[:2]
    else:
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise SpecError(f"--input-shape must be C,H,W with positive sizes, got {','.join(map(str, input_shape))}")
        sample = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    net = build_model(model, in_channels=sample.shape[1], num_classes=10)
    if weights:
        load_weights(net, weights)
    net = adapt_model(net, output=output, input_norm=parse_input_norm(input_norm), channels=sample.shape[1]).to(dev).eval()
    sample = sample.to(dev)
    check_model_accepts(net, sample)
    disc = discover_cuts(net, sample)
    full = head_flops(net, None, sample[:1])
    lat = cut_latencies(net, disc.names(), sample[:1])
    rows = []
    for c in disc.cuts:
        head = head_flops(net, c.name, sample[:1])
        rows.append({
            "index": c.index, "name": c.name, "module_type": c.module_type, "aliases": list(c.aliases), "shape": list(c.shape),
            "bytes_per_sample": c.sent_bytes or bytes_per_sample(c.shape), "bytes_fp16": bytes_per_sample(c.shape, "float16"),
            "bytes_int8": bytes_per_sample(c.shape, "int8"), "head_flops": head,
            "head_latency_ms": round(lat.head[c.name], 4),
            "tail_flops": max(0, full - head), "tail_latency_ms": round(lat.tail[c.name], 4),
        })
    return rows
