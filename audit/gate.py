"""The CI gate: thresholds over an :class:`AuditResult`, a JUnit file and the ``splitaudit gate`` command.

The engine is one pure function, :func:`evaluate`, from (results, gate config, optional baseline) to a
:class:`GateReport` of checks. The command, the JUnit writer, the pytest plugin's assertion helpers
and the tests all go through it, so "what passes" is decided in one place.

Rules the engine keeps (``shared/DESIGN.md``, "honest numbers"):

- each (cut, defense) is judged by its assessment (:mod:`splitaudit.assess`), whose headline row is the
  strongest attack that ran, adaptive or not;
- a leakage check (SSIM, PSNR and their regressions) of a pair whose ladder is incomplete (an attack
  failed, did not converge, or is flagged as a lower bound) FAILS, whatever its value: a weak attack
  reads as privacy, and the gate must not pass on it;
- a (cut, defense) that the config, a rule or the baseline expects but the results lack FAILS;
- the tool never says "safe": a passed check says what the attacks that ran achieved, nothing more.

Config (``splitaudit.toml`` at top level, or ``[tool.splitaudit]`` in ``pyproject.toml``)::

    model = "model.py:build"   # what to audit; same specs as the CLI
    weights = "model.pt"       # optional
    data = "data.npz"
    cuts = ["layer1"]          # optional, default every candidate cut
    defenses = ["none"]        # optional, default ["none"]
    attacks = ["decoder"]      # optional, default ["decoder"]
    profile = "quick"          # optional, default "quick" (a gate runs on every push)
    seed = 0                   # optional
    device = "auto"            # optional: auto | cpu | cuda
    aux_data = "other.npz"     # optional: the attacker's own data (as `audit --aux-data`)
    aux_queries = "data"       # optional: data | noise (as `audit --aux-queries`)
    cache_dir = ".cache/sa"    # optional, default $SPLITAUDIT_CACHE_DIR or ~/.cache/splitaudit
    out = "splitaudit-gate"    # optional: where the audit writes results.json, report.html, images
    baseline = "baseline.json" # optional: regression limits compare against it (--baseline wins)

    [thresholds]               # defaults for every (cut, defense); max_ssim defaults to 0.3
    max_ssim = 0.3
    max_ssim_increase = 0.02   # regression limits apply only when a baseline is given
    # text results: max_token_accuracy, max_rouge_l, max_exact_match, max_pii_recovery,
    # max_token_accuracy_gain, max_token_accuracy_increase (one max_<metric> per metric of a modality)

    [[thresholds.rule]]        # overrides, matched on cut and/or defense
    cut = "layer2"
    max_ssim = 0.5

Relative paths resolve against the config file's folder. Every key of ``[thresholds]`` may appear in
a rule. Precedence: the defaults, then rules in order of specificity (a rule naming only a cut or
only a defense, then a rule naming both), and among rules of equal specificity the later one in the
file wins. A rule overrides only the keys it sets.

``thresholds.max_ssim`` (the default, not a rule's) is also the "not recognizable" threshold the audit
writes into its report, so the report's verdicts and the gate agree. There is no separate
``threshold`` key. On text, ``thresholds.max_token_accuracy`` plays that part: each modality's
``max_<headline>``.

Leakage keys belong to a modality (:mod:`splitaudit.attacks.modality`): the image keys (``max_ssim``,
``max_psnr``, their gains and increases) and one ``max_<metric>`` per metric of every other modality,
read from the modality's metrics (text: ``max_token_accuracy``, ``max_rouge_l``, ``max_exact_match``,
``max_pii_recovery``, and ``max_token_accuracy_gain`` / ``_increase`` for its headline). A key of
another modality than the results' is an error (exit 2), never a check that silently passes; the
default ``max_ssim = 0.3``, which nobody wrote, becomes the results' headline key (``max_token_accuracy
= 0.3`` on text). The other keys (accuracy, agreement, latency, re-identification) apply to any
modality.
"""

from __future__ import annotations

import difflib
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from splitaudit.config import CHOICES, AuditConfig, check_choice
from splitaudit.errors import UserError
from splitaudit.results import AuditResult, ResultRow, atomic_write_text
from splitaudit.specs import read_toml

CONFIG_FILE = "splitaudit.toml"
DEFAULT_OUT = "splitaudit-gate"
DEFAULT_PROFILE = "quick"


# ------------------------------------------------------------------------------------------------
# Metrics the gate knows: one row per threshold key
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    key: str  # the config key, e.g. "max_ssim"
    field: str  # the ResultRow field it reads
    label: str  # for messages
    bound: str  # "max": value <= limit; "min": value >= limit
    regression: str | None = None  # None | "increase" (current - baseline) | "drop" (baseline - current)
    leakage: bool = False  # depends on the attack: fails when an attack failed or did not converge
    lo: float = 0.0  # allowed range of the limit
    hi: float = math.inf
    digits: int = 3
    modality: str | None = None  # the modality whose results have this metric; None: every modality
    role: str | None = None  # on the modality's headline: "max" | "gain" | "increase" (how a key maps across modalities)

    @property
    def allowed(self) -> str:
        return f"[{self.lo:g}, {self.hi:g}]" if math.isfinite(self.hi) else f">= {self.lo:g}"


