"""Where to cut: end-to-end latency, cost, leakage and accuracy of every placement, for one deployment.

``splitaudit plan`` turns an audit into a recommendation. Every number it starts from was measured by
the audit (head and tail latency and FLOPs, bytes on the wire with each defense, the strongest
attack's SSIM or token accuracy, accuracy); a *deployment profile* (TOML) says how fast the device and the server are
compared with the machine that ran the audit, what the link does, and what the server costs.

Pure functions: no torch, no console. The CLI renders a :class:`Plan`; the HTML report renders its
:meth:`Plan.to_dict` stored in results.json.

The model, per candidate (batch 1; ``b`` = uplink Mbit/s):

- device ms = head (+ defense) latency measured by the audit / ``device.speed``
  (with ``device.flops_per_s``: head FLOPs / FLOP/s, plus the defense's measured overhead / speed);
- transfer ms = bytes sent × 8 / (b × 10⁶) × 10³ + RTT (the reply, a few bytes, rides in the RTT);
- server ms = tail latency measured by the audit / ``server.speed`` (or tail FLOPs / FLOP/s);
- cost per inference = billed server seconds × ``price_per_s`` + ``price_per_request``
  + bytes sent × (``link.price_per_gb`` + ``server.ingress_per_gb``) / 10⁹ + reply bytes × ``egress_per_gb`` / 10⁹,
  where billed seconds round the server time up to ``billed_increment_ms``. Reported per million inferences.
  Device energy is not priced.

Candidates are every (cut, defense) of the audit plus the two trivial placements: *all on the device*
(nothing is sent, so nothing can be rebuilt from the wire: leakage 0, shown as "nothing sent") and
*all on the server* (the raw input is sent, as 8-bit pixels or bytes: leakage 1, the input itself).

Leakage is the headline metric of the pair's assessment (:mod:`splitaudit.assess`): the strongest
attack's mean of the modality's headline metric (SSIM for images, token accuracy for text). A pair
whose ladder is incomplete (an attack failed, did not converge, or is flagged as a lower bound) is
*unverified*: its value is only a lower bound, so it ranks and is checked as leakage 1.0 (the worst
case), exactly as the gate fails it. The leakage limit keeps the name ``max_ssim`` (the command's
``--max-ssim``, a profile's ``[constraints]``) and applies to the headline metric, whatever it is.

Recommendation: among the candidates that meet every limit, the best by the objective (default:
lowest end-to-end latency), ties broken by cost, then leakage, then accuracy loss, then candidate
order. The default limits are leakage ≤ the audit's threshold and an accuracy drop of at most one point;
a profile's ``[constraints]`` and the command's flags replace them.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from splitaudit.errors import DataError, SpecError
from splitaudit.results import AuditResult, ResultRow
from splitaudit.specs import build_config, param, read_toml

PRESETS_DIR = Path(__file__).parent / "plan_profiles"
DEFAULT_PRESET = "phone-4g"
DEFAULT_MAX_ACCURACY_DROP = 0.01
SWEEP_RANGE_MBIT = (0.01, 10_000.0)
SWEEP_POINTS_PER_DECADE = 40
OBJECTIVES = ("latency", "cost", "leakage")


# ------------------------------------------------------------------------------------------------
# The Pareto front (pure; the report's trade-off plot uses it too)
# ------------------------------------------------------------------------------------------------
def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, every coordinate to be minimized.

    ``a`` dominates ``b`` when it is no worse in every coordinate and strictly better in one. Equal
    points do not dominate each other, so duplicates on the front are all kept. A point with a NaN
    coordinate is not comparable: it is never on the front and never dominates. The result is in
    input order.
    """
    pts = [tuple(float(v) for v in p) for p in points]
    if pts and len({len(p) for p in pts}) != 1:
        raise ValueError("all points must have the same number of coordinates")
    valid = [i for i, p in enumerate(pts) if not any(math.isnan(v) for v in p)]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [i for i in valid if not any(dominates(pts[j], pts[i]) for j in valid if j != i)]


# ------------------------------------------------------------------------------------------------
# Deployment profiles
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    speed: float = param(1.0, lo=0, lo_open=True, help="speed relative to the machine that ran the audit (0.5: twice as slow)")
    flops_per_s: float | None = param(None, lo=0, lo_open=True, help="estimate compute from FLOPs instead of measured time")
    whole_model: bool = param(True, help="the device can hold and run the whole model (false: no all-on-device placement)")


