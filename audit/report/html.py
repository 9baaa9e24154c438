"""The self-contained HTML leakage report: one file, inline CSS, images as data URIs, no script.

A privacy reviewer opens this file from disk, possibly on a machine with no network, so nothing in
it may point outside itself. Every string that comes from the user (module names, specs, file paths,
the command line) reaches the page only through jinja2 with autoescape on; this module never builds
markup by hand. The only values marked safe are the data URIs this module makes itself.

The report reads the same :class:`~splitaudit.results.AuditResult` as the console and the gate, and
renders each pair's assessment (:mod:`splitaudit.assess`): its status, words, reasons and headline row.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from splitaudit.assess import Assessment
from splitaudit.report.plots import CurvePoint, PlanPoint, TradePoint, leakage_curve, pareto_front, plan_front, tradeoff, warm_plots
from splitaudit.results import AuditResult, ResultRow, atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # one grid; a larger file is not a grid this tool wrote

DPSGD_NOTE = (
    "DP-SGD bounds what the weights reveal about the training data, not what an activation reveals "
    "about an inference input."
)


# --- view model ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One sentence of the summary: a (cut, defense) headline against the threshold."""

    cut: str
    defense: str
    undefended: bool
    text: str  # the assessment's words
    kind: str  # leak | noleak | failed | bound (no conclusion)
    ssim: float
    lo: float
    hi: float
    straddles: bool
    attack: str
    accuracy_note: str = ""
    reasons: tuple[str, ...] = ()
    identity: str = ""  # gain over the prior, re-identification and attack accuracy, in words


@dataclass(frozen=True)
class CutSummary:
    cut: str
    shape: str
    undefended: Verdict | None
    best: Verdict | None


@dataclass(frozen=True)
class Figure:
    """One image grid (one result row)."""

    defense: str
    attack: str
    headline: bool
    row: ResultRow
    uri: str | None
    missing: str | None  # why there is no image


@dataclass
class CutGrids:
    cut: str
    figures: list[Figure] = field(default_factory=list)


# --- helpers ----------------------------------------------------------------------------------------
def _num(v: Any, nd: int = 3) -> str:
    if v is None or isinstance(v, bool):
        return "n/a" if v is None else str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f):
        return "n/a"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    return f"{f:.{nd}f}"


def _kb(n: Any) -> str:
    return "n/a" if n is None else f"{n / 1024:.2f}"


def _mflops(n: Any) -> str:
    return "n/a" if n is None else f"{n / 1e6:.3f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _value(v: Any) -> str:
    """A config or environment value as one readable line."""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return "n/a" if v is None else str(v)


def _attack_name(row: ResultRow) -> str:
    return row.attack + (" (adaptive)" if row.adaptive else "")


def _kind(a: Assessment) -> str:
    if a.failed:
        return "failed"
    return {"recognizable": "leak", "no_conclusion": "bound"}.get(a.status, "noleak")


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def image_uri(base: Path | None, rel: str | None) -> tuple[str | None, str | None]:
    """(data URI, None) for a grid PNG under ``base``, or (None, the reason there is none).

    Only a PNG inside the results folder is embedded: results.json may come from someone else, and
    a crafted path must not pull an arbitrary local file into a report that gets shared.
    """
    if not rel:
        return None, "no image was saved for this row"
    if base is None:
        return None, f"image {rel} not embedded: the report was rendered without the results folder"
    try:
        root = Path(base).resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            return None, f"image {rel} not embedded: its path leaves the results folder"
        if not path.is_file():
            return None, f"image {rel} is missing"
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None, f"image {rel} not embedded: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB"
        data = path.read_bytes()
    except OSError as exc:
        return None, f"image {rel} could not be read ({exc.strerror or exc})"
    if not data.startswith(PNG_SIGNATURE):
        return None, f"image {rel} not embedded: not a PNG file"
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), None