_BASE_METRICS: tuple[Metric, ...] = (
    Metric("max_ssim", "ssim", "SSIM", "max", leakage=True, hi=1.0, modality="image", role="max"),
    Metric("max_psnr", "psnr", "PSNR (dB)", "max", leakage=True, digits=2, modality="image"),
    Metric("min_accuracy", "accuracy", "accuracy", "min", hi=1.0),
    Metric("min_agreement", "agreement", "agreement with the undefended model", "min", hi=1.0),
    Metric("max_latency_overhead_ms", "latency_overhead_ms", "device latency overhead (ms)", "max", digits=4),
    Metric("max_ssim_gain", "ssim_gain", "SSIM gain over the no-information guess", "max", leakage=True, lo=-1.0, hi=2.0, modality="image",
           role="gain"),
    Metric("max_reid", "reid_top1", "re-identified share", "max", leakage=True, hi=1.0),
    Metric("max_reid_over_chance", "reid_over_chance", "re-identified share as a multiple of chance", "max", leakage=True, digits=1),
    Metric("max_attack_accuracy", "attack_accuracy", "attack accuracy (the judge on the reconstructions)", "max", leakage=True, hi=1.0),
    Metric("max_ssim_increase", "ssim", "SSIM increase over the baseline", "max", "increase", leakage=True, hi=1.0, modality="image",
           role="increase"),
    Metric("max_psnr_increase", "psnr", "PSNR increase over the baseline (dB)", "max", "increase", leakage=True, digits=2, modality="image"),
    Metric("max_accuracy_drop", "accuracy", "accuracy drop from the baseline", "max", "drop", hi=1.0),
    Metric("max_agreement_drop", "agreement", "agreement drop from the baseline", "max", "drop", hi=1.0),
    Metric("max_latency_overhead_increase_ms", "latency_overhead_ms", "latency overhead increase over the baseline (ms)", "max",
           "increase", digits=4),
)


def _modality_metrics(known: set[str]) -> list[Metric]:
    """One ``max_<metric>`` per metric of every registered modality, and the headline's gain and increase,
    read from the modality (label, digits, range); the keys already defined (the image ones) are kept."""
    import splitaudit.attacks  # noqa: F401  (registers the modalities)
    from splitaudit.attacks.modality import MODALITIES

    out: list[Metric] = []
    for mod in MODALITIES.values():
        for m in mod.metrics:
            lo, hi = (0.0, math.inf) if m.range is None else (min(0.0, m.range[0]), m.range[1])
            span = math.inf if m.range is None else m.range[1] - m.range[0]
            keys = [Metric(f"max_{m.name}", m.name, m.label, "max", leakage=True, lo=lo, hi=hi, digits=m.digits, modality=mod.name,
                           role="max" if m.name == mod.headline else None)]
            if m.name == mod.headline:
                keys += [
                    Metric(f"max_{m.name}_gain", f"{m.name}_gain", f"{m.label} gain over the no-information guess", "max", leakage=True,
                           lo=-span, hi=span, digits=m.digits, modality=mod.name, role="gain"),
                    Metric(f"max_{m.name}_increase", m.name, f"{m.label} increase over the baseline", "max", "increase", leakage=True,
                           hi=span, digits=m.digits, modality=mod.name, role="increase"),
                ]
            for k in keys:
                if k.key not in known:
                    known.add(k.key)
                    out.append(k)
    return out


METRICS: tuple[Metric, ...] = _BASE_METRICS + tuple(_modality_metrics({m.key for m in _BASE_METRICS}))
METRIC_BY_KEY = {m.key: m for m in METRICS}
DEFAULT_LIMITS = {"max_ssim": 0.3}  # on other modalities, the same limit on their headline (see GateConfig.for_modality)


def _headline_key(modality, role: str = "max") -> str | None:
    """The threshold key of ``modality``'s headline metric for ``role`` (max_ssim, max_token_accuracy_gain)."""
    return next((m.key for m in METRICS if m.modality == modality.name and m.role == role), None)


def _is_threshold(key: str) -> bool:
    """A modality's headline key is also the audit's "not recognizable" threshold: it must be above 0."""
    m = METRIC_BY_KEY[key]
    return m.role == "max" and m.modality is not None


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """Limits for the (cut, defense) pairs it matches; ``None`` matches every cut (or defense)."""

    cut: str | None
    defense: str | None
    limits: dict[str, float]  # only the keys the rule sets
    index: int = 0  # position in the file

    def matches(self, cut: str, defense: str, aliases: dict[str, str] | None = None) -> bool:
        rc = (aliases or {}).get(self.cut, self.cut) if self.cut is not None else None
        return (rc is None or rc == cut) and (self.defense is None or self.defense == defense)

    @property
    def specificity(self) -> int:
        return (self.cut is not None) + (self.defense is not None)