@dataclass(frozen=True)
class LinkSpec:
    uplink_mbit: float = param(None, lo=0, lo_open=True, help="uplink bandwidth, Mbit/s (required)")  # type: ignore[assignment]
    rtt_ms: float = param(0.0, lo=0, help="round-trip time, ms")
    price_per_gb: float = param(0.0, lo=0, help="what the device's link charges per GB sent (a metered data plan)")


@dataclass(frozen=True)
class ServerSpec:
    speed: float = param(1.0, lo=0, lo_open=True, help="speed relative to the machine that ran the audit")
    flops_per_s: float | None = param(None, lo=0, lo_open=True, help="estimate compute from FLOPs instead of measured time")
    price_per_s: float = param(0.0, lo=0, help="price of one second of compute")
    price_per_request: float = param(0.0, lo=0, help="price per request (FaaS)")
    ingress_per_gb: float = param(0.0, lo=0, help="price per GB received from the device")
    egress_per_gb: float = param(0.0, lo=0, help="price per GB sent back (the reply)")
    reply_bytes: int = param(64, lo=0, help="size of the reply (a label or a few scores)")
    billed_increment_ms: float = param(0.0, lo=0, help="compute is billed in these increments, rounded up (0: exact)")


@dataclass(frozen=True)
class Constraints:
    max_ssim: float | None = param(None, lo=0, lo_open=True, hi=1)  # the leakage limit: on the modality's headline metric
    max_latency_ms: float | None = param(None, lo=0, lo_open=True)
    max_cost: float | None = param(None, lo=0)  # per million inferences
    min_accuracy: float | None = param(None, lo=0, hi=1)
    max_accuracy_drop: float | None = param(None, lo=0, hi=1)

    def given(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class PlanProfile:
    name: str
    device: DeviceSpec
    link: LinkSpec
    server: ServerSpec
    constraints: Constraints = field(default_factory=Constraints)
    description: str = ""
    currency: str = "USD"
    source: str = ""  # "preset NAME" or the file's path

    def with_link(self, *, bandwidth: float | None = None, rtt: float | None = None) -> PlanProfile:
        """The profile with the command line's ``--bandwidth`` / ``--rtt`` in place of the file's."""
        link = self.link
        if bandwidth is not None:
            if not (math.isfinite(bandwidth) and bandwidth > 0):
                raise SpecError(f"--bandwidth must be a positive number of Mbit/s, got {bandwidth:g}")
            link = replace(link, uplink_mbit=float(bandwidth))
        if rtt is not None:
            if not (math.isfinite(rtt) and rtt >= 0):
                raise SpecError(f"--rtt must be a number of ms >= 0, got {rtt:g}")
            link = replace(link, rtt_ms=float(rtt))
        return replace(self, link=link)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description, "currency": self.currency, "source": self.source,
            "device": asdict(self.device), "link": asdict(self.link), "server": asdict(self.server),
            "constraints": self.constraints.given(),
        }


_SECTIONS = {"device": DeviceSpec, "link": LinkSpec, "server": ServerSpec, "constraints": Constraints}
_TOP_KEYS = ("name", "description", "currency", *_SECTIONS)


def _unknown(keys, allowed: Sequence[str], where: str) -> None:
    for k in keys:
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SpecError(f"unknown key {k!r} in {where}{hint}; allowed keys: {', '.join(allowed)}")


def _section(cls, table: Any, where: str):
    """One validated section: unknown keys, wrong types and out-of-range values raise SpecError."""
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table, got {table!r}")
    names = [f.name for f in fields(cls)]
    _unknown(table, names, where)
    for f in fields(cls):
        if f.name not in table or table[f.name] is None:
            continue
        v, kind = table[f.name], str(f.type)
        if "bool" in kind:
            ok, desc = isinstance(v, bool), "true or false"
        elif kind.startswith("int"):
            ok, desc = isinstance(v, int) and not isinstance(v, bool), "an integer"
        else:
            ok, desc = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"
        if not ok:
            raise SpecError(f"{f.name} in {where} must be {desc}, got {v!r}")
    values = {k: float(v) if "float" in str(cls.__dataclass_fields__[k].type) else v for k, v in table.items() if v is not None}
    return build_config(cls, values, what=where)


