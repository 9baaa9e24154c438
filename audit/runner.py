"""The audit grid: for each cut, capture activations once; for each defense, defend; for each attack,
fit on aux and reconstruct eval; score; measure costs. Everything ends up in one AuditResult.

Every (cut, defense, attack) job draws its randomness from a generator seeded by a hash of
(seed, cut, defense, attack), so the order of jobs changes nothing.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
from contextlib import contextmanager
import hashlib
import math
import os
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import attacks  # noqa: F401  (registers attacks)
import defenses  # noqa: F401  (registers defenses)
from attacks.base import AttackContext, make_attack
from attacks.training import TrainConfig, train
from audit import __version__
from audit.cache import Cache, key_of
from audit.costs import bytes_per_sample, defense_latency_ms, head_flops, head_latency_ms
from audit.cuts import Discovery, capture, discover_cuts, head_forward, predict, run_model
from audit.data import Splits, data_hash, load_data, make_splits
from audit.errors import DataError, ModelError, SpecError, UserError
from audit.metrics import most_recognizable, psnr, ssim, summarize
from audit.models import BUILTIN_MODELS, build_user_model, builtin_cache_key, load_weights, state_hash
from audit.progress import Reporter
from audit.results import AuditResult, CutInfo, ResultRow
from audit.specs import parse_model_spec
from defenses.base import Defense, PrepareContext, make_defense

PROFILES: dict[str, dict[str, Any]] = {
    # max_aux caps the attacker's data; draws: how many draws of a stochastic defense utility averages
    "quick": {"n_eval": 1000, "max_aux": 1000, "latency_repeats": 7, "draws": 2, "adaptive_epochs": 2},
    "standard": {"n_eval": 1000, "max_aux": 2000, "latency_repeats": 15, "draws": 3, "adaptive_epochs": 3},
    "thorough": {"n_eval": 1000, "max_aux": None, "latency_repeats": 30, "draws": 5, "adaptive_epochs": 0},
}
N_GRID = 8  # fixed eval samples shown in every image grid
N_WORST = 5  # most recognizable samples shown


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

    def validate(self) -> None:
        if self.profile not in PROFILES:
            raise SpecError(f"unknown profile {self.profile!r}; known profiles: {', '.join(PROFILES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise SpecError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.aux_queries not in ("data", "noise"):
            raise SpecError(f"unknown --aux-queries {self.aux_queries!r}; choose data or noise")
        if not 0 < self.threshold <= 1:
            raise SpecError(f"threshold {self.threshold} is out of range; allowed: (0, 1]")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available on this machine")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def job_generator(seed: int, *parts: object, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(repr((seed,) + parts).encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 62) - 1))


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
    with reporter.task(f"training builtin:{name} on {victim.n} victim images", total=b.epochs) as task:
        train(
            model,
            _classify_loss,
            (victim.x.to(device), victim.y.to(device)),
            config=TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, patience=None),
            generator=gen,
            on_epoch=lambda ep, tr, va: task.update(ep),
        )
    return model.eval()


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
        for a in cfg.attacks:
            make_attack(a, profile=cfg.profile)
        with self.phase("data"):
            self.dataset = load_data(cfg.data)
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
        self.cuts = [self.discovery.get(c) for c in cfg.cuts] if cfg.cuts else list(self.discovery.cuts)
        self.clean_pred = self._predict(self.model)
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

    def _predict(self, model, cut=None, transform=None) -> torch.Tensor | None:
        try:
            return predict(model, self.x_eval, cut=cut, transform=transform)
        except ModelError as exc:
            self.notes.append(f"accuracy not measured: {exc}")
            return None

    # -- activations --
    def activations(self, model: nn.Module, model_hash: str, cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = key_of("act", model_hash, self.data_hash, self.config.seed, self.config.profile, cut, self.aux_key)
        hit = self.cache.get("activations", key)
        if hit is not None:
            return hit["aux"].to(self.device), hit["eval"].to(self.device)
        z_aux = capture(model, cut, self.x_aux)
        z_eval = capture(model, cut, self.x_eval)
        self.cache.put("activations", key, {"aux": z_aux.cpu(), "eval": z_eval.cpu()})
        return z_aux, z_eval

    # -- attacks --
    def fit_attack(self, name, z_aux, *, cut, model, model_hash, defense_spec, task, init=None, epochs=None):
        # A refinement (init given) gets a short budget and no restart from scratch: its starting point
        # is already a fitted attack.
        params = {"epochs": epochs or 0, "restarts": 0} if init is not None else {}
        attack = make_attack(name, profile=self.config.profile, params=params)
        key = key_of("attack", name, model_hash, self.data_hash, cut.name, defense_spec, self.config.profile, self.config.seed, epochs,
                     self.aux_key)
        hit = self.cache.get("attacks", key) if hasattr(attack, "load_state") else None
        if hit is not None:
            attack.load_state(hit["state"], cut.shape, tuple(self.x_aux.shape[1:]))
            return attack, hit["report"] | {"cached": True}
        if init is not None:
            attack.warm_start_from(init)
        gen = job_generator(self.config.seed, cut.name, defense_spec, name)
        ctx = AttackContext(
            input_shape=tuple(self.x_aux.shape[1:]),
            act_shape=tuple(z_aux.shape[1:]),
            profile=self.config.profile,
            generator=gen,
            on_epoch=lambda ep, tot, va: task.update(ep, total=tot),
            # Only white-box attacks see the head; black-box ones get activations and nothing else.
            head=functools.partial(head_forward, model, cut.name) if getattr(attack, "white_box", False) else None,
        )
        rep = attack.fit(z_aux, self.x_aux, ctx)
        report = {
            "converged": rep.converged, "restarts": rep.restarts, "epochs": rep.epochs, "seconds": round(rep.seconds, 2),
            "val_loss": rep.val_loss, "baseline_loss": rep.baseline_loss, "notes": list(rep.notes),
        }
        if hasattr(attack, "state"):
            self.cache.put("attacks", key, {"state": attack.state(), "report": report})
        return attack, report

    def try_fit(self, name, z_aux, **kw):
        """Fit, but turn a crash of the attack into a failed row: it must show up, never vanish."""
        try:
            return self.fit_attack(name, z_aux, **kw)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the result, counted as failed by the gate
            return None, {"converged": False, "error": f"{type(exc).__name__}: {exc}"}

    def refine(self, name, z_aux, base: tuple[Any, dict], **kw) -> tuple[Any, dict]:
        """Continue a base attack on ``z_aux`` for the profile's refinement budget, reported as one training.

        An attack that cannot be warm-started (rMLE) is fitted afresh on ``z_aux`` instead.
        """
        attack, report = base
        if attack is None or not hasattr(attack, "warm_start_from"):
            return self.try_fit(name, z_aux, **kw)
        refined, rep = self.try_fit(name, z_aux, init=attack, epochs=self.profile["adaptive_epochs"] or None, **kw)
        return refined, _merge_reports(report, rep)

    def score(self, attack, z_eval) -> _Scored:
        recon = attack.reconstruct(z_eval).clamp(0, 1)
        return _Scored(ssim(recon, self.x_eval), psnr(recon, self.x_eval, max_db=100.0), recon)


def run_audit(config: AuditConfig, *, reporter: Reporter | None = None) -> AuditResult:
    """Run the whole grid and return the result; writes ``config.out`` when it is set."""
    from audit.report.images import save_grid

    config.validate()
    reporter = reporter or Reporter()
    t_start = time.perf_counter()
    g = _Grid(config, reporter)
    g.setup()
    cfg = config
    out = Path(cfg.out) if cfg.out else None
    rows: list[ResultRow] = []
    cut_infos: list[CutInfo] = []
    prep_cache: dict[str, Any] = {}
    reps = g.profile["latency_repeats"]
    sample1, sample64 = g.x_eval[:1], g.x_eval[:64]

    for cut in g.cuts:
        with g.phase("capture"):
            z_aux, z_eval = g.activations(g.model, g.model_hash, cut.name)
        with g.phase("latency"):
            lat1 = head_latency_ms(g.model, cut.name, sample1, repeats=reps)
            lat64 = head_latency_ms(g.model, cut.name, sample64, repeats=max(3, reps // 3))
        cut_infos.append(
            _with_tail(g, CutInfo(
                name=cut.name, shape=cut.shape, bytes_per_sample=bytes_per_sample(cut.shape), head_flops=g.flops(cut.name),
                head_latency_ms=round(lat1, 4), bytes_fp16=bytes_per_sample(cut.shape, "float16"), bytes_int8=bytes_per_sample(cut.shape, "int8"),
                index=cut.index, module_type=cut.module_type, aliases=cut.aliases, head_latency_ms_b64=round(lat64, 4),
            ))
        )
        # Equal budgets: every decoder gets the same total training. A base decoder is fitted on clean
        # activations; the undefended attacker refines it on clean activations for as many epochs as
        # each adaptive attacker refines it on defended ones. Otherwise extra training alone would make
        # a defended cut look leakier than the undefended one.
        bases: dict[str, tuple[Any, dict]] = {}
        clean_attacks: dict[str, tuple[Any, dict]] = {}
        for attack_name in cfg.attacks:
            with reporter.task(f"{cut.name}: {attack_name} on clean activations") as task, g.phase("attacks"):
                clean = dict(cut=cut, model=g.model, model_hash=g.model_hash, defense_spec="none", task=task)
                bases[attack_name] = base = g.try_fit(attack_name, z_aux, **clean)
                clean_attacks[attack_name] = g.refine(attack_name, z_aux, base, **clean) if hasattr(base[0], "warm_start_from") else base

        for defense in g.defenses:
            spec = defense.spec
            model_d, model_hash_d, dinfo = g.model, g.model_hash, {}
            if defense.changes_model:
                pkey = spec + ("@" + cut.name if defense.per_cut_model else "")
                if pkey not in prep_cache:
                    with g.phase("defense fine-tuning"):
                        prep_cache[pkey] = _prepare_model(g, defense, cut.name if defense.per_cut_model else None)
                model_d, model_hash_d, dinfo = prep_cache[pkey]
            with g.phase("capture"):
                zd_aux, zd_eval = (z_aux, z_eval) if model_d is g.model else g.activations(model_d, model_hash_d, cut.name)
            defense.fit(zd_aux)
            gen = job_generator(cfg.seed, cut.name, spec, "defense")
            da = defense.apply(zd_aux, generator=gen)
            de = defense.apply(zd_eval, generator=gen)

            with g.phase("utility"):
                ukey = key_of("utility", model_hash_d, g.model_hash, g.data_hash, cut.name, spec, cfg.seed, cfg.profile)
                hit = g.cache.get("utility", ukey)
                if hit is None:
                    hit = dict(zip(("accuracy", "agreement"), _utility(g, model_d, cut.name, defense)))
                    g.cache.put("utility", ukey, hit)
                acc, agree = hit["accuracy"], hit["agreement"]
            with g.phase("latency"):
                if spec == "none":
                    base1, lat_d1, base64, lat_d64 = lat1, lat1, lat64, lat64
                else:
                    base1, lat_d1, base64, lat_d64 = _defended_latency(g, model_d, cut.name, defense, sample1, sample64)

            common = dict(
                cut=cut.name, defense=spec, n_eval=int(g.x_eval.shape[0]), accuracy=_r(acc), agreement=_r(agree),
                latency_ms=round(lat_d1, 4), latency_overhead_ms=round(lat_d1 - base1, 4), latency_ms_b64=round(lat_d64, 4),
                latency_overhead_ms_b64=round(lat_d64 - base64, 4), epsilon=dinfo.get("epsilon"), delta=dinfo.get("delta"),
                baseline_ssim=round(g.baseline_ssim, 5), baseline_psnr=round(g.baseline_psnr, 3),
                bytes_per_sample=defense.wire_bytes(cut.shape), defense_info={**dinfo, **defense.info()},
            )
            for attack_name in cfg.attacks:
                clean_attack, clean_report = clean_attacks[attack_name]
                variants: list[tuple[bool, Any, dict]] = []
                learned = getattr(clean_attack, "needs_fit", True) if clean_attack is not None else True
                if spec == "none" or (not learned and not defense.changes_model):
                    # An attack that learns nothing from aux data cannot adapt to an activation defense.
                    variants.append((False, clean_attack, clean_report))
                else:
                    with reporter.task(f"{cut.name}: {attack_name} adapted to {spec}") as task, g.phase("attacks"):
                        adaptive, ad_report = g.refine(
                            attack_name, da, bases[attack_name], cut=cut, model=model_d, model_hash=model_hash_d,
                            defense_spec=spec, task=task,
                        )
                    variants.append((True, adaptive, ad_report))
                    variants.append((False, clean_attack, clean_report))
                for is_adaptive, attack, report in variants:
                    with g.phase("scoring"):
                        rows.append(_row(g, common, attack_name, is_adaptive, attack, report, de, out, save_grid))

    _flag_inversions(rows)
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
            "timings": {k: round(v, 2) for k, v in g.timings.items()},
        },
        threshold=cfg.threshold,
        notes=tuple(dict.fromkeys(g.notes)),
    )
    if out is not None:
        result.save(out / "results.json")
        from audit.report.html import write_report

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


def _utility(g: _Grid, model_d: nn.Module, cut: str, defense: Defense) -> tuple[float | None, float | None]:
    """Accuracy and top-1 agreement with the undefended model, averaged over draws if stochastic."""
    draws = g.profile["draws"] if defense.stochastic else 1
    accs, agrees = [], []
    for i in range(draws):
        ugen = job_generator(g.config.seed, cut, defense.spec, "utility", i)
        transform = None if defense.spec == "none" else (lambda z, _g=ugen: defense.apply(z, generator=_g))
        pred = g._predict(model_d, cut if transform else None, transform)
        if pred is None:
            continue
        if g.y_eval is not None:
            accs.append(float((pred == g.y_eval).float().mean()))
        if g.clean_pred is not None:
            agrees.append(float((pred == g.clean_pred).float().mean()))
    return (sum(accs) / len(accs) if accs else None, sum(agrees) / len(agrees) if agrees else None)


def _defended_latency(g: _Grid, model_d: nn.Module, cut: str, defense: Defense, sample1, sample64) -> tuple[float, float, float, float]:
    """Device time of head alone and of head + defense at batch 1 and 64 (measured side by side)."""
    reps = g.profile["latency_repeats"]
    lgen = job_generator(g.config.seed, cut, defense.spec, "latency")
    tf = lambda z: defense.apply(z, generator=lgen)  # noqa: E731
    base1, d1 = defense_latency_ms(g.model, model_d, cut, sample1, tf, repeats=reps)
    base64, d64 = defense_latency_ms(g.model, model_d, cut, sample64, tf, repeats=max(3, reps // 3))
    return base1, d1, base64, d64


def _r(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(v, nd)


def _row(g: _Grid, common: dict, attack_name: str, adaptive: bool, attack, report: dict, z_eval_def, out, save_grid) -> ResultRow:
    if attack is None:
        nan = math.nan
        return ResultRow(
            attack=attack_name, adaptive=adaptive, ssim=nan, ssim_ci=(nan, nan), psnr=nan, psnr_ci=(nan, nan), converged=False,
            status="failed", error=report.get("error"), flags=(f"attack failed: {report.get('error')}",), **common,
        )
    scored = g.score(attack, z_eval_def)
    gen = job_generator(g.config.seed, common["cut"], common["defense"], attack_name, "bootstrap")
    s = summarize(scored.ssim, generator=gen)
    p = summarize(scored.psnr, generator=gen)
    worst = most_recognizable(scored.ssim, N_WORST)
    images = None
    # Grids for every row an attacker would pick: undefended, and adaptive under a defense. The naive
    # (non-adaptive) rows only show the gap in numbers.
    if out is not None and (adaptive or common["defense"] == "none"):
        name = _safe(f"{common['cut']}__{common['defense']}__{attack_name}{'__adaptive' if adaptive else ''}") + ".png"
        fixed = torch.arange(min(N_GRID, g.x_eval.shape[0]))
        save_grid(out / "images" / name, g.x_eval, scored.recon, fixed=fixed, worst=worst, ssim=scored.ssim)
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

    If a cut leaks clearly less than a deeper cut under the same deterministic defense, the attack at
    the shallower cut under-performed; flag it rather than let it read as privacy.
    """
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r.cut, len(order))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        from defenses.base import DEFENSES

        cls = DEFENSES.get(r.defense.split(":")[0])
        if cls is not None and cls.stochastic:
            continue  # noise drawn at different cuts is not comparable
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
    from defenses.base import DEFENSES

    cls = DEFENSES.get(spec.split(":")[0])
    return cls is None or cls.changes_model