@dataclass(frozen=True)
class GateConfig:
    """A validated gate config. Paths are absolute (resolved against the config file's folder)."""

    model: str | None = None
    data: str | None = None
    weights: str | None = None
    cuts: tuple[str, ...] = ()
    defenses: tuple[str, ...] = ()  # canonical specs; () = not given
    attacks: tuple[str, ...] = ()
    profile: str = DEFAULT_PROFILE
    seed: int = 0
    device: str = "auto"
    aux_data: str | None = None
    aux_queries: str = "data"
    executor: str = "local"
    workers: int = 0
    ray_address: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    baseline: str | None = None
    reid_threshold: float = 0.05
    output: str | None = None
    input_norm: str | None = None
    thresholds: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    rules: tuple[Rule, ...] = ()
    path: str | None = None  # the file it came from
    # The keys of ``thresholds`` that are defaults nobody wrote (they follow the results' modality); None: a
    # key of DEFAULT_LIMITS at its default value (a config built in code).
    defaults: frozenset[str] | None = None

    def __post_init__(self):
        if self.defaults is None:
            object.__setattr__(self, "defaults", frozenset(k for k, v in DEFAULT_LIMITS.items() if self.thresholds.get(k) == v))

    def for_modality(self, modality) -> GateConfig:
        """This config for results of ``modality``: a key another modality owns is an error (a check that could
        never apply must not pass silently); a default nobody wrote becomes this modality's headline key."""
        def foreign(key: str, where: str) -> None:
            m = METRIC_BY_KEY[key]
            if m.modality is None or m.modality == modality.name:
                return
            same = _headline_key(modality, m.role) if m.role else None
            own = [k.key for k in METRICS if k.modality == modality.name]
            hint = f"use {same!r} instead" if same else f"the {modality.name} keys are {', '.join(own)}"
            head = modality.metric(modality.headline).label
            raise UserError(f"{key} in {where} is a threshold on {m.modality} results ({m.label}), but these are {modality.name} "
                            f"results (headline {head}), which have no {m.field}: {hint}")

        where = self.path or "the gate config"
        for k in self.thresholds:
            if k not in self.defaults:
                foreign(k, f"[thresholds] of {where}")
        for r in self.rules:
            for k in r.limits:
                foreign(k, f"[[thresholds.rule]] #{r.index + 1} of {where}")
        thresholds: dict[str, float] = {}
        for k in self.defaults:  # first the defaults, moved to this modality's own key ...
            m = METRIC_BY_KEY[k]
            if m.modality is None or m.modality == modality.name:
                thresholds[k] = self.thresholds[k]
            elif m.role and (same := _headline_key(modality, m.role)) is not None:
                thresholds[same] = self.thresholds[k]
        thresholds.update({k: v for k, v in self.thresholds.items() if k not in self.defaults})  # ... then what the user wrote
        return replace(self, thresholds=thresholds, defaults=frozenset(k for k in thresholds if k not in self.thresholds
                                                                       or k in self.defaults))

    def limits_for(self, cut: str, defense: str, *, aliases: dict[str, str] | None = None) -> dict[str, float]:
        """The limits for one pair: defaults, then matching rules by specificity, then file order."""
        limits = dict(self.thresholds)
        for rule in sorted((r for r in self.rules if r.matches(cut, defense, aliases)), key=lambda r: (r.specificity, r.index)):
            limits.update(rule.limits)
        return limits

    def audit_config(self, *, use_cache: bool = True, cache_dir: str | None = None, out: str | None = None, command: str | None = None):
        """The :class:`AuditConfig` that runs what this gate config describes."""

        missing = [k for k in ("model", "data") if getattr(self, k) is None]
        if missing:
            raise UserError(f"{self.path or 'the gate config'} has no {' and no '.join(missing)}, which running the audit needs "
                            "(or pass --results RESULTS.json)")
        import splitaudit.attacks  # noqa: F401  (registers the modalities)
        from splitaudit.attacks.modality import modality_for

        modality = modality_for(self.data)
        mine = self.for_modality(modality)  # a key of another modality fails now, not after the audit
        return AuditConfig(
            model=self.model, data=self.data, weights=self.weights, cuts=self.cuts, defenses=self.defenses or ("none",),
            attacks=self.attacks or ("decoder",), profile=self.profile, device=self.device, seed=self.seed, out=out,
            threshold=mine.thresholds.get(_headline_key(modality) or "max_ssim", DEFAULT_LIMITS["max_ssim"]),
            reid_threshold=self.reid_threshold,
            output=self.output, input_norm=self.input_norm,
            cache_dir=cache_dir or self.cache_dir,
            use_cache=use_cache, command=command, aux_data=self.aux_data, aux_queries=self.aux_queries,
            executor=self.executor, workers=self.workers, ray_address=self.ray_address,
        )