def parse_profile(table: dict[str, Any], *, name: str, source: str) -> PlanProfile:
    """Validate a parsed TOML table strictly (every unknown key, wrong type or bad value raises)."""
    where = source
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table")
    _unknown(table, _TOP_KEYS, where)
    for key in ("name", "description", "currency"):
        if key in table and not isinstance(table[key], str):
            raise SpecError(f"{key} in {where} must be a string, got {table[key]!r}")
    if "link" not in table:
        raise SpecError(f"{where} has no [link] table (uplink_mbit is required)")
    parts = {sec: _section(cls, table.get(sec, {}), f"[{sec}] of {where}") for sec, cls in _SECTIONS.items()}
    if parts["link"].uplink_mbit is None:
        raise SpecError(f"[link] of {where} has no uplink_mbit (the uplink bandwidth in Mbit/s, required)")
    return PlanProfile(name=table.get("name", name), description=table.get("description", ""),
                       currency=table.get("currency", "USD"), source=source, **parts)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path | None = None) -> PlanProfile:
    """A preset by name (``phone-4g``), or a TOML file; ``None`` is the default preset."""
    ref = str(name_or_path) if name_or_path is not None else DEFAULT_PRESET
    presets = preset_names()
    looks_like_file = ref.endswith(".toml") or "/" in ref or "\\" in ref or Path(ref).exists()
    if not looks_like_file:
        if ref not in presets:
            raise SpecError(f"unknown plan profile {ref!r}; presets: {', '.join(presets)}; or give a .toml file")
        path = PRESETS_DIR / f"{ref}.toml"
        return parse_profile(read_toml(path, "preset"), name=ref, source=f"preset {ref}")
    path = Path(ref).expanduser()
    return parse_profile(read_toml(path, "plan profile"), name=path.stem, source=str(path))


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    index: int
    placement: str  # split | device | server
    cut: str | None
    defense: str | None
    label: str
    attack: str | None  # the headline attack, "adaptive" marked
    ssim: float | None  # measured mean SSIM of the strongest attack; None: nothing sent, no conclusion, or not an image audit
    ssim_ci: tuple[float, float] | None
    leakage: float  # what ranking and limits use (see the module docstring)
    verified: bool
    bytes_sent: int
    device_ms: float
    server_ms: float
    rtt_ms: float  # 0 when nothing is sent
    transfer_ms: float  # bytes / bandwidth + RTT
    cost_per_million: float
    cost_parts: dict[str, float]  # per million: compute, requests, transfer
    accuracy: float | None
    agreement: float | None
    utility_loss: float  # accuracy drop (fraction), or predictions changed when unlabelled
    notes: tuple[str, ...] = ()
    status: str | None = None  # the pair's assessment (None for the all-on-device and all-on-server placements)
    metric: str = "ssim"  # the headline metric of the audit's modality (ssim, token_accuracy)
    value: float | None = None  # its measured mean for the strongest attack (what ``ssim`` is for images); None as for ssim
    value_ci: tuple[float, float] | None = None

    @property
    def latency_ms(self) -> float:
        return self.device_ms + self.transfer_ms + self.server_ms

    def latency_at(self, mbit: float) -> float:
        """End-to-end latency over an uplink of ``mbit`` Mbit/s (everything else unchanged)."""
        send = self.bytes_sent * 8e-3 / mbit + self.rtt_ms if self.placement != "device" else 0.0
        return self.device_ms + send + self.server_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["latency_ms"] = self.latency_ms
        return d


def _label(cut: str, defense: str, short: dict[str, str] | None = None) -> str:
    return f"cut {cut}, " + ("no defense" if defense == "none" else (short or {}).get(defense, defense))


def short_defense_names(specs) -> dict[str, str]:
    """Canonical specs shortened to their first parameter (``noise:sigma=0.5``, ``dpsgd:epsilon=8``)
    for tables; a spec keeps its full form when the short one would not tell it from another."""
    specs = list(dict.fromkeys(specs))
    short = {s: s.split(",")[0] for s in specs}
    taken: dict[str, int] = {}
    for v in short.values():
        taken[v] = taken.get(v, 0) + 1
    return {s: v if taken[v] == 1 else s for s, v in short.items()}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _reference_accuracy(result: AuditResult) -> float | None:
    """Accuracy of the undefended model: a ``none`` row, else what a model-changing defense recorded."""
    for r in result.results:
        if r.defense == "none" and r.accuracy is not None:
            return r.accuracy
    for r in result.results:
        before = r.defense_info.get("accuracy_before") if isinstance(r.defense_info, dict) else None
        if _finite(before):
            return float(before)
    return None