def _verdict(result: AuditResult, a: Assessment, *, undefended: bool, ref_acc: float | None) -> Verdict:
    thr = result.threshold
    row = a.headline
    if row is None:
        nan = math.nan
        return Verdict(cut=a.cut, defense=a.defense, undefended=undefended, text=a.words, kind="failed", ssim=nan, lo=nan, hi=nan,
                       straddles=False, attack="", reasons=a.reasons)
    lo, hi = row.ssim_ci
    acc_note = ""
    if not undefended and row.accuracy is not None:
        acc_note = f"accuracy {_pct(row.accuracy)}"
        if ref_acc is not None:
            acc_note += f" ({100 * (row.accuracy - ref_acc):+.1f} points)".replace("-", "−")
    return Verdict(
        cut=row.cut, defense=row.defense, undefended=undefended, text=a.words, kind=_kind(a),
        ssim=row.ssim, lo=lo, hi=hi,
        straddles=_finite(lo) and _finite(hi) and lo <= thr < hi, attack=_attack_name(row), accuracy_note=acc_note,
        reasons=a.reasons if a.status in ("no_conclusion", "no_leakage_beyond_prior") else (), identity=_identity(row),
    )


def _identity(row: ResultRow) -> str:
    parts = []
    if row.ssim_gain is not None and row.ssim_gain_ci is not None:
        parts.append(f"SSIM gain over the no-information guess {row.ssim_gain:+.3f} [{row.ssim_gain_ci[0]:+.3f}, {row.ssim_gain_ci[1]:+.3f}]")
    if row.reid_top1 is not None and row.reid_chance:
        parts.append(f"{100 * row.reid_top1:.1f}% of the inputs re-identified among {row.n_eval} (chance {100 * row.reid_chance:.2f}%)")
    judge, chance = row.metrics.get("judge_accuracy"), row.metrics.get("attack_chance")
    if row.attack_accuracy is not None and judge is not None:
        parts.append(f"an independent classifier labels {100 * row.attack_accuracy:.1f}% of the reconstructions right "
                     f"({100 * judge:.1f}% of the originals; chance {100 * (chance or 0):.1f}%)")
    return "; ".join(parts)


def _reference_accuracy(result: AuditResult, cut: str, row: ResultRow | None = None) -> float | None:
    """Accuracy of the undefended model: the ``none`` row at this cut, else what the defense recorded."""
    ref = result.headline(cut, "none")
    if ref is not None and ref.accuracy is not None:
        return ref.accuracy
    if row is not None:
        before = row.defense_info.get("accuracy_before")
        if isinstance(before, (int, float)):
            return float(before)
    return None


def _plan_view(plan: Any, threshold: float) -> dict[str, Any] | None:
    """The planning section, from the plan stored in results.json (a dict, so tolerant of missing keys)."""
    if not isinstance(plan, dict) or not isinstance(plan.get("candidates"), list):
        return None
    cands = [c for c in plan["candidates"] if isinstance(c, dict)]
    rec = plan.get("recommendation") if isinstance(plan.get("recommendation"), dict) else {}
    rec_index = rec.get("index")
    front = {i for i in plan.get("pareto") or [] if isinstance(i, int)}
    profile = plan.get("profile") if isinstance(plan.get("profile"), dict) else {}
    currency = str(profile.get("currency") or "")

    def f(c, k):
        v = c.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan

    rows = []
    for c in cands:
        idx = c.get("index")
        if c.get("placement") == "device":
            ssim = "nothing sent"
        elif not isinstance(c.get("ssim"), (int, float)):
            ssim = "no conclusion"
        else:
            ssim = _num(c["ssim"]) + ("" if c.get("verified", True) else " (lower bound)")
        rows.append({
            "label": str(c.get("label", "")), "placement": str(c.get("placement", "split")), "ssim": ssim, "kb": _kb(c.get("bytes_sent")), "device_ms": f(c, "device_ms"),
            "transfer_ms": f(c, "transfer_ms"), "server_ms": f(c, "server_ms"), "latency_ms": f(c, "latency_ms"),
            "cost": f(c, "cost_per_million"), "loss": f(c, "utility_loss"), "accuracy": c.get("accuracy"),
            "fails": [str(x) for x in c.get("fails") or []], "pareto": idx in front, "recommended": idx is not None and idx == rec_index,
            "verified": bool(c.get("verified", True)), "notes": [str(n) for n in c.get("notes") or []],
        })
    rows.sort(key=lambda r: (not r["pareto"], r["latency_ms"] if math.isfinite(r["latency_ms"]) else math.inf))
    points = [
        PlanPoint(label=str(c.get("label", "")), placement=str(c.get("placement", "split")), latency_ms=f(c, "latency_ms"),
                  cost=f(c, "cost_per_million"), leakage=f(c, "leakage"), verified=bool(c.get("verified", True)),
                  pareto=c.get("index") in front, recommended=c.get("index") is not None and c.get("index") == rec_index)
        for c in cands
    ]
    plot = plan_front(points, threshold=threshold, currency=currency) if any(math.isfinite(p.latency_ms) for p in points) else None
    sens = []
    ivs = [i for i in plan.get("sensitivity") or [] if isinstance(i, dict)]
    for k, iv in enumerate(ivs):
        lo, hi = iv.get("lo_mbit"), iv.get("hi_mbit")
        if len(ivs) == 1:
            rng = f"{_mbit(lo)} – {_mbit(hi)} (the whole sweep)"
        elif k == 0:
            rng = f"up to {_mbit(hi)}"
        elif k == len(ivs) - 1:
            rng = f"above {_mbit(lo)}"
        else:
            rng = f"{_mbit(lo)} – {_mbit(hi)}"
        sens.append({"range": rng, "label": str(iv.get("label", "")), "current": bool(iv.get("current")), "none": iv.get("index") is None})
    return {
        "profile": profile, "device": profile.get("device") or {}, "link": profile.get("link") or {}, "server": profile.get("server") or {},
        "currency": currency, "objective": str(plan.get("objective", "latency")),
        "limits": [str(lim.get("text", "")) + f" ({lim.get('source', '')})" for lim in plan.get("limits") or [] if isinstance(lim, dict)],
        "rows": rows, "n_front": sum(1 for r in rows if r["pareto"]), "plot": plot,
        "rec_text": str(rec.get("text", "")), "rec_met": rec_index is not None, "unmet": [str(u) for u in rec.get("unmet") or []][1:],
        "rec": next((r for r in rows if r["recommended"]), None), "sensitivity": sens,
        "sweep": (_mbit(ivs[0].get("lo_mbit")), _mbit(ivs[-1].get("hi_mbit"))) if ivs else None,
        "notes": [str(n) for n in plan.get("notes") or []],
    }