TOP_KEYS = ("model", "weights", "data", "cuts", "defenses", "attacks", "profile", "seed", "device", "aux_data", "aux_queries", "reid_threshold",
            "output", "input_norm",
            "executor", "workers", "ray_address", "cache_dir", "out", "baseline", "thresholds")
LIMIT_KEYS = tuple(m.key for m in METRICS)
THRESHOLD_KEYS = LIMIT_KEYS + ("rule",)
RULE_KEYS = ("cut", "defense") + LIMIT_KEYS


def _unknown(keys, allowed: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UserError(f"unknown key {k!r} in {where}{hint}; allowed keys: {', '.join(allowed)}")


def _expect(value, types, what: str, where: str, desc: str):
    if not isinstance(value, types) or isinstance(value, bool):
        raise UserError(f"{what} in {where} must be {desc}, got {value!r}")
    return value


def _str_list(value, what: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise UserError(f"{what} in {where} must be a list of non-empty strings, got {value!r}")
    return tuple(v.strip() for v in value)


def _limits(table: dict, where: str) -> dict[str, float]:
    out = {}
    for key, value in table.items():
        if key not in LIMIT_KEYS:
            continue
        m = METRIC_BY_KEY[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{key} in {where} must be a number, got {value!r}")
        positive = _is_threshold(key)  # also the audit's "not recognizable" threshold: above 0
        if not m.lo <= value <= m.hi or (positive and value <= 0):
            rng = f"(0, {m.hi:g}]" if positive else m.allowed
            raise UserError(f"{key} = {value!r} in {where} is out of range; allowed: {rng}")
        out[key] = float(value)
    return out


def _resolve_path(value: str, root: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (root / p))


def _resolve_model(spec: str, root: Path) -> str:
    from splitaudit.specs import parse_model_spec

    parsed = parse_model_spec(spec)  # a SpecError is a UserError: exit 2
    if parsed.kind == "file":
        return f"{_resolve_path(parsed.target, root)}:{parsed.attr}"
    return spec


def _resolve_data(spec: str, root: Path) -> str:
    return spec if spec.startswith("builtin:") else _resolve_path(spec, root)


def _canonical_defense(spec: str) -> str:
    import splitaudit.defenses  # noqa: F401  (registers defenses)
    from splitaudit.defenses.base import make_defense

    return make_defense(spec).spec


def parse_gate_config(table: dict[str, Any], *, root: Path, where: str = CONFIG_FILE) -> GateConfig:
    """Validate a parsed TOML table strictly: every unknown key, wrong type or out-of-range value raises."""
    if not isinstance(table, dict):
        raise UserError(f"{where} must be a table")
    _unknown(table, TOP_KEYS, where)
    kw: dict[str, Any] = {}
    for key in ("output", "input_norm"):
        if key in table:
            kw[key] = _expect(table[key], str, key, where, "a string").strip() or None
    if kw.get("input_norm"):
        from splitaudit.outputs import parse_input_norm

        parse_input_norm(kw["input_norm"])
    for key in ("model", "data", "weights", "aux_data", "cache_dir", "out", "baseline"):
        if key in table:
            v = _expect(table[key], str, key, where, "a string")
            if not v.strip():
                raise UserError(f"{key} in {where} is empty")
            kw[key] = v.strip()
    if "model" in kw:
        kw["model"] = _resolve_model(kw["model"], root)
    for key in ("data", "aux_data"):
        if key in kw:
            kw[key] = _resolve_data(kw[key], root)
    for key in ("weights", "cache_dir", "out", "baseline"):
        if key in kw:
            kw[key] = _resolve_path(kw[key], root)
    if "cuts" in table:
        kw["cuts"] = _str_list(table["cuts"], "cuts", where)
    if "defenses" in table:
        kw["defenses"] = tuple(_canonical_defense(s) for s in _str_list(table["defenses"], "defenses", where))
        if not kw["defenses"]:
            raise UserError(f"defenses in {where} is empty; leave it out for the default [\"none\"]")
    if "attacks" in table:
        import splitaudit.attacks  # noqa: F401  (registers attacks)
        from splitaudit.attacks.base import ATTACKS

        kw["attacks"] = _str_list(table["attacks"], "attacks", where)
        for a in kw["attacks"]:
            if a not in ATTACKS:
                raise UserError(f"unknown attack {a!r} in {where}; known attacks: {', '.join(sorted(ATTACKS))}")
    if "seed" in table:
        kw["seed"] = _expect(table["seed"], int, "seed", where, "an integer")
    if "reid_threshold" in table:
        v = _expect(table["reid_threshold"], (int, float), "reid_threshold", where, "a number")
        if not 0 < v <= 1:
            raise UserError(f"reid_threshold = {v!r} in {where} is out of range; allowed: (0, 1]")
        kw["reid_threshold"] = float(v)
    for key in CHOICES:  # the same allowed values, and the same check, as AuditConfig.validate
        if key in table:
            kw[key] = check_choice(key, _expect(table[key], str, key, where, "a string"), where=where)
    if "workers" in table:
        w = _expect(table["workers"], int, "workers", where, "an integer")
        if w < 0:
            raise UserError(f"workers = {w} in {where} is out of range; allowed: 0 (auto) or more")
        kw["workers"] = w
    if "ray_address" in table:
        kw["ray_address"] = _expect(table["ray_address"], str, "ray_address", where, "a string").strip() or None

    thresholds = dict(DEFAULT_LIMITS)
    written: set[str] = set()
    rules: list[Rule] = []
    if "thresholds" in table:
        t = table["thresholds"]
        if not isinstance(t, dict):
            raise UserError(f"thresholds in {where} must be a table ([thresholds])")
        _unknown(t, THRESHOLD_KEYS, f"[thresholds] of {where}")
        mine = _limits(t, f"[thresholds] of {where}")
        thresholds.update(mine)
        written.update(mine)
        raw_rules = t.get("rule", [])
        if not isinstance(raw_rules, list) or not all(isinstance(r, dict) for r in raw_rules):
            raise UserError(f"thresholds.rule in {where} must be an array of tables ([[thresholds.rule]])")
        for i, r in enumerate(raw_rules):
            rw = f"[[thresholds.rule]] #{i + 1} of {where}"
            _unknown(r, RULE_KEYS, rw)
            cut = _expect(r["cut"], str, "cut", rw, "a string").strip() if "cut" in r else None
            defense = _canonical_defense(_expect(r["defense"], str, "defense", rw, "a string")) if "defense" in r else None
            if cut is None and defense is None:
                raise UserError(f"{rw} matches nothing: give cut and/or defense (use [thresholds] for defaults)")
            limits = _limits(r, rw)
            if not limits:
                raise UserError(f"{rw} sets no threshold; allowed keys: {', '.join(LIMIT_KEYS)}")
            rules.append(Rule(cut=cut, defense=defense, limits=limits, index=i))
    return GateConfig(**kw, thresholds=thresholds, rules=tuple(rules), path=where, defaults=frozenset(set(DEFAULT_LIMITS) - written))


def load_gate_config(path: str | Path | None = None, *, cwd: str | Path | None = None) -> GateConfig:
    """Load ``path``, or ``./splitaudit.toml``, or ``[tool.splitaudit]`` of ``./pyproject.toml``.

    A file named ``pyproject.toml`` is read at ``[tool.splitaudit]``; any other file at its top level.
    """
    if path is None:
        here = Path(cwd) if cwd is not None else Path.cwd()
        if (here / CONFIG_FILE).is_file():
            path = here / CONFIG_FILE
        elif (here / "pyproject.toml").is_file() and "splitaudit" in read_toml(here / "pyproject.toml", "config file").get("tool", {}):
            path = here / "pyproject.toml"
        else:
            raise UserError(f"no gate config: found neither {CONFIG_FILE} nor [tool.splitaudit] in pyproject.toml in {here}; "
                            "pass --config FILE")
    path = Path(path)
    data = read_toml(path, "config file")
    if path.name == "pyproject.toml":
        table = data.get("tool", {}).get("splitaudit")
        if table is None:
            raise UserError(f"{path} has no [tool.splitaudit] table")
        where = f"[tool.splitaudit] of {path}"
    else:
        table, where = data, str(path)
    return parse_gate_config(table, root=path.resolve().parent, where=where)


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str  # "cut / defense: metric", unique in a report
    cut: str
    defense: str
    metric: str  # a threshold key, or "present" for a pair the results lack
    value: float | None
    limit: float | None
    passed: bool
    message: str
    images: str | None = None  # reconstruction grid of the headline row


@dataclass(frozen=True)
class GateReport:
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def summary(self) -> str:
        n, f = len(self.checks), len(self.failures)
        return f"gate {'passed' if not f else 'FAILED'}: {n - f} of {n} checks passed" + (f", {f} failed" if f else "")


def _alias_map(result: AuditResult) -> dict[str, str]:
    m: dict[str, str] = {}
    for c in result.cuts:
        for a in c.aliases:
            m[a] = c.name
        m[c.name] = c.name
    return m


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:.{digits}f}"


def _pairs(result: AuditResult, config: GateConfig, baseline: AuditResult | None, aliases: dict[str, str]) -> list[tuple[str, str]]:
    """Every (cut, defense) the gate judges: in the results, or expected by config, rules or baseline."""
    seen: dict[tuple[str, str], None] = {}
    for r in result.results:
        seen[(r.cut, r.defense)] = None
    cuts = [aliases.get(c, c) for c in config.cuts] or list(dict.fromkeys([c.name for c in result.cuts] + [r.cut for r in result.results]))
    defs = list(config.defenses) or result.defenses()
    for c in cuts:
        for d in defs:
            seen[(c, d)] = None
    for rule in config.rules:
        rc = aliases.get(rule.cut, rule.cut) if rule.cut is not None else None
        for c in [rc] if rc is not None else cuts:
            for d in [rule.defense] if rule.defense is not None else defs:
                seen[(c, d)] = None
    if baseline is not None:
        balias = _alias_map(baseline)
        for r in baseline.results:
            seen[(aliases.get(r.cut, balias.get(r.cut, r.cut)), r.defense)] = None
    return list(seen)


def _value(row: ResultRow | None, m: Metric) -> float | None:
    if row is None:
        return None
    if m.field == "reid_over_chance":
        reid, chance = row.reid_top1, row.reid_chance
        return None if reid is None or not chance else float(reid) / float(chance)
    v = row.value(m.field)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def evaluate(result: AuditResult, gate_config: GateConfig, baseline: AuditResult | None = None, *,
             base: str | Path | None = None) -> GateReport:
    """Judge ``result`` against the limits of ``gate_config`` (and ``baseline``, for regression limits).

    ``base`` is the folder that ``ResultRow.images`` paths are relative to (the results file's folder);
    checks then carry the full path of the reconstruction grid.
    """
    modality = result.modality
    if baseline is not None and baseline.modality.name != modality.name:
        raise UserError(f"the baseline holds {baseline.modality.name} results and the results {modality.name} ones: "
                        "a regression limit cannot compare them")
    gate_config = gate_config.for_modality(modality)  # a key of another modality is an error, not a pass
    head_ci_key = f"{modality.headline}_ci"
    aliases = _alias_map(result)
    checks: list[Check] = []
    notes: list[str] = []
    skipped_regression = 0
    for cut, defense in _pairs(result, gate_config, baseline, aliases):
        limits = gate_config.limits_for(cut, defense, aliases=aliases)
        rows = result.rows(cut=cut, defense=defense)
        pair = f"{cut} / {defense}"
        if not rows:
            checks.append(Check(f"{pair}: present", cut, defense, "present", None, None, False,
                                f"no result for cut {cut!r} with defense {defense!r}, which the config, a rule or the baseline expects"))
            continue
        verdict = result.assessment(cut, defense)  # the one assessment every view renders
        head = verdict.headline
        util_row = head or rows[0]
        problems = list(verdict.problems)  # fail closed: a failed, unconverged or flagged attack fails every leakage check
        images = None
        if head is not None and head.images:
            images = str(Path(base) / head.images) if base is not None else head.images
        base_row = baseline.headline(cut, defense) if baseline is not None else None
        if baseline is not None and base_row is None and any(METRIC_BY_KEY[k].regression for k in limits):
            notes.append(f"{pair}: not in the baseline, so its regression limits were not checked")
        for m in METRICS:
            if m.key not in limits:
                continue
            limit = limits[m.key]
            if m.regression:
                if baseline is None:
                    skipped_regression += 1
                    continue
                if base_row is None:
                    continue
            row = head if m.leakage else util_row
            cur = _value(row, m)
            if m.regression:
                prev = _value(base_row, m)
                value = None if cur is None or prev is None else (cur - prev if m.regression == "increase" else prev - cur)
            else:
                value = cur
            name = f"{pair}: {m.key}"
            by = f" ({head.attack}{', adaptive' if head.adaptive else ''})" if (m.leakage and head is not None) else ""
            if value is None:
                why = "every attack failed" if (m.leakage and head is None) else f"{m.field} was not measured"
                if m.regression and cur is not None:
                    why = f"the baseline has no {m.field}"
                msg = f"{m.label}: {why}; a check without a value fails"
                if m.leakage and problems:
                    msg += "; " + "; ".join(problems)
                checks.append(Check(name, cut, defense, m.key, None, limit, False, msg, images))
                continue
            ok = value <= limit if m.bound == "max" else value >= limit
            op = ("<=" if ok else ">") if m.bound == "max" else (">=" if ok else "<")
            msg = f"{m.label}{by} {_fmt(value, m.digits)} {op} limit {_fmt(limit, m.digits)}"
            if not m.regression and m.field == modality.headline and head is not None and head.value(head_ci_key) is not None:
                ci = head.value(head_ci_key)
                msg += f" (95% CI [{_fmt(ci[0], m.digits)}, {_fmt(ci[1], m.digits)}])"
            if m.leakage and problems:
                ok = False
                msg += "; FAILS because " + "; ".join(problems)
            checks.append(Check(name, cut, defense, m.key, value, limit, ok, msg, images))
    if skipped_regression:
        notes.append(f"{skipped_regression} regression limit(s) not checked: no baseline was given (--baseline or `baseline` in the config)")
    return GateReport(tuple(checks), tuple(dict.fromkeys(notes)))


def check_limit(result: AuditResult, *, cut: str, defense: str = "none", metric: str, limit: float,
                base: str | Path | None = None, baseline: AuditResult | None = None) -> Check:
    """Run the engine for one (cut, defense) and one threshold key; the assertion helpers use it."""
    if metric not in METRIC_BY_KEY:
        raise UserError(f"unknown metric {metric!r}; known: {', '.join(LIMIT_KEYS)}")
    defense = _canonical_defense(defense)
    cfg = GateConfig(thresholds={}, rules=(Rule(cut=cut, defense=defense, limits={metric: float(limit)}),),
                     cuts=(cut,), defenses=(defense,))
    only = replace(result, results=tuple(r for r in result.results if r.defense == defense))
    report = evaluate(only, cfg, baseline, base=base)
    mine = [c for c in report.checks if c.defense == defense and c.cut == _alias_map(result).get(cut, cut)]
    return next(c for c in mine if c.metric in (metric, "present"))


def _assert(check: Check) -> Check:
    if not check.passed:
        where = f"\n  reconstructions: {check.images}" if check.images else ""
        raise AssertionError(f"splitaudit: cut {check.cut!r}, defense {check.defense!r}: {check.message}{where}")
    return check


def assert_max_ssim(result: AuditResult, *, cut: str, defense: str = "none", limit: float = 0.3, base=None) -> Check:
    """Fail unless the strongest attack's mean SSIM at (cut, defense) is at most ``limit``."""
    return _assert(check_limit(result, cut=cut, defense=defense, metric="max_ssim", limit=limit, base=base))


def assert_max_psnr(result: AuditResult, *, cut: str, defense: str = "none", limit: float, base=None) -> Check:
    return _assert(check_limit(result, cut=cut, defense=defense, metric="max_psnr", limit=limit, base=base))


def assert_min_accuracy(result: AuditResult, *, cut: str, defense: str = "none", limit: float, base=None) -> Check:
    return _assert(check_limit(result, cut=cut, defense=defense, metric="min_accuracy", limit=limit, base=base))


def assert_min_agreement(result: AuditResult, *, cut: str, defense: str = "none", limit: float, base=None) -> Check:
    return _assert(check_limit(result, cut=cut, defense=defense, metric="min_agreement", limit=limit, base=base))


def assert_max_reid(result: AuditResult, *, cut: str, defense: str = "none", limit: float, base=None) -> Check:
    """Fail unless the strongest attack re-identifies at most a share ``limit`` of its inputs at (cut, defense)."""
    return _assert(check_limit(result, cut=cut, defense=defense, metric="max_reid", limit=limit, base=base))


def assert_max_ssim_gain(result: AuditResult, *, cut: str, defense: str = "none", limit: float, base=None) -> Check:
    """Fail unless the strongest attack's SSIM gain over the no-information guess is at most ``limit``."""
    return _assert(check_limit(result, cut=cut, defense=defense, metric="max_ssim_gain", limit=limit, base=base))


def assert_max_token_accuracy(result: AuditResult, value: float = 0.3, cut: str | None = None, defense: str | None = None, *,
                              base=None) -> list[Check]:
    """Fail unless the strongest attack's mean token accuracy is at most ``value`` at ``cut`` / ``defense``
    (text results; the text twin of :func:`assert_max_ssim`). ``cut=None`` checks every cut of the results,
    ``defense=None`` every defense; returns the checks. Like every leakage check it fails closed, and on
    image results it is an error, not a pass."""
    return _assert_each(result, "max_token_accuracy", value, cut, defense, base)


def _assert_each(result: AuditResult, metric: str, limit: float, cut: str | None, defense: str | None, base) -> list[Check]:
    """``metric`` <= ``limit`` at every (cut, defense) of ``result`` that matches (None: any), failures listed together."""
    if cut is not None and defense is not None:
        return [_assert(check_limit(result, cut=cut, defense=defense, metric=metric, limit=limit, base=base))]
    aliases = _alias_map(result)
    want_cut = None if cut is None else aliases.get(cut, cut)
    want_def = None if defense is None else _canonical_defense(defense)
    pairs = [(a.cut, a.defense) for a in result.assessments()
             if (want_cut is None or a.cut == want_cut) and (want_def is None or a.defense == want_def)]
    if not pairs:
        raise AssertionError(f"splitaudit: no result for cut {cut if cut is not None else 'any'!r} with defense "
                             f"{defense if defense is not None else 'any'!r}")
    checks = [check_limit(result, cut=c, defense=d, metric=metric, limit=limit, base=base) for c, d in pairs]
    failed = [c for c in checks if not c.passed]
    if failed:
        raise AssertionError("splitaudit: " + "; ".join(f"cut {c.cut!r}, defense {c.defense!r}: {c.message}" for c in failed)
                             + "".join(f"\n  reconstructions: {c.images}" for c in failed if c.images))
    return checks


def assert_gate(result: AuditResult, config: GateConfig, baseline: AuditResult | None = None, *, base=None) -> GateReport:
    """Fail with every failed check listed when ``result`` does not pass ``config``."""
    report = evaluate(result, config, baseline, base=base)
    if not report.passed:
        lines = [f"  {c.name}: {c.message}" + (f"\n    reconstructions: {c.images}" if c.images else "") for c in report.failures]
        raise AssertionError("splitaudit " + report.summary() + "\n" + "\n".join(lines))
    return report


# ------------------------------------------------------------------------------------------------
# Views: console table, JUnit XML
# ------------------------------------------------------------------------------------------------
def _digits(metric: str) -> int:
    return METRIC_BY_KEY[metric].digits if metric in METRIC_BY_KEY else 3


def gate_table(report: GateReport):
    from rich.table import Table

    table = Table(title="splitaudit gate", title_justify="left")
    table.add_column("check", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("result")
    for c in report.checks:
        table.add_row(c.name, _fmt(c.value, _digits(c.metric)), _fmt(c.limit, _digits(c.metric)),
                      "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    return table


def print_report(report: GateReport, console) -> None:
    console.print(gate_table(report))
    for c in report.failures:
        console.print(f"FAIL {c.name}: {c.message}", markup=False, highlight=False, soft_wrap=True)
        if c.images:
            console.print(f"     reconstructions: {c.images}", markup=False, highlight=False, soft_wrap=True)
    for n in report.notes:
        console.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)
    console.print(report.summary(), markup=False, highlight=False)


def markdown_summary(report: GateReport, result: AuditResult) -> str:
    """The verdict table and the failed checks in Markdown, for ``$GITHUB_STEP_SUMMARY``."""
    from splitaudit.plan import short_defense_names

    modality = result.modality
    head = modality.metric(modality.headline)
    others = [m for m in modality.metrics if m.name != head.name and m.range is not None]  # bounded: shares (ROUGE-L, PII recovery)
    short = short_defense_names(result.defenses())
    cols = ["cut", "defense", "verdict", f"{head.label} [95% CI]", "gain", *[m.label for m in others], "re-id", "accuracy"]
    lines = [f"## splitaudit gate: {'passed' if report.passed else 'FAILED'}", "", report.summary() + ".", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def num(v, nd: int, signed: bool = False) -> str:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "-"
        return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"

    for a in result.assessments():
        h = a.headline
        nd = head.digits
        if h is None:
            nums = ["-"] * (len(cols) - 3)
        else:
            ci = h.value(f"{head.name}_ci")
            lead = num(h.value(head.name), nd) + (f" [{num(ci[0], nd)}, {num(ci[1], nd)}]" if ci is not None else "")
            nums = [lead, num(h.value(f"{head.name}_gain"), nd, signed=True), *[num(h.value(m.name), m.digits) for m in others],
                    "-" if h.reid_top1 is None else f"{100 * h.reid_top1:.1f}%", "-" if h.accuracy is None else f"{h.accuracy:.3f}"]
        lines.append(f"| `{cell(a.cut)}` | `{cell(short.get(a.defense, a.defense))}` | {a.words} | " + " | ".join(nums) + " |")
    if report.failures:
        lines += ["", "### Failed checks", ""]
        lines += [f"- `{cell(c.name)}`: {cell(c.message)}" for c in report.failures]
    if report.notes:
        lines += ["", *[f"> {cell(n)}" for n in report.notes]]
    return "\n".join(lines) + "\n"


def append_summary(report: GateReport, result: AuditResult, path: str | Path) -> None:
    """Append the Markdown summary to ``path`` (as GitHub's step summary file is meant to be used)."""
    try:
        with Path(path).open("a", encoding="utf-8") as f:
            f.write(markdown_summary(report, result) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the summary {str(path)!r}: {exc.strerror or exc}") from None


def junit_xml(report: GateReport, *, suite: str = "splitaudit gate") -> str:
    """One testcase per check (classname = the pair, name = the threshold key), a failure element on fail."""
    root = ET.Element("testsuites", name=suite, tests=str(len(report.checks)), failures=str(len(report.failures)), errors="0")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(report.checks)), failures=str(len(report.failures)),
                       errors="0", skipped="0", time="0")
    for c in report.checks:
        tc = ET.SubElement(ts, "testcase", classname=f"splitaudit.{c.cut}.{c.defense}", name=c.metric, time="0")
        detail = f"{c.name}\nvalue: {_fmt(c.value, _digits(c.metric))}\nlimit: {_fmt(c.limit, _digits(c.metric))}\n{c.message}"
        if c.images:
            detail += f"\nreconstructions: {c.images}"
        if not c.passed:
            fail = ET.SubElement(tc, "failure", message=c.message, type="splitaudit.gate")
            fail.text = detail
        else:
            ET.SubElement(tc, "system-out").text = detail
    if report.notes:
        ET.SubElement(ts, "system-out").text = "\n".join(report.notes)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(report: GateReport, path: str | Path) -> Path:
    path = Path(path)
    try:
        atomic_write_text(path, junit_xml(report))
    except OSError as exc:
        raise UserError(f"cannot write the JUnit file {str(path)!r}: {exc.strerror or exc}") from None
    return path


__all__ = [
    "Check", "GateConfig", "GateReport", "Rule", "METRICS", "append_summary", "assert_gate", "assert_max_psnr", "assert_max_reid",
    "assert_max_ssim", "assert_max_ssim_gain", "assert_max_token_accuracy", "assert_min_accuracy", "markdown_summary",
    "assert_min_agreement", "check_limit", "evaluate", "junit_xml", "load_gate_config", "parse_gate_config", "write_junit",
]