def _costs(profile: PlanProfile, server_ms: float, bytes_sent: int) -> dict[str, float]:
    s, link = profile.server, profile.link
    inc = s.billed_increment_ms
    billed_ms = math.ceil(server_ms / inc - 1e-9) * inc if inc > 0 else server_ms
    return {
        "compute": 1e6 * billed_ms / 1e3 * s.price_per_s,
        "requests": 1e6 * s.price_per_request,
        "transfer": 1e6 * (bytes_sent * (link.price_per_gb + s.ingress_per_gb) + s.reply_bytes * s.egress_per_gb) / 1e9,
    }


def candidates(result: AuditResult, profile: PlanProfile) -> tuple[list[Candidate], list[str]]:
    """Every placement the audit measured, plus all-on-device and all-on-server; and notes."""
    notes: list[str] = []
    dev, srv, link = profile.device, profile.server, profile.link
    cuts = {c.name: c for c in result.cuts}
    missing_tail = [c.name for c in result.cuts if c.tail_latency_ms is None or c.tail_flops is None]
    if missing_tail:
        which = ", ".join(missing_tail[:3]) + (f" and {len(missing_tail) - 3} more" if len(missing_tail) > 3 else "")
        raise DataError(
            f"the results have no server-side (tail) measurements for cut(s) {which}: they were written before "
            "splitaudit measured the tail; run the audit again (its cache makes a rerun fast)"
        )
    ref_acc = _reference_accuracy(result)
    pairs = list(dict.fromkeys((r.cut, r.defense) for r in result.results))
    skipped = sorted({c for c, _ in pairs if c not in cuts})
    if skipped:
        notes.append(f"rows for cut(s) {', '.join(skipped)} have no cut measurements and are left out")
    pairs = [(c, d) for c, d in pairs if c in cuts]
    rows_by_pair = {p: result.rows(cut=p[0], defense=p[1]) for p in pairs}
    info = result.headline_metric  # the leakage metric: SSIM for images, token accuracy for text
    key, is_ssim = info.name, info.name == "ssim"
    verdicts = {p: result.assessment(*p) for p in pairs}  # the one assessment every view renders
    util_rows = {p: verdicts[p].headline or rows_by_pair[p][0] for p in pairs}
    use_acc = ref_acc is not None and all(util_rows[p].accuracy is not None for p in pairs)
    any_agree = any(util_rows[p].agreement is not None for p in pairs)
    if not use_acc and pairs:
        notes.append("accuracy loss is the share of predictions that changed (no labels or no undefended accuracy)" if any_agree
                     else "accuracy was not measured: accuracy loss counts as 0 for every candidate")

    def loss(row: ResultRow) -> float:
        if use_acc:
            return ref_acc - row.accuracy
        if row.agreement is not None:
            return 1.0 - row.agreement
        return 1.0 if any_agree else 0.0  # conservative when others were measured

    def device_time(latency_ms: float | None, flops: int, overhead: float = 0.0) -> float:
        if dev.flops_per_s:
            return flops / dev.flops_per_s * 1e3 + max(0.0, overhead) / dev.speed
        return latency_ms / dev.speed

    def server_time(latency_ms: float, flops: int) -> float:
        return flops / srv.flops_per_s * 1e3 if srv.flops_per_s else latency_ms / srv.speed

    out: list[Candidate] = []

    def add(**kw) -> None:
        sent = kw["bytes_sent"]
        parts = _costs(profile, kw["server_ms"], sent) if kw["placement"] != "device" else {"compute": 0.0, "requests": 0.0, "transfer": 0.0}
        rtt = link.rtt_ms if kw["placement"] != "device" else 0.0
        transfer = sent * 8e-3 / link.uplink_mbit + rtt if kw["placement"] != "device" else 0.0
        out.append(Candidate(index=len(out), rtt_ms=rtt, transfer_ms=transfer, cost_parts=parts,
                             cost_per_million=sum(parts.values()), **kw))

    full_flops = result.model.get("flops")
    full_ms = result.model.get("latency_ms")
    if not _finite(full_ms) or not _finite(full_flops):
        last = max(result.cuts, key=lambda c: c.index) if result.cuts else None
        if last is not None:
            full_flops = full_flops if _finite(full_flops) else last.head_flops + last.tail_flops
            full_ms = full_ms if _finite(full_ms) else last.head_latency_ms + last.tail_latency_ms
            notes.append(f"the whole model's latency was not recorded; estimated as head + tail at {last.name}")
    have_full = _finite(full_ms) and _finite(full_flops)

    if dev.whole_model and have_full:
        add(placement="device", cut=None, defense=None, label="all on the device", attack=None, ssim=None, ssim_ci=None, leakage=0.0,
            metric=key, verified=True, bytes_sent=0, device_ms=device_time(full_ms, full_flops), server_ms=0.0, accuracy=ref_acc,
            agreement=1.0, utility_loss=0.0, notes=("nothing is sent, so nothing can be rebuilt from the wire",))
    elif not dev.whole_model:
        notes.append("the profile says the device cannot run the whole model: no all-on-device placement")

    short = short_defense_names(d for _, d in pairs)
    for pair in pairs:
        cut_name, defense = pair
        c = cuts[cut_name]
        verdict, urow = verdicts[pair], util_rows[pair]
        head = verdict.headline
        cnotes = list(verdict.problems)
        if head is None:
            cnotes.append("every attack failed: no conclusion about leakage")
        verified = verdict.verified and _finite(head.value(key))
        value = float(head.value(key)) if head is not None and _finite(head.value(key)) else None
        ci = None if head is None or head.value(f"{key}_ci") is None else tuple(head.value(f"{key}_ci"))
        if not verified:
            cnotes.append(f"unverified: its {info.label} is a lower bound, so it ranks and is checked as leakage 1.0")
        sent = urow.bytes_per_sample if urow.bytes_per_sample is not None else c.bytes_per_sample
        lat = urow.latency_ms if _finite(urow.latency_ms) else c.head_latency_ms + max(0.0, urow.latency_overhead_ms or 0.0)
        add(placement="split", cut=cut_name, defense=defense, label=_label(cut_name, defense, short),
            attack=None if head is None else head.attack + (" (adaptive)" if head.adaptive else ""),
            ssim=value if is_ssim else None, ssim_ci=ci if is_ssim else None, metric=key, value=value, value_ci=ci,
            leakage=value if verified else 1.0, verified=verified,
            bytes_sent=int(sent), device_ms=device_time(lat, c.head_flops, urow.latency_overhead_ms or 0.0),
            server_ms=server_time(c.tail_latency_ms, c.tail_flops), accuracy=urow.accuracy, agreement=urow.agreement,
            utility_loss=loss(urow), notes=tuple(dict.fromkeys(cnotes)), status=verdict.status)

    shape = result.data.get("shape")
    if have_full and isinstance(shape, (list, tuple)) and shape and all(isinstance(s, int) and s > 0 for s in shape):
        raw = math.prod(shape)
        what = f"{'×'.join(map(str, shape))} 8-bit pixels, uncompressed" if is_ssim else f"{'×'.join(map(str, shape))} bytes, uncompressed"
        add(placement="server", cut=None, defense=None, label="all on the server (raw input sent)", attack=None, ssim=1.0 if is_ssim else None,
            ssim_ci=None, metric=key, value=1.0, leakage=1.0, verified=True, bytes_sent=raw, device_ms=0.0,
            server_ms=server_time(full_ms, full_flops), accuracy=ref_acc, agreement=1.0, utility_loss=0.0,
            notes=(f"the raw input is sent ({what}): {info.label} 1 by definition",))
    else:
        notes.append("the input shape or the whole model's cost was not recorded: no all-on-the-server placement")
    return out, notes