def _prepare_model(g: _Grid, defense: Defense, cut: str | None):
    ctx = PrepareContext(
        x_train=g.splits.victim.x.to(g.device), y_train=None if g.splits.victim.y is None else g.splits.victim.y.to(g.device),
        x_eval=g.x_eval, y_eval=g.y_eval, profile=g.config.profile,
        generator=job_generator(g.config.seed, defense.spec, cut, "prepare"),
    )
    key = key_of("prepared", g.model_hash, g.data_hash, defense.spec, cut, g.config.profile, g.config.seed)
    hit = g.cache.get("models", key)
    import copy

    if hit is not None:
        change = defense.prepare_model(copy.deepcopy(g.model), cut=cut, ctx=ctx, state=hit["state"])
        info = hit["info"] | {"cached": True}
    else:
        with g.reporter.task(f"{defense.spec}: fine-tuning the model") as task:
            ctx = replace(ctx, on_epoch=lambda ep, tot, loss: task.update(ep, total=tot))
            change = defense.prepare_model(copy.deepcopy(g.model), cut=cut, ctx=ctx)
        info = change.info
        g.cache.put("models", key, {"state": {k: v.cpu() for k, v in change.model.state_dict().items()}, "info": info})
    model_d = change.model.to(g.device).eval()
    return model_d, state_hash(model_d), info


def _with_tail(g: _Grid, info: CutInfo) -> CutInfo:
    """``info`` with the server's share at its cut: tail FLOPs (whole model minus head) and median tail latency.

    The first call also records the whole model's FLOPs and latency (batch 1) in ``model``: the
    planner's all-on-the-device and all-on-the-server placements.
    """
    from audit.costs import model_latency_ms, tail_latency_ms

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
    from audit.costs import tail_latency_ms

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
