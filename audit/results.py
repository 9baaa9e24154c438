"""Typed, frozen results with a JSON round trip (``"schema": "splitaudit/1"``).

One :class:`AuditResult` feeds every view: console, HTML report, gate and planner. The JSON layout is
the contract in ``shared/DESIGN.md``; extra keys are allowed, so new fields go into the dataclasses
with defaults and old files still load.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from splitaudit.errors import DataError

SCHEMA = "splitaudit/1"


@dataclass(frozen=True)
class CutInfo:
    name: str
    shape: tuple[int, ...]
    bytes_per_sample: int  # float32
    head_flops: int
    head_latency_ms: float  # batch 1, median
    bytes_fp16: int = 0
    bytes_int8: int = 0
    index: int = 0
    module_type: str = ""
    aliases: tuple[str, ...] = ()
    head_latency_ms_b64: float | None = None
    tail_flops: int | None = None
    tail_latency_ms: float | None = None


@dataclass(frozen=True)
class ResultRow:
    """One (cut, defense, attack) cell of the grid."""

    cut: str
    defense: str
    attack: str
    adaptive: bool
    n_eval: int = 0
    # The image metrics have fields of their own (None in a text audit, whose metrics are in ``metrics``).
    ssim: float | None = None
    ssim_ci: tuple[float, float] | None = None
    psnr: float | None = None
    psnr_ci: tuple[float, float] | None = None
    baseline_ssim: float | None = None
    accuracy: float | None = None
    agreement: float | None = None
    latency_ms: float | None = None
    latency_overhead_ms: float | None = None
    epsilon: float | None = None
    delta: float | None = None
    baseline_psnr: float | None = None
    worst_ssim: float | None = None  # the single most recognizable sample
    worst_indices: tuple[int, ...] = ()  # eval indices of the most recognizable samples
    converged: bool = True
    status: str = "ok"  # ok | not_converged | failed
    error: str | None = None
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    bytes_per_sample: int | None = None  # on the wire with this defense (quantization changes it)
    latency_ms_b64: float | None = None
    latency_overhead_ms_b64: float | None = None
    train_seconds: float | None = None
    epochs: int | None = None
    images: str | None = None  # path of the PNG grid, relative to results.json
    defense_info: dict[str, Any] = field(default_factory=dict)
    attack_info: dict[str, Any] = field(default_factory=dict)
    # Leakage above the prior (paired per-sample differences from the no-information guess) and identity.
    ssim_gain: float | None = None
    ssim_gain_ci: tuple[float, float] | None = None
    psnr_gain: float | None = None
    psnr_gain_ci: tuple[float, float] | None = None
    reid_top1: float | None = None  # share of evaluation inputs whose reconstruction picks them out of the N originals
    reid_top1_ci: tuple[float, float] | None = None
    reid_chance: float | None = None  # 1 / N
    attack_accuracy: float | None = None  # the judge's accuracy on the reconstructions (None without labels)
    # Mean squared error per input dimension (images: per pixel and channel, in [0, 1]), of the attack and of the
    # no-information guess; None where inputs are not continuous (text).
    mse: float | None = None
    mse_ci: tuple[float, float] | None = None
    baseline_mse: float | None = None
    # An attack-independent reference for additive noise (splitaudit.dfil): dFIL at the cut under this defense's
    # noise, its standard error, and the Cramér–Rao bound 1/dFIL on an *unbiased* attacker's MSE. Attackers that
    # use a prior are biased and can beat it. None for every other defense and for text. Never part of a verdict.
    dfil: float | None = None
    dfil_se: float | None = None
    crb_mse: float | None = None
    # The values of a modality's metrics that have no field of their own (``token_accuracy``,
    # ``token_accuracy_ci``, ``baseline_token_accuracy``...): flat keys of the row in results.json.
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, bool]:
        return (self.cut, self.defense, self.attack, self.adaptive)

    @classmethod
    def make(cls, **values: Any) -> ResultRow:
        """A row from flat keys: those with a field of their own go there, the rest into ``metrics``."""
        known = _field_names(cls)
        return cls(**{k: v for k, v in values.items() if k in known},
                   metrics={k: v for k, v in values.items() if k not in known})

    def value(self, key: str) -> Any:
        """A row key by name (``ssim``, ``ssim_ci``, ``token_accuracy``), wherever it is stored; None if absent."""
        if key in _field_names(type(self)) and key != "metrics":
            return getattr(self, key)
        return self.metrics.get(key)


@dataclass(frozen=True)
class AuditResult:
    created: str
    seed: int
    model: dict[str, Any]
    data: dict[str, Any]
    environment: dict[str, Any]
    cuts: tuple[CutInfo, ...]
    results: tuple[ResultRow, ...]
    config: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.3
    notes: tuple[str, ...] = ()
    schema: str = SCHEMA
    # A share of inputs re-identified above which a pair is recognizable, whatever its SSIM (the default
    # is 5%: 50 times chance among 1,000 evaluation inputs).
    reid_threshold: float = 0.05
    # An extra top-level key (the contract allows them): the output of ``splitaudit plan`` for a
    # deployment profile, when the audit was given ``--plan-profile``. Written only when present.
    plan: dict[str, Any] | None = None
    # The example grids of the rows (image path -> PNG bytes), made by the audit and written by the writer
    # beside results.json; not part of the JSON (rows name the files).
    grids: dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)

    # --- views -----------------------------------------------------------------------------------
    def cut(self, name: str) -> CutInfo:
        for c in self.cuts:
            if c.name == name:
                return c
        raise KeyError(name)

    def rows(self, *, cut: str | None = None, defense: str | None = None, attack: str | None = None) -> list[ResultRow]:
        return [
            r
            for r in self.results
            if (cut is None or r.cut == cut) and (defense is None or r.defense == defense) and (attack is None or r.attack == attack)
        ]

    def headline(self, cut: str, defense: str) -> ResultRow | None:
        """The row the assessment of (cut, defense) rests on: the strongest attack, adaptive or not."""
        return self.assessment(cut, defense).headline

    def defenses(self) -> list[str]:
        out: list[str] = []
        for r in self.results:
            if r.defense not in out:
                out.append(r.defense)
        return out

    @property
    def modality(self):
        """The :class:`~splitaudit.attacks.modality.Modality` the audit ran in: ``data["modality"]`` (a name, or
        a dict with one), images when absent (results written before there was a second modality)."""
        import splitaudit.attacks  # noqa: F401  (registers the modalities)
        from splitaudit.attacks.modality import FALLBACK, get_modality

        name = self.data.get("modality") if isinstance(self.data, dict) else None
        if isinstance(name, dict):
            name = name.get("name")
        return get_modality(name or FALLBACK)

    @property
    def headline_metric(self):
        """The :class:`~splitaudit.attacks.modality.MetricInfo` verdicts, thresholds and rankings rest on
        (SSIM for images, token accuracy for text)."""
        m = self.modality
        return m.metric(m.headline)

    def summary(self) -> str:
        lines = [f"splitaudit results: model {self.model.get('spec')} on {self.data.get('spec')}, seed {self.seed}"]
        info = self.headline_metric
        nd = info.digits
        for a in self.assessments():
            h = a.headline
            ci = None if h is None else h.value(f"{info.name}_ci")
            v = "n/a" if h is None or a.value is None else (
                f"{a.value:.{nd}f}" + (f" [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]" if ci is not None else "") + f" ({h.attack})")
            lines.append(f"  {a.cut:<20} {a.defense:<24} {info.label} {v}: {a.words}")
        return "\n".join(lines)

    # --- JSON --------------------------------------------------------------------------------------
    def assessments(self):
        """One :class:`~splitaudit.assess.Assessment` per (cut, defense): what every view renders."""
        from splitaudit.assess import assess_all

        return assess_all(self)

    def assessment(self, cut: str, defense: str):
        from splitaudit.assess import assess

        return assess(self, cut, defense)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, grids={}))
        d["results"] = [{**{k: v for k, v in r.items() if k != "metrics"}, **r["metrics"]} for r in d["results"]]
        index = {r.key: i for i, r in enumerate(self.results)}
        d["assessment"] = [a.to_dict(index) for a in self.assessments()]
        order = ["schema", "created", "seed", "model", "data", "environment", "config", "threshold", "reid_threshold", "notes", "cuts",
                 "results", "assessment"]
        if self.plan is not None:
            order.append("plan")
        return _jsonable({k: d[k] for k in order})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditResult:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise DataError(f"not a splitaudit results file (expected schema {SCHEMA!r})")
        try:
            cuts = tuple(_build(CutInfo, c) for c in d["cuts"])
            rows = tuple(_build(ResultRow, r, rest="metrics") for r in d["results"])
            kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("cuts", "results", "grids")}
            kw["notes"] = tuple(kw.get("notes", ()))
            return cls(cuts=cuts, results=rows, **kw)
        except (KeyError, TypeError) as exc:
            raise DataError(f"results file is missing or has a malformed field: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> AuditResult:
        return cls.from_dict(json.loads(text, parse_constant=_parse_constant))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> AuditResult:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"results file {str(path)!r} not found")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"results file {str(path)!r} is not valid JSON ({exc})") from None


def _parse_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


_TUPLE_FIELDS = {"shape", "aliases", "ssim_ci", "psnr_ci", "worst_indices", "flags", "notes", "ssim_gain_ci", "psnr_gain_ci",
                 "reid_top1_ci", "mse_ci"}


_REQUIRED_FLOATS = {"ssim", "psnr", "baseline_ssim"}  # non-finite values are written as null


def _field_names(cls) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _build(cls, d: dict[str, Any], *, rest: str | None = None):
    """``cls`` from a JSON dict. Unknown keys are dropped, or with ``rest`` kept in that dict field (a row's
    metrics of another modality, written by a newer version: extra keys are welcome)."""
    known = _field_names(cls)
    kw: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for k, v in d.items():
        if k not in known or k == rest:
            if rest is not None and k != rest:
                extra[k] = tuple(v) if k.endswith("_ci") and isinstance(v, list) else v
            continue
        if k in _TUPLE_FIELDS and isinstance(v, list):
            v = tuple(math.nan if e is None and k.endswith("_ci") else e for e in v)
        elif k in _REQUIRED_FLOATS and v is None:
            v = math.nan
        kw[k] = v
    if rest is not None:
        kw[rest] = extra
    return cls(**kw)


def _jsonable(obj):
    """Tuples to lists; NaN and inf to null (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