# ------------------------------------------------------------------------------------------------
# Limits, recommendation, sensitivity
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limit:
    key: str  # a Constraints field
    value: float
    source: str  # default | profile | flag
    label: str | None = None  # max_ssim: the headline metric's label (SSIM, token acc.); None: SSIM


_METRIC = {  # key: (words, operator, "the best" phrase, formatter)
    "max_ssim": ("SSIM", "≤", "the least leaky has", lambda v: f"{v:.3f}"),
    "max_latency_ms": ("latency", "≤", "the fastest has", lambda v: f"{sig(v)} ms"),
    "max_cost": ("cost per million inferences", "≤", "the cheapest has", lambda v: f"{sig(v)}"),
    "min_accuracy": ("accuracy", "≥", "the most accurate has", lambda v: f"{100 * v:.1f}%"),
    "max_accuracy_drop": ("accuracy loss", "≤", "the smallest has", lambda v: f"{100 * v:.1f} points"),
}


def sig(v: float, n: int = 3) -> str:
    """``v`` to ``n`` significant digits, with thousands separators (tables and messages)."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    digits = max(0, n - 1 - int(math.floor(math.log10(abs(v)))))
    return f"{v:,.{digits}f}"


def _metric(c: Candidate, key: str, latency: float | None = None) -> float | None:
    if key == "max_ssim":
        return c.leakage
    if key == "max_latency_ms":
        return c.latency_ms if latency is None else latency
    if key == "max_cost":
        return c.cost_per_million
    if key == "min_accuracy":
        return c.accuracy
    return c.utility_loss


def _meets(c: Candidate, lim: Limit, latency: float | None = None) -> bool:
    v = _metric(c, lim.key, latency)
    if v is None:
        return False
    return v >= lim.value - 1e-12 if lim.key.startswith("min_") else v <= lim.value + 1e-12


def constraints_from_flags(**flags: float | None) -> Constraints:
    """The command line's limits (``max_ssim=0.2, ...``), each checked against its allowed range."""
    names = [f.name for f in fields(Constraints)]
    values = {}
    for k, v in flags.items():
        if k not in names:
            raise SpecError(f"unknown limit {k!r}; known: {', '.join(names)}")
        if v is None:
            continue
        if not math.isfinite(v):
            raise SpecError(f"--{k.replace('_', '-')} must be a finite number, got {v}")
        build_config(Constraints, {k: float(v)}, what=f"--{k.replace('_', '-')}")
        values[k] = float(v)
    return Constraints(**values)