def _mbit(v: Any) -> str:
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return "n/a"
    from splitaudit.plan import sig as _sig

    return _sig(float(v), 2)


def _g(v: Any) -> str:
    """A profile figure as written: ``0.02``, ``5e+07``; n/a when absent."""
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def _sig3(v: Any) -> str:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return "n/a"
    from splitaudit.plan import sig as _sig

    return _sig(float(v), 3)


# --- context ------------------------------------------------------------------------------------------
def build_context(result: AuditResult, *, base: Path | None = None) -> dict[str, Any]:
    """Everything the template shows, as plain data; the template only lays it out."""
    thr = result.threshold
    cut_names = [c.name for c in result.cuts]
    for r in result.results:  # rows for a cut the cuts list does not name still show up
        if r.cut not in cut_names:
            cut_names.append(r.cut)
    defenses = result.defenses()
    cut_info = {c.name: c for c in result.cuts}

    # 1. verdicts: each pair's assessment
    verdicts = {(a.cut, a.defense): a for a in result.assessments()}
    summaries: list[CutSummary] = []
    for cut in cut_names:
        undef = verdicts.get((cut, "none"))
        others = [a for d in defenses if d != "none" and (a := verdicts.get((cut, d))) is not None]
        # The most protective defense is picked among those the ladder concluded on; one whose adaptive
        # attack failed is never the best (it is shown only when no defense reached a conclusion).
        pool = [a for a in others if a.verified] or others
        best = min(pool, key=lambda a: (a.value if a.value is not None else math.inf,
                                        -((a.headline.accuracy if a.headline else None) or 0))) if pool else None
        info = cut_info.get(cut)
        summaries.append(
            CutSummary(
                cut=cut, shape="×".join(map(str, info.shape)) if info else "n/a",
                undefended=_verdict(result, undef, undefended=True, ref_acc=None) if undef else None,
                best=_verdict(result, best, undefended=False, ref_acc=_reference_accuracy(result, cut, best.headline)) if best else None,
            )
        )
    n_leak_undef = sum(1 for s in summaries if s.undefended and s.undefended.kind == "leak")
    n_undef = sum(1 for s in summaries if s.undefended)
    n_leak_best = sum(1 for s in summaries if s.best and s.best.kind == "leak")
    n_best = sum(1 for s in summaries if s.best)

    # 2. leakage curve: headline rows by cut position
    series: dict[str, list[CurvePoint]] = {}
    headlines: list[ResultRow] = []
    for d in defenses:
        for pos, cut in enumerate(cut_names):
            h = result.headline(cut, d)
            if h is None:
                continue
            headlines.append(h)
            series.setdefault(d, []).append(CurvePoint(pos, h.ssim, *h.ssim_ci, h.psnr, *h.psnr_ci))
    base_ssim = next((r.baseline_ssim for r in result.results if _finite(r.baseline_ssim)), None)
    base_psnr = next((r.baseline_psnr for r in result.results if _finite(r.baseline_psnr)), None)
    curve_uri = leakage_curve(cut_names, series, threshold=thr, baseline_ssim=base_ssim, baseline_psnr=base_psnr) if series else None

    # 3. trade-off: headline rows; utility loss = accuracy drop, or disagreement without labels
    use_acc = all(h.accuracy is not None and _reference_accuracy(result, h.cut, h) is not None for h in headlines)
    trade: list[TradePoint] = []
    for h in headlines:
        if use_acc:
            loss = 100 * (_reference_accuracy(result, h.cut, h) - h.accuracy)
        else:
            loss = 100 * (1 - h.agreement) if h.agreement is not None else math.nan
        if h.defense == "none":
            over = 0.0
        elif h.latency_overhead_ms is None:
            over = math.nan
        else:
            over = max(0.0, h.latency_overhead_ms)  # below zero is timing noise
        trade.append(TradePoint(label=f"{h.cut} / {h.defense}", defense=h.defense, ssim=h.ssim, utility_loss=loss, overhead_ms=over))
    # What a (cut, defense) pair costs beyond the split itself: leakage, utility, device time.
    front = set(pareto_front([(p.ssim, p.utility_loss, p.overhead_ms) for p in trade]))
    trade = [TradePoint(**{**p.__dict__, "pareto": i in front}) for i, p in enumerate(trade)]
    utility_label = "accuracy drop vs the undefended model (points)" if use_acc else "predictions changed vs the undefended model (%)"
    trade_uri = tradeoff(trade, threshold=thr, defenses=defenses, utility_label=utility_label) if trade else None
    pareto_rows = [(p, h) for p, h in zip(trade, headlines) if p.pareto]

    # 4. image grids: every row, the headline first
    grids: list[CutGrids] = []
    for cut in cut_names:
        g = CutGrids(cut)
        for d in defenses:
            h = result.headline(cut, d)
            rows = sorted(result.rows(cut=cut, defense=d), key=lambda r: (r is not h, r.attack, r.adaptive))
            for r in rows:
                uri, missing = image_uri(base, r.images)
                g.figures.append(Figure(defense=d, attack=_attack_name(r), headline=r is h, row=r, uri=uri, missing=missing))
        if g.figures:
            grids.append(g)

    # 5. cost table: one block per cut, one line per defense
    costs = []
    for cut in cut_names:
        info = cut_info.get(cut)
        lines = [(d, h) for d in defenses if (h := result.headline(cut, d)) is not None]
        costs.append({"cut": cut, "info": info, "lines": lines})

    # 6. caveats
    gaps = []
    for cut in cut_names:
        for d in defenses:
            if d == "none":
                continue
            rows = result.rows(cut=cut, defense=d)
            for attack in dict.fromkeys(r.attack for r in rows):
                ad = [r for r in rows if r.attack == attack and r.adaptive and r.status != "failed"]
                na = [r for r in rows if r.attack == attack and not r.adaptive and r.status != "failed"]
                if ad and na:
                    gaps.append({"cut": cut, "defense": d, "attack": attack, "plain": na[0].ssim, "adaptive": ad[0].ssim,
                                 "gap": ad[0].ssim - na[0].ssim})
    dp = []
    for d in defenses:
        r = next((r for r in result.rows(defense=d) if r.defense.split(":")[0] == "dpsgd" or r.epsilon is not None), None)
        if r is None:
            continue
        info = r.defense_info
        dp.append({
            "defense": d, "epsilon": r.epsilon if r.epsilon is not None else info.get("epsilon"),
            "delta": r.delta if r.delta is not None else info.get("delta"),
            "before": info.get("accuracy_before"), "after": info.get("accuracy_after"),
            "layers": info.get("changed_layers"), "note": info.get("note") or DPSGD_NOTE,
        })
    flags = [{"row": r, "flag": f} for r in result.results for f in r.flags]
    row_notes = list(dict.fromkeys(f"{r.cut} / {r.defense} / {_attack_name(r)}: {n}" for r in result.results for n in r.notes))
    failed = [r for r in result.results if r.status == "failed"]
    negative_overheads = sorted({r.defense for r in result.results if r.latency_overhead_ms is not None and r.latency_overhead_ms < 0})
    attacks = list(dict.fromkeys(r.attack for r in result.results)) or list(result.config.get("attacks", []))
    any_adaptive = any(r.adaptive for r in result.results)
    nonadaptive_only = [
        (c, d) for c in cut_names for d in defenses
        if d != "none" and result.rows(cut=c, defense=d) and not any(r.adaptive for r in result.rows(cut=c, defense=d))
    ]

    # 7. reproducibility
    cfg = dict(result.config)
    command = cfg.pop("command", None)
    if isinstance(command, (list, tuple)):
        import shlex

        command = shlex.join(str(a) for a in command)
    repro_run = [("created", result.created), ("seed", result.seed), ("threshold (SSIM)", _num(thr, 2))]
    repro_run += [(k, _value(v)) for k, v in cfg.items() if k != "threshold"]

    return {
        "r": result,
        "kind_of": lambda row: _kind(verdicts[(row.cut, row.defense)]),
        "words_of": lambda row: verdicts[(row.cut, row.defense)].words,
        "plan": _plan_view(result.plan, thr),
        "threshold": thr,
        "cut_names": cut_names,
        "defenses": defenses,
        "summaries": summaries,
        "counts": {"leak_undef": n_leak_undef, "undef": n_undef, "leak_best": n_leak_best, "best": n_best},
        "curve_uri": curve_uri,
        "trade_uri": trade_uri,
        "pareto_rows": pareto_rows,
        "cut_ms": {c: (cut_info[c].head_latency_ms if c in cut_info else None) for c in cut_names},
        "cut_bytes": {c: (cut_info[c].bytes_per_sample if c in cut_info else None) for c in cut_names},
        "utility_label": utility_label,
        "use_acc": use_acc,
        "base_ssim": base_ssim,
        "base_psnr": base_psnr,
        "grids": grids,
        "costs": costs,
        "gaps": gaps,
        "dp": dp,
        "flags": flags,
        "row_notes": row_notes,
        "failed": failed,
        "negative_overheads": negative_overheads,
        "attacks": attacks,
        "any_adaptive": any_adaptive,
        "nonadaptive_only": nonadaptive_only,
        "n_eval": next((r.n_eval for r in result.results), result.data.get("n_eval")),
        "command": command,
        "repro_run": repro_run,
        "repro_model": [(k, _value(v)) for k, v in result.model.items()],
        "repro_data": [(k, _value(v)) for k, v in result.data.items()],
        "repro_env": [(k, _value(v)) for k, v in result.environment.items()],
    }


# --- rendering ------------------------------------------------------------------------------------------
def _environment(threshold: float) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template, whatever its name: names from the user are never markup
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, kb=_kb, mflops=_mflops, pct=_pct, sig=_sig3, g=_g)
    env.tests["finite"] = _finite
    return env


@functools.lru_cache(maxsize=8)
def template(threshold: float) -> jinja2.Template:
    """The report's template, compiled once per process and threshold (compiling takes 0.25 s; an
    audit compiles it on a background thread while its workers train)."""
    return _environment(threshold).get_template("report.html")


def warm(threshold: float) -> None:
    """Do now what the first report of a process pays for (compiling the template, loading the
    plots' fonts): an audit calls this on a background thread while its workers train, which takes
    0.5 s off the report written after them."""
    template(threshold)
    warm_plots()


def render_report(result: AuditResult, *, base: Path | None = None) -> str:
    """The report as one HTML string. ``base`` is the folder of results.json (image paths resolve there)."""
    return template(result.threshold).render(**build_context(result, base=Path(base) if base is not None else None))


def write_report(result: AuditResult, path: Path, *, base: Path | None = None) -> Path:
    atomic_write_text(Path(path), render_report(result, base=base))
    return Path(path)
