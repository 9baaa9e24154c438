"""The audit grid: for each cut, capture activations once; for each defense, defend; for each attack,
fit on aux and reconstruct eval; score; measure costs. Everything ends up in one AuditResult.

Every (cut, defense, attack) job draws its randomness from a generator seeded by a hash of
(seed, cut, defense, attack), so the order of jobs changes nothing.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import datetime as _dt
import hashlib
import importlib.metadata
import math
import os
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import splitaudit.attacks  # noqa: F401  (registers attacks)
import splitaudit.defenses  # noqa: F401  (registers defenses)
from splitaudit.attacks.base import ATTACKS, make_attack
from splitaudit.attacks.training import TrainConfig, train
from splitaudit import __version__
from splitaudit.cache import Cache, key_of
from splitaudit.costs import (
    bytes_per_sample, defense_latency_ms, head_flops, head_latency_ms, training_thread_count,
)
from splitaudit.cuts import Discovery, capture, capture_many, discover_cuts, predict, predict_each, run_model
from splitaudit.data import Splits, data_hash, load_data, make_splits
from splitaudit.errors import DataError, ModelError, SpecError, UserError
from splitaudit.executors import make_executor
from splitaudit.jobs import N_GRID, N_WORST, Activations, JobInputs, JobOutput, JobSpec, Scores, job_generator
from splitaudit.metrics import Resamples, most_recognizable, psnr, ssim, summarize
from splitaudit.models import BUILTIN_MODELS, build_user_model, builtin_cache_key, load_weights, state_hash
from splitaudit.progress import Reporter, open_task
from splitaudit.results import AuditResult, CutInfo, ResultRow
from splitaudit.specs import parse_model_spec
from splitaudit.defenses.base import Defense, PrepareContext, make_defense

PREFETCH_BYTES = 256 << 20  # activations one capture pass takes ahead of the cut asked for, at most
ACT_CACHE_ALWAYS_BYTES = 4 << 20  # activations this small are cached whatever their head costs
ACT_CACHE_FLOPS_PER_BYTE = 25  # larger ones only when their head costs at least this per byte

PROFILES: dict[str, dict[str, Any]] = {
    # max_aux caps the attacker's data; draws: how many draws of a stochastic defense utility averages
    "quick": {"n_eval": 1000, "max_aux": 1000, "latency_repeats": 7, "draws": 2, "adaptive_epochs": 2},
    "standard": {"n_eval": 1000, "max_aux": 2000, "latency_repeats": 15, "draws": 3, "adaptive_epochs": 2},
    "thorough": {"n_eval": 1000, "max_aux": None, "latency_repeats": 30, "draws": 5, "adaptive_epochs": 0},
}


@dataclass(frozen=True)
class AuditConfig:
    model: str
    data: str
    weights: str | None = None
    cuts: tuple[str, ...] = ()
    defenses: tuple[str, ...] = ("none",)
    attacks: tuple[str, ...] = ("decoder",)
    profile: str = "standard"
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    threshold: float = 0.3
    cache_dir: str | None = None
    use_cache: bool = True
    command: str | None = None  # the command line, for the reproducibility section
    aux_data: str | None = None  # the attacker's own data, when it is not the evaluation distribution
    aux_queries: str = "data"  # data | noise: query the head with the aux images or with random inputs
    executor: str = "local"  # local | ray: where the attack jobs run
    workers: int = 0  # parallel attack jobs; 0 picks by device (CPU cores, capped at 4; 1 on CUDA)
    ray_address: str | None = None  # an existing Ray cluster; None starts a local runtime

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise SpecError(f"unknown profile {self.profile!r}; known profiles: {', '.join(PROFILES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SpecError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.aux_queries not in ("data", "noise"):
            raise SpecError(f"unknown --aux-queries {self.aux_queries!r}; choose data or noise")
        if self.executor not in ("local", "ray"):
            raise SpecError(f"unknown executor {self.executor!r}; choose local or ray")
        if self.workers < 0:
            raise SpecError(f"--workers must be 0 (auto) or positive, got {self.workers}")
        if not self.attacks:
            raise SpecError("no attack given; known attacks: " + ", ".join(sorted(ATTACKS)))
        if self.executor == "ray":
            from splitaudit.ray_executor import require_ray

            require_ray()
        if not 0 < self.threshold <= 1:
            raise SpecError(f"threshold {self.threshold} is out of range; allowed: (0, 1]")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available on this machine")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------
def _classify_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def train_builtin(name: str, splits: Splits, *, seed: int, device: torch.device, reporter: Reporter) -> nn.Module:
    b = BUILTIN_MODELS[name]
    victim = splits.victim
    if victim.y is None:
        raise DataError(f"builtin:{name} is trained on first use and needs labelled data; {victim.spec!r} has no labels")
    num_classes = int(victim.y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = b.build(victim.shape[0], num_classes).to(device)
    check_model_accepts(model, victim.x[:2].to(device))
    gen = job_generator(seed, "victim", name)
    x = victim.x.to(device)
    # All intra-op threads: nothing else runs yet. (LeNet on 2 cores: 2.2 s against 3.1-3.4 s on one
    # thread. One thread was faster only with OMP_WAIT_POLICY=PASSIVE, where each hand-off wakes a
    # sleeping thread.)
    with reporter.task(f"training builtin:{name} on {victim.n} victim images", total=b.epochs, keep=True) as task:
        # Channels-last trains these small convolutions about a third faster; the model is handed back
        # in the default layout, the one a user's model has, so latency is timed as deployed.
        train(
            model.to(memory_format=torch.channels_last),
            _classify_loss,
            (x.contiguous(memory_format=torch.channels_last), victim.y.to(device)),
            config=TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, patience=None),
            generator=gen,
            on_epoch=lambda ep, tr, va: task.update(ep),
        )
    return model.to(memory_format=torch.contiguous_format).eval()


def check_model_accepts(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.eval()
        out = run_model(model, x)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}, not a tensor")


def load_model(
    spec: str, *, weights: str | None, splits: Splits, seed: int, device: torch.device, cache: Cache, reporter: Reporter
) -> tuple[nn.Module, dict[str, Any]]:
    parsed = parse_model_spec(spec)
    info: dict[str, Any] = {"spec": spec}
    if parsed.kind == "builtin":
        if parsed.target not in BUILTIN_MODELS:
            raise SpecError(f"unknown builtin model {parsed.target!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
        b = BUILTIN_MODELS[parsed.target]
        y = splits.victim.y
        num_classes = int(y.max()) + 1 if y is not None else 10
        with torch.random.fork_rng(devices=[]):
            model = b.build(splits.victim.shape[0], num_classes)
        if weights:
            load_weights(model, weights)
            info["weights"] = str(weights)
        else:
            key = builtin_cache_key(parsed.target, data_hash(splits.victim), splits.victim.shape[0], num_classes)
            state = cache.get("models", key)
            if state is not None:
                model.load_state_dict(state)
                info["trained"] = "cached"
            else:
                t0 = time.perf_counter()
                model = train_builtin(parsed.target, splits, seed=0, device=device, reporter=reporter)
                info["trained"] = f"on first use, {time.perf_counter() - t0:.1f} s"
                cache.put("models", key, {k: v.cpu() for k, v in model.state_dict().items()})
            info["trained_on"] = f"{splits.victim.spec} victim split ({splits.victim.n} images)"
    else:
        model = build_user_model(spec)
        if weights:
            load_weights(model, weights)
            info["weights"] = str(weights)
    model = model.to(device).eval()
    check_model_accepts(model, splits.eval.x[:2].to(device))
    info["class"] = type(model).__name__
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["hash"] = state_hash(model)
    return model, info


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------
@dataclass
class _Scored:
    ssim: torch.Tensor
    psnr: torch.Tensor
    recon: torch.Tensor


def _environment(device: torch.device) -> dict[str, Any]:
    import numpy

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "splitaudit": __version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    for dist in ("opacus", "scikit-image"):
        try:  # the version only: importing opacus costs seconds
            env[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return env


class _Grid:
    """State shared by the jobs of one audit (model, data, caches); one method per stage."""

    def __init__(self, config: AuditConfig, reporter: Reporter):
        self.config = config
        self.reporter = reporter
        self.profile = PROFILES[config.profile]
        self.device = resolve_device(config.device)
        self.cache = Cache(config.cache_dir, enabled=config.use_cache)
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self._prefetched: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # model hash -> cut -> activations
        self._captured_names: dict[str, set[str]] = {}  # model hash -> cuts captured (held or handed out)

    @contextmanager
    def phase(self, name: str):
        """Accumulate wall time per phase, for the benchmark and the report."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # -- setup --
    def setup(self) -> None:
        cfg = self.config
        self.defenses: list[Defense] = [make_defense(s) for s in cfg.defenses]  # validate before heavy work
        specs = [d.spec for d in self.defenses]
        if len(set(specs)) != len(specs):
            raise SpecError(f"a defense is given twice: {', '.join(specs)}")
        if "none" not in specs:  # the baseline every defense is compared with, and adaptive attacks start from
            self.defenses.insert(0, make_defense("none"))
            self.notes.append("defense 'none' added: the undefended model is the baseline every defense is compared with")
        for a in cfg.attacks:
            make_attack(a, profile=cfg.profile)
        with self.phase("data"):
            self.dataset = load_data(cfg.data)
            h, w = self.dataset.shape[-2:]
            if min(h, w) < 11:
                raise DataError(
                    f"{cfg.data!r} has {h}x{w} images; leakage is scored by SSIM with an 11x11 window (as in scikit-image), "
                    "so images must be at least 11x11"
                )
            self.splits = make_splits(self.dataset, seed=cfg.seed, n_eval=self.profile["n_eval"], max_aux=self.profile["max_aux"])
            self.data_hash = data_hash(self.dataset)
        with self.phase("model"):
            self.model, self.model_info = load_model(
                cfg.model, weights=cfg.weights, splits=self.splits, seed=cfg.seed, device=self.device, cache=self.cache,
                reporter=self.reporter,
            )
        self.model_hash = self.model_info["hash"]
        dev = self.device
        self.x_aux, self.attacker = self._attacker_data()
        self.x_aux = self.x_aux.to(dev)
        self.x_eval = self.splits.eval.x.to(dev)
        self.y_eval = self.splits.eval.y.to(dev) if self.splits.eval.y is not None else None
        self.discovery: Discovery = discover_cuts(self.model, self.x_eval[:2])
        if not self.discovery.cuts:
            raise ModelError("the model has no candidate cut: no submodule returns a tensor")
        picked = [self.discovery.get(c) for c in cfg.cuts] if cfg.cuts else list(self.discovery.cuts)
        self.cuts = list({c.name: c for c in picked}.values())  # a cut named twice (or by an alias) is audited once
        self.clean_pred = self._predict(self.model)
        # Every row's intervals come from the same resamples of the evaluation images (a paired bootstrap).
        self.resamples = Resamples(self.x_eval.shape[0], generator=job_generator(cfg.seed, "bootstrap"))
        # The no-information baseline: the mean aux image, scored like a reconstruction.
        prior = self.x_aux.mean(dim=0, keepdim=True).expand_as(self.x_eval)
        self.baseline_ssim = float(ssim(prior, self.x_eval).mean())
        self.baseline_psnr = float(psnr(prior, self.x_eval, max_db=100.0).mean())

    def flops(self, cut: str) -> int:
        """Head FLOPs for one sample; cached (counting is slow to start and never changes)."""
        key = key_of("flops", self.model_hash, tuple(self.x_eval.shape[1:]), cut)
        hit = self.cache.get("flops", key)
        if hit is not None:
            return int(hit["flops"])
        value = head_flops(self.model, cut, self.x_eval[:1])
        self.cache.put("flops", key, {"flops": value})
        return value

    def _attacker_data(self) -> tuple[torch.Tensor, str]:
        """The images the attacker queries the head with, and a sentence saying what they are."""
        cfg, aux = self.config, self.splits.aux
        self.aux_key = ("split", cfg.aux_queries)
        if cfg.aux_data:
            if cfg.aux_data == cfg.data:
                raise UserError("--aux-data is the evaluation data itself; leave it out to use a disjoint split of it")
            other = load_data(cfg.aux_data)
            self.aux_key = (data_hash(other), cfg.aux_queries)
            if other.shape != self.dataset.shape:
                raise DataError(
                    f"--aux-data {cfg.aux_data!r} has images of shape {other.shape}, but the model's inputs are {self.dataset.shape}"
                )
            n = min(other.n, self.profile["max_aux"] or other.n)
            idx = torch.randperm(other.n, generator=job_generator(cfg.seed, "aux-data"))[:n]
            aux = other.subset(idx)
            what = f"{n} images from {cfg.aux_data} (another distribution than the evaluation data)"
        else:
            what = f"{aux.n} images from a split of {cfg.data} disjoint from the victim's training and evaluation images"
        if cfg.aux_queries == "noise":
            x = torch.rand(aux.x.shape, generator=job_generator(cfg.seed, "aux-noise"))
            return x, f"{aux.n} uniform random inputs (the attacker has no data of its own)"
        return aux.x, what

    def _predict(self, model) -> torch.Tensor | None:
        try:
            return predict(model, self.x_eval)
        except ModelError as exc:
            self.notes.append(f"accuracy not measured: {exc}")
            return None

    def _predict_each(self, model, cut: str, transforms: list[Callable | None]) -> list[torch.Tensor | None]:
        """Predictions with each transform applied at ``cut`` (None: the model as it is), sharing passes.
        Where the shared passes fail, each transform is measured on its own: one defense the model
        rejects leaves the others their numbers."""
        try:
            plain = None
            if None in transforms:
                plain = self.clean_pred if model is self.model and self.clean_pred is not None else predict(model, self.x_eval)
            applied = iter(predict_each(model, self.x_eval, cut, [t for t in transforms if t is not None]))
            return [plain if t is None else next(applied) for t in transforms]
        except ModelError as exc:
            if len(transforms) > 1:
                return [self._predict_each(model, cut, [t])[0] for t in transforms]
            self.notes.append(f"accuracy not measured: {exc}")
            return [None]

    # -- activations --
    def _act_key(self, model_hash: str, cut: str) -> str:
        return key_of("act", model_hash, self.data_hash, self.config.seed, self.config.profile, cut, self.aux_key)

    def activations(self, model: nn.Module, model_hash: str, cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._act_key(model_hash, cut)
        hit = self.cache.get("activations", key)
        if hit is not None:
            return hit["aux"].to(self.device), hit["eval"].to(self.device)
        z_aux, z_eval = self._captured(model, model_hash, cut)
        # Kept only when reading them back beats computing them again: a large activation from a cheap
        # head (LeNet's conv1: 38 MB from 12 FLOPs a byte) is recaptured in 80 ms, where saving it took
        # 190 ms and loading it 100 ms (about 25 FLOPs of head per byte break even on a CPU).
        nbytes = z_aux.nbytes + z_eval.nbytes
        if nbytes < ACT_CACHE_ALWAYS_BYTES or self.flops(cut) >= ACT_CACHE_FLOPS_PER_BYTE * bytes_per_sample(tuple(z_eval.shape[1:])):
            self.cache.put("activations", key, {"aux": z_aux.cpu(), "eval": z_eval.cpu()})
        return z_aux, z_eval

    def _captured(self, model: nn.Module, model_hash: str, cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``cut``'s activations of aux and evaluation images. One pass over the data captures the cuts
        after it too (those neither captured yet nor in the cache, up to ``PREFETCH_BYTES`` together),
        held until asked for: LeNet's 11 cuts take two passes per model instead of one head each."""
        held = self._prefetched.setdefault(model_hash, {})
        if cut in held:
            return held.pop(cut)
        done = self._captured_names.setdefault(model_hash, set())
        names = [c.name for c in self.cuts]
        n = self.x_aux.shape[0] + self.x_eval.shape[0]
        group, total = [cut], 0
        # A model's first cut is captured on its own: its jobs can start after its head alone, and the
        # pass for the cuts after it runs beside them.
        for c in self.cuts[names.index(cut) + 1:] if cut in names and done else []:
            if c.name in done or self.cache.has("activations", self._act_key(model_hash, c.name)):
                continue
            total += 4 * n * c.numel  # float32
            if total > PREFETCH_BYTES:
                break
            group.append(c.name)
        try:
            z_aux, z_eval = capture_many(model, group, self.x_aux), capture_many(model, group, self.x_eval)
        except ModelError:
            if len(group) == 1:
                raise
            # A later cut this pass did not reach (control flow that depends on the data) must not fail
            # this one: it is captured alone, the later cuts when they are asked for.
            group = [cut]
            z_aux, z_eval = capture_many(model, group, self.x_aux), capture_many(model, group, self.x_eval)
        done.update(group)
        held.update({c: (z_aux[c], z_eval[c]) for c in group[1:]})
        return z_aux[cut], z_eval[cut]


def run_audit(config: AuditConfig, *, reporter: Reporter | None = None) -> AuditResult:
    """Run the whole grid and return the result; writes ``config.out`` when it is set.

    Three stages: (1) the models the defenses change and every latency, timed while nothing else
    runs; (2) the attack jobs, through the executor, a few cuts at a time (a cut's activations are
    captured just before its jobs are submitted and dropped when they end); (3) rows, flags, files.
    On Ctrl-C the finished rows are written (marked interrupted) and KeyboardInterrupt is re-raised.
    """
    config.validate()
    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    g = _Grid(config, reporter)
    g.setup()
    executor = make_executor(config.executor, workers=config.workers, device=g.device, ray_address=config.ray_address)
    cut_infos, latency = _costs(g)
    # The models the defenses change are fine-tuned on a thread of their own while the workers start
    # on the undefended attacks, which need only the victim.
    prepared = _Prepared(g)
    prepared.start()
    warming = None
    if config.out:  # the report's libraries (1.4 s to import and warm up), readied while the workers train
        warming = threading.Thread(target=_warm_report, args=(config.threshold,), name="splitaudit-warm-report", daemon=True)
        warming.start()
    interrupted = False
    try:
        with executor:
            grid = _AttackGrid(g, executor, prepared)
            # A cut's rows (summaries, image grids) are built as soon as its last job ends, while the
            # workers train the next cuts' attacks, not all at the end.
            rows = _Rows(g, grid, latency, prepared, Path(config.out) if config.out else None)
            grid.on_cut_done = rows.build
            try:
                grid.run()
            except KeyboardInterrupt:
                executor.cancel()
                prepared.cancel()
                interrupted = True
        g.executor_info = {"executor": executor.name, "workers": executor.workers, "threads_per_job": grid.threads_per_job}
        _changed_model_latency(g, prepared, latency, wait=not interrupted)  # quiet again: the jobs have ended
    except BaseException:
        prepared.cancel()  # no fine-tuning left running behind an error
        raise
    rows = rows.all()
    if warming is not None:
        warming.join()  # pyplot is not thread-safe: the report is drawn after the warm-up, never beside it
    result = _result(g, config, cut_infos, rows, t_start, interrupted)
    if interrupted:
        raise AuditInterrupted(result)
    return result


NOT_RUN = "not run: the audit was interrupted"
MAX_CUTS_IN_FLIGHT = 8


class AuditInterrupted(KeyboardInterrupt):
    """Ctrl-C during the attacks: ``result`` holds the rows that finished (already written to disk)."""

    def __init__(self, result: AuditResult):
        super().__init__("interrupted")
        self.result = result


class _Prepared:
    """The models the defenses change (DP-SGD, NoPeek), fine-tuned one after another on a thread of
    their own; ``get`` waits for one. A failure is raised where the model is needed."""

    def __init__(self, g: _Grid):
        self.g = g
        self._futures: dict[tuple[str, str | None], cf.Future] = {}
        self._stop = threading.Event()

    def start(self) -> None:
        keys = [(d, c.name if d.per_cut_model else None) for d in self.g.defenses if d.changes_model
                for c in (self.g.cuts if d.per_cut_model else self.g.cuts[:1])]
        if not keys:
            return
        # Copied here, while no hook is on it: the driver stops forward passes at cuts with hooks.
        victim = copy.deepcopy(self.g.model)
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitaudit-prepare")
        # A thread keeps the intra-op thread count it first ran with. Fixed here, before an executor
        # changes the process's count, so the fine-tuned weights never depend on --workers.
        before = torch.get_num_threads()
        torch.set_num_threads(training_thread_count(victim, self.g.x_eval))
        try:
            pool.submit(torch.get_num_threads).result()
        finally:
            torch.set_num_threads(before)
        for d, cut in keys:
            self._futures[(d.spec, cut)] = pool.submit(self._prepare, d, cut, victim)
        pool.shutdown(wait=False)

    def _prepare(self, defense: Defense, cut: str | None, victim: nn.Module):
        if self._stop.is_set():
            raise KeyboardInterrupt
        with self.g.phase("defense fine-tuning"):
            return _prepare_model(self.g, defense, cut, victim, self._stop)

    @staticmethod
    def _key(defense: Defense, cut: str) -> tuple[str, str | None]:
        return (defense.spec, cut if defense.per_cut_model else None)

    def get(self, defense: Defense, cut: str) -> tuple[nn.Module, str, dict]:
        """The changed model, its hash and what the change did (waits for the fine-tuning)."""
        if not defense.changes_model:
            return self.g.model, self.g.model_hash, {}
        fut = self._futures[self._key(defense, cut)]
        if not fut.done():
            with self.g.phase("waiting for fine-tuning"):
                fut.result()
        return fut.result()

    def done(self, defense: Defense, cut: str) -> bool:
        """Whether ``get`` would return (or raise) without waiting."""
        if not defense.changes_model:
            return True
        fut = self._futures.get(self._key(defense, cut))
        return fut is None or fut.done()

    def ready(self, defense: Defense, cut: str) -> bool:
        """Whether the model is there (a change that failed or never ran is not)."""
        if not defense.changes_model:
            return True
        fut = self._futures.get(self._key(defense, cut))
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def info(self, defense: Defense, cut: str) -> dict:
        return self.get(defense, cut)[2] if self.ready(defense, cut) else {}

    def error(self, defense: Defense, cut: str) -> str | None:
        """Why a changed model is missing: its fine-tuning's error, or None."""
        fut = self._futures.get(self._key(defense, cut)) if defense.changes_model else None
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is None:
            return None
        return f"fine-tuning for {defense.spec} failed: {_error(fut.exception())}"

    def raise_user_error(self) -> None:
        """A fine-tuning that failed on bad input (say, a layer Opacus refuses) ends the audit at once: exit 2."""
        for fut in self._futures.values():
            if fut.done() and not fut.cancelled() and isinstance(fut.exception(), UserError):
                raise fut.exception()

    def wait(self) -> None:
        """Until every fine-tuning has ended (a failure is not raised here: its rows carry it)."""
        cf.wait(list(self._futures.values()))

    def cancel(self) -> None:
        self._stop.set()
        for fut in self._futures.values():
            fut.cancel()


def _costs(g: _Grid) -> tuple[list[CutInfo], dict]:
    """Time every head, and every defense that leaves the model as it is, on a quiet machine."""
    cut_infos: list[CutInfo] = []
    latency: dict[tuple[str, str], tuple[float, float, float, float]] = {}
    same_model = [d for d in g.defenses if d.spec != "none" and not d.changes_model]
    for cut in g.cuts:
        with g.phase("latency"):
            z_fit = capture(g.model, cut.name, g.x_aux[:256])  # what a defense fits on here (refitted on all aux data later)
            for defense in same_model:
                defense.fit(z_fit)
            by_defense = _defense_latencies(g, cut.name, [(d, g.model) for d in same_model])
            latency.update({(cut.name, spec): v for spec, v in by_defense.items()})
            lat1, lat64 = by_defense["none"][0], by_defense["none"][2]
        cut_infos.append(
            _with_tail(g, CutInfo(
                name=cut.name, shape=cut.shape, bytes_per_sample=bytes_per_sample(cut.shape), head_flops=g.flops(cut.name),
                head_latency_ms=round(lat1, 4), bytes_fp16=bytes_per_sample(cut.shape, "float16"), bytes_int8=bytes_per_sample(cut.shape, "int8"),
                index=cut.index, module_type=cut.module_type, aliases=cut.aliases, head_latency_ms_b64=round(lat64, 4),
            ))
        )
    return cut_infos, latency


def _warm_report(threshold: float) -> None:
    """Import and warm up the report's libraries, on a background thread; a failure shows when the
    report is written."""
    try:
        from splitaudit.report.html import warm

        warm(threshold)
    except Exception:  # noqa: BLE001
        pass


def _changed_model_latency(g: _Grid, prepared: _Prepared, latency: dict, *, wait: bool) -> None:
    """Time the heads of the changed models that exist (after the attack jobs, so on a quiet machine
    again). ``wait``: first let a fine-tuning that no job needed finish."""
    if wait:
        prepared.wait()
    for cut in g.cuts:
        pairs = [(d, prepared.get(d, cut.name)[0]) for d in g.defenses if d.changes_model and prepared.ready(d, cut.name)]
        if not pairs:
            continue
        with g.phase("latency"):
            for defense, model_d in pairs:
                defense.fit(capture(model_d, cut.name, g.x_aux[:256]))
            by_defense = _defense_latencies(g, cut.name, pairs)
            latency.update({(cut.name, d.spec): by_defense[d.spec] for d, _ in pairs})


class _AttackGrid:
    """Builds the job graph of every cut, feeds it to the executor, and keeps the outputs.

    Per (cut, learned attack): a base job fits on clean activations; then, with equal budgets, the
    undefended attacker refines the base on clean activations for as many epochs as each adaptive
    attacker refines it on defended ones (otherwise extra training alone would make a defended cut
    look leakier than the undefended one). The undefended attacker is also scored on every defended
    activation: the non-adaptive rows. An attack that cannot be warm-started (rMLE) is fitted afresh.
    """

    def __init__(self, g: _Grid, executor, prepared: _Prepared):
        self.g, self.ex, self.prepared = g, executor, prepared
        self.outputs: dict[str, JobOutput | BaseException] = {}
        self.jobs: dict[tuple[str, str, str], JobSpec] = {}  # (cut, attack, role) -> spec; role: base | clean | defense spec
        self.utility: dict[tuple[str, str], dict] = {}
        self._same_utility: dict[tuple[str, str], dict] = {}
        self.defense_info: dict[tuple[str, str], dict] = {}  # (cut, defense) -> what the defense fitted there
        self._keys: dict[str, str] = {}  # job id -> cache key
        self.threads_per_job = executor.threads_per_job
        self._handles: dict[Any, JobSpec] = {}
        self._tasks: dict[str, Any] = {}
        self._waiting: dict[str, list[JobSpec]] = {}  # base job id -> refine jobs waiting for it
        self._inputs: dict[str, dict] = {}  # cut -> shared inputs while its jobs run
        self._open: dict[str, int] = {}  # cut -> jobs not finished
        self.on_cut_done: Callable[[str], None] | None = None  # called when the last job of a cut has ended
        self._deferred: list[tuple[JobSpec, Any]] = []  # (job, the output it waited for) held back for a fine-tuning
        self._todo: list[tuple[str, list[Defense]]] = []  # (cut, defenses) whose utility is still to measure
        self._overall: Any = None  # the progress bar of all jobs

    # -- the job graph of one cut --
    def _specs(self, cut: str) -> list[tuple[str, JobSpec]]:
        g, cfg = self.g, self.g.config
        specs = [d.spec for d in g.defenses]
        epochs = g.profile["adaptive_epochs"] or None
        out = []
        for name in cfg.attacks:
            cls = ATTACKS[name]
            warm = hasattr(cls, "warm_start_from") and hasattr(cls, "state")
            common = dict(cut=cut, attack=name, profile=cfg.profile, seed=cfg.seed, device=str(g.device))
            if warm:
                out.append(("base", JobSpec(defense="none", kind="fit", label=f"{cut}: {name} on clean activations", **common)))
                out.append(("clean", JobSpec(defense="none", kind="refine", epochs=epochs, score=tuple(specs),
                                             label=f"{cut}: {name} refined on clean activations", **common)))
            else:
                out.append(("clean", JobSpec(defense="none", kind="fit", score=tuple(specs), label=f"{cut}: {name} on clean activations", **common)))
            for d in g.defenses:
                if d.spec == "none" or not (getattr(cls, "needs_fit", True) or d.changes_model):
                    continue  # an attack that learns nothing from aux data cannot adapt to an activation defense
                out.append((d.spec, JobSpec(defense=d.spec, kind="refine" if warm else "fit", epochs=epochs if warm else None,
                                            score=(d.spec,), label=f"{cut}: {name} adapted to {d.spec}", **common)))
        return out

    def _cache_key(self, spec: JobSpec, has_candidate: bool) -> str:
        """What the fitted attack depends on; not what it is scored on or how its progress bar reads."""
        g = self.g
        model_hash = self._model(spec.defense, spec.cut)[1]
        what = (spec.cut, spec.attack, spec.defense, spec.kind, spec.profile, spec.seed, spec.epochs, has_candidate)
        return key_of("attack-job", what, model_hash, g.model_hash, g.data_hash, g.aux_key)

    def _defense(self, spec: str) -> Defense:
        return next(d for d in self.g.defenses if d.spec == spec)

    def _model(self, defense_spec: str, cut: str):
        return self.prepared.get(self._defense(defense_spec), cut)

    # -- running --
    def run(self) -> None:
        # Cuts whose activations are held at once: enough to keep every worker busy, few enough for memory.
        window = max(2, min(self.ex.workers + 1, MAX_CUTS_IN_FLIGHT))
        n_jobs = sum(len(self._specs(c.name)) for c in self.g.cuts)
        self._overall = open_task(self.g.reporter, f"attack jobs ({len(self.g.cuts)} cuts)", n_jobs, keep=True)
        for cut in self.g.cuts:
            # A cut whose next jobs wait for a fine-tuned model does not count: the workers take the
            # next cut's base fit meanwhile instead of idling.
            while len(self._open) - len({d.cut for d, _ in self._deferred}) >= window or len(self._open) >= MAX_CUTS_IN_FLIGHT:
                self._pump()
            self._start_cut(cut.name)
        while self._handles or self._deferred or self._todo:
            self._pump()
        self._overall.close()

    def plan(self, cut: str) -> list[tuple[str, JobSpec]]:
        """The jobs of ``cut``, registered in ``jobs`` (not submitted)."""
        specs = self._specs(cut)
        for role, spec in specs:
            self.jobs.setdefault((cut, spec.attack, role), spec)
        return specs

    def _start_cut(self, cut: str) -> None:
        g = self.g
        self._inputs[cut] = {"x_aux": self.ex.put("x_aux", g.x_aux), "x_eval": self.ex.put("x_eval", g.x_eval), "acts": {}}
        # The activations of changed models are added when a job first needs them (after the base fit,
        # by when their fine-tuning has usually finished).
        early = [d for d in g.defenses if not d.changes_model]
        self._add_acts(cut, early)
        specs = self.plan(cut)
        self._open[cut] = len(specs) + 1  # and one for its utilities, measured in _pump
        for role, spec in specs:
            if spec.kind == "fit":
                self._submit_dep(spec, None)
            else:  # the clean refinement waits for the base; adaptive ones for the clean one (their other candidate)
                after = self.jobs[(cut, spec.attack, "base" if role == "clean" else "clean")]
                self._waiting.setdefault(after.id, []).append(spec)
        # Measured while the jobs run, in a pump of their own (the next cuts' first jobs go out first).
        self._todo.append((cut, early))

    def _add_acts(self, cut: str, defenses: list[Defense]) -> None:
        """Capture what each defense's model sends at ``cut`` (once per model) and share it with the jobs."""
        g, inp = self.g, self._inputs[cut]
        by_model = inp.setdefault("by_model", {})  # model hash -> (aux activations, their shared reference)
        for d in defenses:
            model_d, hash_d, _ = self.prepared.get(d, cut)
            if hash_d not in by_model:
                with g.phase("capture"):
                    z_aux, z_eval = g.activations(model_d, hash_d, cut)
                by_model[hash_d] = (z_aux, self.ex.put(("acts", cut, hash_d), Activations(aux=z_aux, eval=z_eval)))
            inp["acts"][d.spec] = by_model[hash_d][1]

    def _utility(self, cut: str, ds: list[Defense]) -> None:
        """Accuracy and agreement of each of ``ds`` at ``cut`` (and what each defense fitted there, for
        the row). The defenses that run the same model share its passes over the evaluation data."""
        g = self.g
        pending: dict[str, tuple[nn.Module, list[tuple[Defense, str, Any]]]] = {}  # model hash -> (model, to measure)
        with g.phase("utility"):
            for d in ds:
                model_d, hash_d, _ = self.prepared.get(d, cut)
                d.fit(self._inputs[cut]["by_model"][hash_d][0])  # defenses are shared by the cuts: fitted right before use
                self.defense_info[(cut, d.spec)] = d.info()
                ukey = key_of("utility", hash_d, g.model_hash, g.data_hash, cut, d.spec, g.config.seed, g.config.profile)
                hit = g.cache.get("utility", ukey)
                # A defense that only changes the model predicts the same at every cut: measure it once.
                same = (hash_d, d.spec) if type(d).apply is Defense.apply and not d.per_cut_model else None
                if hit is None and same in self._same_utility:
                    hit = self._same_utility[same]
                if hit is None:
                    pending.setdefault(hash_d, (model_d, []))[1].append((d, ukey, same))
                else:
                    self._record_utility(cut, d, hit, same)
            for model_d, todo in pending.values():
                for (d, ukey, same), (acc, agree) in zip(todo, _utility(g, model_d, cut, [d for d, _, _ in todo])):
                    hit = {"accuracy": acc, "agreement": agree}
                    g.cache.put("utility", ukey, hit)
                    self._record_utility(cut, d, hit, same)

    def _record_utility(self, cut: str, d: Defense, hit: dict, same) -> None:
        if same is not None:
            self._same_utility[same] = hit
        self.utility[(cut, d.spec)] = hit

    def _submit(self, spec: JobSpec, base_state: dict | None = None, candidate: JobOutput | None = None) -> None:
        g = self.g
        inp = self._inputs[spec.cut]
        # A changed model whose fine-tuning failed is not scored on: its rows carry that error, and
        # the other rows of this job keep their numbers.
        score = tuple(d for d in spec.score if d == spec.defense or self.prepared.error(self._defense(d), spec.cut) is None)
        if score != spec.score:
            spec = replace(spec, score=score)
        missing = [self._defense(d) for d in dict.fromkeys((spec.defense, *spec.score)) if d not in inp["acts"]]
        if missing:  # a changed model's activations (not pumping: this may run inside _pump)
            self._add_acts(spec.cut, missing)
            self._utility(spec.cut, missing)
        self._keys[spec.id] = key = self._cache_key(spec, candidate is not None)
        hit = g.cache.get("attacks", key)
        acts = {d: inp["acts"][d] for d in {spec.defense, *spec.score}}
        head = None
        if getattr(ATTACKS[spec.attack], "white_box", False):
            head = self.ex.put(("model", spec.cut, spec.defense, spec.attack), self._model(spec.defense, spec.cut)[0])
        inputs = JobInputs(x_aux=inp["x_aux"], x_eval=inp["x_eval"], acts=acts, head=head,
                           base_state=None if base_state is None else self.ex.put(("base", spec.cut, spec.attack), base_state),
                           candidate_state=None if candidate is None else self.ex.put(("clean", spec.cut, spec.attack), candidate.state),
                           candidate_converged=True if candidate is None else bool(candidate.report.get("converged", True)),
                           cached=hit)
        self._tasks[spec.id] = g.reporter.open(spec.label + (" (cached)" if hit else ""))
        self._handles[self.ex.submit(spec, inputs)] = spec

    def _pump(self, timeout: float = 0.2) -> None:
        self.prepared.raise_user_error()
        if self._todo:
            cut, ds = self._todo.pop(0)
            self._utility(cut, ds)
            self._closed_one(cut)  # the cut's utilities
            timeout = 0
        if self._deferred:
            # Submit what a fine-tuning held back, once it has ended (or now, if nothing else runs).
            waiting, self._deferred = self._deferred, []
            for dep, out in waiting:
                self._submit_dep(dep, out, wait=not self._handles)
        if not self._handles:
            return
        with self.g.phase("attacks"):
            done = self.ex.wait(list(self._handles), timeout=timeout)
        for job_id, ep, total in self.ex.progress():
            if job_id in self._tasks:
                self._tasks[job_id].update(ep, total=total)
        for h in done:
            spec = self._handles.pop(h)
            try:
                out: JobOutput | BaseException = self.ex.outcome(h)
            except Exception as exc:  # noqa: BLE001 - reported in the result, counted as failed by the gate
                # Even the user's model failing inside a job is that job's failure: its row shows the
                # error and the other cells of the grid still get their numbers.
                out = exc
            self._finish(spec, out)

    def _finish(self, spec: JobSpec, out) -> None:
        self.outputs[spec.id] = out
        task = self._tasks.pop(spec.id, None)  # a job failed before it was submitted has none
        if task is not None:
            task.close()
        if self._overall is not None:
            self._overall.advance()
        if isinstance(out, JobOutput) and out.state is not None and not out.report.get("cached"):
            self.g.cache.put("attacks", self._keys[spec.id], {"state": out.state, "report": out.report})
        for dep in self._waiting.pop(spec.id, []):
            self._submit_dep(dep, out)
        self._closed_one(spec.cut)

    def _submit_dep(self, dep: JobSpec, out, wait: bool = False) -> None:
        """Submit ``dep``, which waited for ``out`` (None: for nothing); held back (unless ``wait``)
        while a model it needs is being fine-tuned."""
        base_state = None
        if dep.kind == "refine":
            base = self.outputs.get(self.jobs[(dep.cut, dep.attack, "base")].id)
            if not (isinstance(base, JobOutput) and base.state is not None):
                self._finish(dep, RuntimeError(f"its base attack failed: {_error(base)}"))
                return
            base_state = base.state
        if not wait and any(not self.prepared.done(self._defense(d), dep.cut) for d in (dep.defense, *dep.score) if d != "none"):
            self._deferred.append((dep, out))
            return
        try:
            candidate = out if dep.defense != "none" and isinstance(out, JobOutput) else None
            self._submit(dep, base_state=base_state, candidate=candidate)
        except UserError:
            raise  # a defense that cannot change this model (found while fine-tuning): bad input, exit 2
        except Exception as exc:  # noqa: BLE001 - e.g. the object store is full: that job's failure
            self._finish(dep, exc)

    def _closed_one(self, cut: str) -> None:
        """One more piece of ``cut`` (a job, or its utility) is done; after the last, its rows can be built."""
        self._open[cut] -= 1
        if self._open[cut] == 0:  # the cut's shared inputs are no longer needed
            del self._open[cut], self._inputs[cut]
            self.ex.release(cut)
            if self.on_cut_done is not None:
                self.on_cut_done(cut)

    def output(self, cut: str, attack: str, role: str) -> tuple[JobOutput | None, dict]:
        """A row's attack output and its training report (a refinement's merged with its base's)."""
        spec = self.jobs.get((cut, attack, role))
        if spec is None or spec.id not in self.outputs:
            return None, {"converged": False, "error": NOT_RUN}
        out = self.outputs[spec.id]
        if not isinstance(out, JobOutput):
            return None, {"converged": False, "error": _error(out)}
        report = out.report
        base = self.jobs.get((cut, attack, "base"))
        if spec.kind == "refine" and base is not None and isinstance(self.outputs.get(base.id), JobOutput):
            report = _merge_reports(self.outputs[base.id].report, report)
        return out, report


def _error(exc) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Rows:
    """The result rows of each cut, built once its jobs have ended (or at the end, for cuts an
    interrupt left unfinished); ``all()`` returns every row in grid order, flagged."""

    def __init__(self, g: _Grid, grid: _AttackGrid, latency: dict, prepared: _Prepared, out: Path | None):
        self.g, self.grid, self.latency, self.prepared, self.out = g, grid, latency, prepared, out
        self.by_cut: dict[str, list[ResultRow]] = {}

    def build(self, cut: str) -> None:
        from splitaudit.report.images import save_grid

        g, grid = self.g, self.grid
        info = next(c for c in g.cuts if c.name == cut)
        grid.plan(cut)  # a cut the audit never reached (interrupted) still lists every row it owes
        rows: list[ResultRow] = []
        with g.phase("scoring"):
            for defense in g.defenses:
                spec = defense.spec
                dinfo = self.prepared.info(defense, cut)
                util = grid.utility.get((cut, spec), {})
                common = dict(
                    cut=cut, defense=spec, n_eval=int(g.x_eval.shape[0]), accuracy=_r(util.get("accuracy")),
                    agreement=_r(util.get("agreement")), **self._latency(cut, spec), epsilon=dinfo.get("epsilon"),
                    delta=dinfo.get("delta"), baseline_ssim=round(g.baseline_ssim, 5), baseline_psnr=round(g.baseline_psnr, 3),
                    bytes_per_sample=defense.wire_bytes(info.shape),
                    defense_info={**dinfo, **grid.defense_info.get((cut, spec), {})},
                )
                for attack_name in g.config.attacks:
                    variants = []
                    if spec != "none" and (cut, attack_name, spec) in grid.jobs:
                        variants.append((True, *grid.output(cut, attack_name, spec)))
                    variants.append((False, *grid.output(cut, attack_name, "clean")))
                    for adaptive, output, report in variants:
                        scores = output.scores.get(spec) if output is not None else None
                        if output is not None and scores is None:
                            output, report = None, {"converged": False, "error": self.prepared.error(defense, cut) or NOT_RUN}
                        rows.append(_row(g, common, attack_name, adaptive, scores, report, self.out, save_grid))
        self.by_cut[cut] = rows

    def _latency(self, cut: str, spec: str) -> dict[str, float | None]:
        """The latency fields of a row; None where not measured (yet: a changed model is timed last)."""
        if (cut, spec) not in self.latency:
            return dict.fromkeys(("latency_ms", "latency_overhead_ms", "latency_ms_b64", "latency_overhead_ms_b64"))
        base1, lat_d1, base64, lat_d64 = self.latency[(cut, spec)]
        return dict(latency_ms=round(lat_d1, 4), latency_overhead_ms=round(lat_d1 - base1, 4),
                    latency_ms_b64=round(lat_d64, 4), latency_overhead_ms_b64=round(lat_d64 - base64, 4))

    def all(self) -> list[ResultRow]:
        rows: list[ResultRow] = []
        for cut in self.g.cuts:
            if cut.name not in self.by_cut:
                self.build(cut.name)
            # Rows built before their defense's latency was measured get it now.
            rows += [r if r.latency_ms is not None else replace(r, **self._latency(r.cut, r.defense)) for r in self.by_cut[cut.name]]
        _flag_inversions(rows)
        return rows


def _result(g: _Grid, cfg: AuditConfig, cut_infos: list[CutInfo], rows: list[ResultRow], t_start: float, interrupted: bool) -> AuditResult:
    out = Path(cfg.out) if cfg.out else None
    notes = list(g.notes)
    if interrupted:
        done = sum(1 for r in rows if r.error != NOT_RUN)
        notes.insert(0, f"interrupted: {done} of {len(rows)} rows finished; the others are marked failed. Rerun to complete "
                        "(finished attacks are cached).")
    result = AuditResult(
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        seed=cfg.seed,
        model=g.model_info,
        data={
            "spec": cfg.data, **g.splits.summary(), "shape": list(g.dataset.shape), "labelled": g.dataset.y is not None,
            "hash": g.data_hash, "license": g.dataset.license, "attacker_aux": g.attacker,
            "aux_data": cfg.aux_data, "aux_queries": cfg.aux_queries,
        },
        environment=_environment(g.device),
        cuts=tuple(cut_infos),
        results=tuple(rows),
        config={
            "profile": cfg.profile, "defenses": [d.spec for d in g.defenses], "attacks": list(cfg.attacks),
            "cuts": [c.name for c in g.cuts], "threshold": cfg.threshold, "command": cfg.command,
            "skipped_cuts": [list(s) for s in g.discovery.skipped], "seconds": round(time.perf_counter() - t_start, 1),
            "cache": g.cache.stats(),
            "timings": {k: round(v, 2) for k, v in list(g.timings.items())},  # a snapshot: a fine-tuning may still add to it
            **g.executor_info, "interrupted": interrupted,
        },
        threshold=cfg.threshold,
        notes=tuple(dict.fromkeys(notes)),
    )
    if out is not None:
        result.save(out / "results.json")
        from splitaudit.report.html import write_report

        write_report(result, out / "report.html", base=out)
    return result


def _merge_reports(base: dict, refine: dict) -> dict:
    """The report of a base fit followed by a refinement, as one training."""
    if "error" in refine:
        return refine
    out = dict(refine)
    out["epochs"] = base.get("epochs", 0) + refine.get("epochs", 0)
    out["seconds"] = round(base.get("seconds", 0) + refine.get("seconds", 0), 2)
    out["notes"] = list(base.get("notes", [])) + list(refine.get("notes", []))
    out["converged"] = bool(refine.get("converged", True))  # the refinement picks up where the base ended
    return out


def _utility(g: _Grid, model_d: nn.Module, cut: str, ds: list[Defense]) -> list[tuple[float | None, float | None]]:
    """Per defense (all on ``model_d``): accuracy and top-1 agreement with the undefended model,
    averaged over draws if stochastic. Every draw of every defense shares one pass over the data."""
    draws: list[tuple[int, Callable | None]] = []  # (which defense, transform at the cut; None: the model as it is)
    for k, d in enumerate(ds):
        for i in range(g.profile["draws"] if d.stochastic else 1):
            ugen = job_generator(g.config.seed, cut, d.spec, "utility", i)
            draws.append((k, None if d.spec == "none" else (lambda z, _d=d, _g=ugen: _d.apply(z, generator=_g))))
    preds = g._predict_each(model_d, cut, [t for _, t in draws])
    out = []
    for k in range(len(ds)):
        mine = [p for (j, _), p in zip(draws, preds) if j == k and p is not None]
        accs = [float((p == g.y_eval).float().mean()) for p in mine] if g.y_eval is not None else []
        agrees = [float((p == g.clean_pred).float().mean()) for p in mine] if g.clean_pred is not None else []
        out.append((sum(accs) / len(accs) if accs else None, sum(agrees) / len(agrees) if agrees else None))
    return out


def _defense_latencies(g: _Grid, cut: str, pairs: list[tuple[Defense, nn.Module]]) -> dict[str, tuple[float, float, float, float]]:
    """Per defense: (head alone, head + defense) in ms at batch 1 and 64. The victim's head alone and
    each defense on its own model are timed in turn, round after round, so one head-alone series
    serves every defense and load changes hit all equally. Each defense is fitted already."""
    def transform(d: Defense):
        gen = job_generator(g.config.seed, cut, d.spec, "latency")
        return lambda z: d.apply(z, generator=gen)

    defended = [(m, transform(d)) for d, m in pairs]
    reps = g.profile["latency_repeats"]
    base1, *d1 = defense_latency_ms(g.model, cut, g.x_eval[:1], defended, repeats=reps)
    base64, *d64 = defense_latency_ms(g.model, cut, g.x_eval[:64], defended, repeats=max(3, reps // 3))
    return {d.spec: (base1, a, base64, b) for (d, _), a, b in zip(pairs, d1, d64)} | {"none": (base1, base1, base64, base64)}


def _r(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(v, nd)


def _row(g: _Grid, common: dict, attack_name: str, adaptive: bool, scores: Scores | None, report: dict, out, save_grid) -> ResultRow:
    if scores is None:
        nan = math.nan
        return ResultRow(
            attack=attack_name, adaptive=adaptive, ssim=nan, ssim_ci=(nan, nan), psnr=nan, psnr_ci=(nan, nan), converged=False,
            status="failed", error=report.get("error"), flags=(f"attack failed: {report.get('error')}",), **common,
        )
    s = summarize(scores.ssim, resamples=g.resamples)
    p = summarize(scores.psnr, resamples=g.resamples)
    worst = most_recognizable(scores.ssim, N_WORST)
    images = None
    # Grids for every row an attacker would pick: undefended, and adaptive under a defense. The naive
    # (non-adaptive) rows only show the gap in numbers.
    if out is not None and (adaptive or common["defense"] == "none"):
        name = _safe(f"{common['cut']}__{common['defense']}__{attack_name}{'__adaptive' if adaptive else ''}") + ".png"
        fixed = torch.arange(min(N_GRID, g.x_eval.shape[0]))
        recon = torch.zeros_like(g.x_eval)
        recon[scores.recon_idx] = scores.recon.to(recon.device)
        save_grid(out / "images" / name, g.x_eval, recon, fixed=fixed, worst=worst, ssim=scores.ssim)
        images = f"images/{name}"
    converged = bool(report.get("converged", True))
    flags = () if converged else ("attack did not beat the no-information guess on held-out aux data; its SSIM is a lower bound",)
    return ResultRow(
        attack=attack_name, adaptive=adaptive, ssim=round(s.mean, 5), ssim_ci=(round(s.ci[0], 5), round(s.ci[1], 5)),
        psnr=round(p.mean, 3), psnr_ci=(round(p.ci[0], 3), round(p.ci[1], 3)), worst_ssim=round(s.worst, 5),
        worst_indices=tuple(int(i) for i in worst), converged=converged, status="ok" if converged else "not_converged",
        flags=flags, notes=tuple(report.get("notes", ())), train_seconds=report.get("seconds"), epochs=report.get("epochs"),
        images=images, attack_info={k: v for k, v in report.items() if k not in ("notes",)}, **common,
    )


def _safe(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return keep[:120] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def _flag_inversions(rows: list[ResultRow]) -> None:
    """A deeper cut cannot carry more information than a shallower one (data processing inequality).

    If a cut leaks clearly less than a deeper cut of the same model with nothing applied to the
    activation (no defense, or one that only changes the model for every cut alike, like DP-SGD), the
    attack at the shallower cut under-performed; flag it rather than let it read as privacy. Noise,
    dropout or quantization applied at different cuts, and NoPeek's per-cut models, are not ordered.
    """
    from splitaudit.defenses.base import DEFENSES

    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r.cut, len(order))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        cls = DEFENSES.get(r.defense.split(":")[0])
        if cls is None or cls.stochastic or cls.per_cut_model or cls.apply is not Defense.apply:
            continue
        groups.setdefault((r.defense, r.attack, r.adaptive), []).append(i)
    for idx in groups.values():
        for i in idx:
            ri = rows[i]
            deeper = [rows[j] for j in idx if order[rows[j].cut] > order[ri.cut] and rows[j].ssim_ci[0] > ri.ssim_ci[1]]
            if deeper:
                d = max(deeper, key=lambda r: r.ssim)
                flag = (
                    f"leaks less than the deeper cut {d.cut} (SSIM {ri.ssim:.3f} < {d.ssim:.3f}): the attack here is "
                    "likely under-trained, so read this SSIM as a lower bound"
                )
                rows[i] = replace(ri, flags=ri.flags + (flag,))
    # Within a cut: an activation defense only removes information, so an attacker of the defended
    # activation that beats the undefended one means the undefended attack under-performed.
    for i, ri in enumerate(rows):
        if ri.defense != "none":
            continue
        better = [
            r for r in rows
            if r.cut == ri.cut and r.attack == ri.attack and r.defense != "none" and r.status == "ok"
            and not _changes_model(r.defense) and r.ssim_ci[0] > ri.ssim_ci[1]
        ]
        if better:
            b = max(better, key=lambda r: r.ssim)
            flag = (
                f"leaks less undefended than under {b.defense} (SSIM {ri.ssim:.3f} < {b.ssim:.3f}): the attack on the "
                "clean activation is likely under-trained, so read this SSIM as a lower bound"
            )
            rows[i] = replace(rows[i], flags=rows[i].flags + (flag,))


def _changes_model(spec: str) -> bool:
    from splitaudit.defenses.base import DEFENSES

    cls = DEFENSES.get(spec.split(":")[0])
    return cls is None or cls.changes_model


def _prepare_model(g: _Grid, defense: Defense, cut: str | None, model: nn.Module, stop: threading.Event):
    """``defense``'s change to ``model`` (a private copy of the victim), from the cache or fine-tuned."""
    ctx = PrepareContext(
        x_train=g.splits.victim.x.to(g.device), y_train=None if g.splits.victim.y is None else g.splits.victim.y.to(g.device),
        x_eval=g.x_eval, y_eval=g.y_eval, profile=g.config.profile,
        generator=job_generator(g.config.seed, defense.spec, cut, "prepare"),
    )
    key = key_of("prepared", g.model_hash, g.data_hash, defense.spec, cut, g.config.profile, g.config.seed)
    hit = g.cache.get("models", key)
    if hit is not None:
        change = defense.prepare_model(copy.deepcopy(model), cut=cut, ctx=ctx, state=hit["state"])
        info = hit["info"] | {"cached": True}
    else:
        def on_epoch(ep, tot, loss):
            if stop.is_set():
                raise KeyboardInterrupt
            task.update(ep, total=tot)

        # Dropout in a user's model draws from torch's global generator: seeded here, so the fine-tuning
        # is the same in every run (no other thread draws from it: attacks build their modules with
        # generators of their own).
        cuda = [g.device] if g.device.type == "cuda" else []
        with g.reporter.task(f"{defense.spec}: fine-tuning the model", keep=True) as task, torch.random.fork_rng(devices=cuda):
            seed = int(torch.randint(0, 2**62, (1,), generator=job_generator(g.config.seed, defense.spec, cut, "rng")))
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # dropout on the GPU draws from that device's generator
            change = defense.prepare_model(copy.deepcopy(model), cut=cut, ctx=replace(ctx, on_epoch=on_epoch))
        info = change.info
        g.cache.put("models", key, {"state": {k: v.cpu() for k, v in change.model.state_dict().items()}, "info": info})
    model_d = change.model.to(g.device).eval()
    return model_d, state_hash(model_d), info


def _with_tail(g: _Grid, info: CutInfo) -> CutInfo:
    """``info`` with the server's share at its cut: tail FLOPs (whole model minus head) and median tail latency.

    The first call also records the whole model's FLOPs and latency (batch 1) in ``model``: the
    planner's all-on-the-device and all-on-the-server placements.
    """
    from splitaudit.costs import model_latency_ms, tail_latency_ms

    reps, sample1 = g.profile["latency_repeats"], g.x_eval[:1]
    with g.phase("latency"):
        if "flops" not in g.model_info:
            g.model_info.update(flops=g.flops(None), latency_ms=round(model_latency_ms(g.model, sample1, repeats=reps), 4))
        tail = tail_latency_ms(g.model, info.name, sample1, repeats=reps)
    return replace(info, tail_flops=max(0, g.model_info["flops"] - info.head_flops), tail_latency_ms=round(tail, 4))


def list_cuts(model: str, *, weights: str | None = None, data: str | None = None, input_shape: tuple[int, ...] | None = None,
              device: str = "cpu") -> list[dict[str, Any]]:
    """One dict per candidate cut: name, shape, bytes (f32/fp16/int8), FLOPs and median latency of head and tail.

    Needs no training: a builtin model is measured with its untrained architecture (shapes, bytes,
    FLOPs and latency do not depend on the weights).
    """
    if (data is None) == (input_shape is None):
        raise UserError("give exactly one of --data or --input-shape")
    dev = resolve_device(device)
    if data is not None:
        sample = load_data(data).x[:2]
    else:
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise SpecError(f"--input-shape must be C,H,W with positive sizes, got {','.join(map(str, input_shape))}")
        sample = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))
    parsed = parse_model_spec(model)
    if parsed.kind == "builtin":
        if parsed.target not in BUILTIN_MODELS:
            raise SpecError(f"unknown builtin model {parsed.target!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
        with torch.random.fork_rng(devices=[]):
            net = BUILTIN_MODELS[parsed.target].build(sample.shape[1], 10)
    else:
        net = build_user_model(model)
    if weights:
        load_weights(net, weights)
    net = net.to(dev).eval()
    sample = sample.to(dev)
    check_model_accepts(net, sample)
    from splitaudit.costs import tail_latency_ms

    disc = discover_cuts(net, sample)
    full = head_flops(net, None, sample[:1])
    rows = []
    for c in disc.cuts:
        head = head_flops(net, c.name, sample[:1])
        rows.append({
            "index": c.index, "name": c.name, "module_type": c.module_type, "aliases": list(c.aliases), "shape": list(c.shape),
            "bytes_per_sample": bytes_per_sample(c.shape), "bytes_fp16": bytes_per_sample(c.shape, "float16"),
            "bytes_int8": bytes_per_sample(c.shape, "int8"), "head_flops": head,
            "head_latency_ms": round(head_latency_ms(net, c.name, sample[:1]), 4),
            "tail_flops": max(0, full - head), "tail_latency_ms": round(tail_latency_ms(net, c.name, sample[:1]), 4),
        })
    return rows