def effective_limits(result: AuditResult, profile: PlanProfile, flags: Constraints) -> list[Limit]:
    """Defaults, replaced by the profile's [constraints], replaced by the command's flags. The leakage limit
    (``max_ssim``) is on the result's headline metric, and says which."""
    info = result.headline_metric
    label = None if info.name == "ssim" else info.label
    out: dict[str, Limit] = {
        "max_ssim": Limit("max_ssim", float(result.threshold), "default", label),
        "max_accuracy_drop": Limit("max_accuracy_drop", DEFAULT_MAX_ACCURACY_DROP, "default"),
    }
    for src, cons in (("profile", profile.constraints), ("flag", flags)):
        for k, v in cons.given().items():
            out[k] = Limit(k, float(v), src, label if k == "max_ssim" else None)
    return [out[f.name] for f in fields(Constraints) if f.name in out]


def _order_key(objective: str):
    def key(item: tuple[Candidate, float]):
        c, lat = item
        lead = {"latency": (lat, c.cost_per_million), "cost": (c.cost_per_million, lat), "leakage": (c.leakage, lat)}[objective]
        return (*lead, c.cost_per_million, c.leakage, c.utility_loss, c.index)

    return key


def choose(cands: Sequence[Candidate], limits: Sequence[Limit], objective: str, mbit: float | None = None) -> Candidate | None:
    """The recommended candidate (at uplink ``mbit``, default: the profile's), or None when none meets every limit."""
    lat = [c.latency_ms if mbit is None else c.latency_at(mbit) for c in cands]
    ok = [(c, l) for c, l in zip(cands, lat) if all(_meets(c, lim, l) for lim in limits)]
    return min(ok, key=_order_key(objective))[0] if ok else None


def _words(lim: Limit) -> str:
    return lim.label if lim.key == "max_ssim" and lim.label else _METRIC[lim.key][0]


def limit_text(lim: Limit) -> str:
    """A limit in words: ``SSIM ≤ 0.300`` (``token acc. ≤ 0.300`` on text)."""
    _, op, _, fmt = _METRIC[lim.key]
    return f"{_words(lim)} {op} {fmt(lim.value)}"


def explain_unmet(cands: Sequence[Candidate], limits: Sequence[Limit], currency: str = "") -> list[str]:
    """Which limit cannot be met, and by how much: alone first, then given the others."""
    lines: list[str] = []

    def best(pool, lim):
        scored = [(c, _metric(c, lim.key)) for c in pool if _metric(c, lim.key) is not None]
        if not scored:
            return None, None
        pick = max if lim.key.startswith("min_") else min
        c, v = pick(scored, key=lambda cv: (cv[1], -cv[0].index) if lim.key.startswith("min_") else (cv[1], cv[0].index))
        return c, v

    def gap(lim, v):
        _, _, _, fmt = _METRIC[lim.key]
        d = abs(v - lim.value)
        if lim.key == "max_ssim":
            return f"{d:.3f} over"
        if lim.key in ("min_accuracy", "max_accuracy_drop"):
            return f"{100 * d:.1f} points {'short' if lim.key.startswith('min_') else 'over'}"
        unit = " ms" if lim.key == "max_latency_ms" else (f" {currency}" if currency else "")
        return f"{sig(d)}{unit} over"

    def describe(c, v, lim):
        _, _, phrase, fmt = _METRIC[lim.key]
        words = _words(lim)
        extra = "" if c.verified else ", unverified"
        shown = fmt(v)
        measured = c.value if c.value is not None else c.ssim
        if lim.key == "max_ssim" and not c.verified:
            shown = f"1.000 (measured {measured:.3f} is only a lower bound)" if measured is not None else "1.000 (no conclusion)"
        return f"{phrase} {words} {shown} ({c.label}{extra}), {gap(lim, v)}"

    alone = []
    for lim in limits:
        if not any(_meets(c, lim) for c in cands):
            c, v = best(cands, lim)
            if c is None:
                alone.append(f"no candidate has {limit_text(lim)}: it was not measured")
            else:
                alone.append(f"no candidate has {limit_text(lim)}; {describe(c, v, lim)}")
    if alone:
        return alone
    lines.append("no candidate meets every limit at once (" + ", ".join(limit_text(lim) for lim in limits) + ")")
    for lim in limits:
        others = [o for o in limits if o is not lim]
        pool = [c for c in cands if all(_meets(c, o) for o in others)]
        if not pool:
            continue  # the other limits conflict among themselves: their own lines say how
        c, v = best(pool, lim)
        if c is not None and not _meets(c, lim):
            lines.append(f"with the other limits met, {describe(c, v, lim)} (limit {limit_text(lim)})")
    return lines


@dataclass(frozen=True)
class Interval:
    lo_mbit: float
    hi_mbit: float
    index: int | None  # the recommended candidate, None: no candidate meets the limits
    label: str
    current: bool = False  # holds the profile's bandwidth


def sensitivity(cands: Sequence[Candidate], limits: Sequence[Limit], objective: str, current_mbit: float,
                span: tuple[float, float] = SWEEP_RANGE_MBIT) -> list[Interval]:
    """The recommendation as the uplink bandwidth varies: a log-spaced sweep, boundaries found by bisection.

    An interval narrower than the sweep's step (about 6% at 40 points per decade) can be missed.
    """
    lo = min(span[0], current_mbit / 10)
    hi = max(span[1], current_mbit * 10)
    n = max(2, int(round(math.log10(hi / lo) * SWEEP_POINTS_PER_DECADE)) + 1)
    grid = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]

    def pick(b: float) -> int | None:
        c = choose(cands, limits, objective, b)
        return None if c is None else c.index

    picks = [pick(b) for b in grid]
    bounds: list[tuple[float, int | None]] = []  # (upper end of an interval, its pick)
    for i in range(1, n):
        if picks[i] != picks[i - 1]:
            a, b = grid[i - 1], grid[i]
            for _ in range(40):  # geometric bisection to ~1e-4 relative
                m = math.sqrt(a * b)
                if pick(m) == picks[i - 1]:
                    a = m
                else:
                    b = m
                if b / a < 1 + 1e-4:
                    break
            bounds.append((math.sqrt(a * b), picks[i - 1]))
    bounds.append((hi, picks[-1]))
    out: list[Interval] = []
    start = lo
    for end, idx in bounds:
        label = "no candidate meets the limits" if idx is None else cands[idx].label
        out.append(Interval(start, end, idx, label, current=start <= current_mbit < end or (end == hi and current_mbit == hi)))
        start = end
    return out


# ------------------------------------------------------------------------------------------------
# The plan
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    index: int | None
    text: str
    unmet: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    profile: PlanProfile
    objective: str
    limits: tuple[Limit, ...]
    candidates: tuple[Candidate, ...]
    pareto: tuple[int, ...]
    recommendation: Recommendation
    sensitivity: tuple[Interval, ...]
    notes: tuple[str, ...] = ()

    @property
    def explicit_limits(self) -> bool:
        """Whether the user set a limit (flag or profile): then an unmet plan exits 1."""
        return any(lim.source != "default" for lim in self.limits)

    @property
    def met(self) -> bool:
        return self.recommendation.index is not None

    def failed_limits(self, c: Candidate) -> list[str]:
        """The limits ``c`` misses, as text (empty: it meets every one)."""
        return [limit_text(lim) for lim in self.limits if not _meets(c, lim)]

    def to_dict(self) -> dict[str, Any]:
        cands = []
        for c in self.candidates:
            d = c.to_dict()
            d["pareto"] = c.index in self.pareto
            d["fails"] = self.failed_limits(c)
            cands.append(d)
        return {
            "schema": "splitaudit-plan/1",
            "profile": self.profile.to_dict(),
            "objective": self.objective,
            "limits": [{**asdict(lim), "text": limit_text(lim)} for lim in self.limits],
            "candidates": cands,
            "pareto": list(self.pareto),
            "recommendation": {
                "index": self.recommendation.index, "text": self.recommendation.text, "unmet": list(self.recommendation.unmet),
                "candidate": None if self.recommendation.index is None else cands[self.recommendation.index],
            },
            "sensitivity": [asdict(i) for i in self.sensitivity],
            "notes": list(self.notes),
        }


def make_plan(result: AuditResult, profile: PlanProfile, *, flags: Constraints | None = None, objective: str = "latency") -> Plan:
    """The whole plan for ``result`` under ``profile``; ``flags`` are the command line's limits."""
    if objective not in OBJECTIVES:
        raise SpecError(f"unknown objective {objective!r}; choose {', '.join(OBJECTIVES)}")
    cands, notes = candidates(result, profile)
    if not cands:
        raise DataError("the results hold no placement to plan: no cut was audited and the whole model's cost is unknown")
    limits = effective_limits(result, profile, flags or Constraints())
    front = pareto_front([(c.latency_ms, c.cost_per_million, c.leakage, c.utility_loss) for c in cands])
    pick = choose(cands, limits, objective)
    if pick is not None:
        by = {"latency": "the lowest end-to-end latency", "cost": "the lowest cost", "leakage": "the least leakage"}[objective]
        n_ok = sum(1 for c in cands if all(_meets(c, lim) for lim in limits))
        among = "the only candidate that meets " if n_ok == 1 else f"{by} among the {n_ok} candidates that meet "
        text = f"{pick.label}: {among}" + ", ".join(limit_text(lim) for lim in limits)
        rec = Recommendation(pick.index, text)
    else:
        unmet = explain_unmet(cands, limits, profile.currency)
        rec = Recommendation(None, unmet[0], tuple(unmet))
    sens = sensitivity(cands, limits, objective, profile.link.uplink_mbit)
    n_unverified = sum(1 for c in cands if not c.verified)
    if n_unverified:
        notes.append(f"{n_unverified} candidate(s) are unverified (an attack failed, did not converge, or was flagged): "
                     "they rank and are checked as leakage 1.0")
    return Plan(profile, objective, tuple(limits), tuple(cands), tuple(front), rec, tuple(sens), tuple(dict.fromkeys(notes)))


__all__ = [
    "Candidate", "Constraints", "DeviceSpec", "Interval", "Limit", "LinkSpec", "Plan", "PlanProfile", "Recommendation", "ServerSpec",
    "candidates", "choose", "constraints_from_flags", "effective_limits", "explain_unmet", "load_profile", "make_plan", "pareto_front", "parse_profile",
    "preset_names", "sensitivity",
]
