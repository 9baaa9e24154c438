"""The self-contained HTML leakage report: one file, inline CSS, images as data URIs, no script.

A privacy reviewer opens this file from disk, possibly on a machine with no network, so nothing in
it may point outside itself. Every string that comes from the user (module names, specs, file paths,
the command line) reaches the page only through jinja2 with autoescape on. The only markup that does not
go through autoescape is the text modality's example tables (HTML fragments the audit wrote beside
results.json, already escaped): :func:`fragment_html` rebuilds each one from a short list of tags (table
rows and cells, ``span``) with nothing but a ``class`` attribute, and escapes every text it holds once, so
a fragment from someone else's results folder cannot bring a script or a link into the page.

The report reads the same :class:`~splitaudit.results.AuditResult` as the console and the gate, and
renders each pair's assessment (:mod:`splitaudit.assess`): its status, words, reasons and headline row.
Metric names, labels and digits come from the result's modality (SSIM for images, token accuracy for
text).
"""

from __future__ import annotations

import base64
import functools
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from html.parser import HTMLParser
from typing import Any

import jinja2
from markupsafe import Markup

from splitaudit.assess import Assessment
from splitaudit.ledger import budget_lines
from splitaudit.report.plots import CurvePoint, Panel, PlanPoint, TradePoint, leakage_curve, pareto_front, plan_front, tradeoff, warm_plots
from splitaudit.results import AuditResult, ResultRow, atomic_write_text

TEMPLATES = Path(__file__).parent / "templates"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_IMAGE_BYTES = 4 * 1024 * 1024  # one grid; a larger file is not a grid this tool wrote
FRAGMENT_TAGS = frozenset({"table", "thead", "tbody", "tr", "th", "td", "span", "br"})  # what an examples table may hold
_CLASS = re.compile(r"[A-Za-z0-9_ -]{1,80}")
# The no-information guess, and what the samples are, in words; a modality without an entry gets the generic ones.
PRIOR_WORDS = {"image": "the mean auxiliary image", "text": "the most frequent auxiliary token at each position"}
SAMPLE_NOUNS = {"image": "images", "text": "texts"}

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
    value: float  # the headline metric (SSIM, token accuracy) of the strongest attack
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
    """One row's examples: an image grid (a data URI) or a text table (a rebuilt fragment)."""

    defense: str
    attack: str
    headline: bool
    row: ResultRow
    uri: str | None
    missing: str | None  # why there is no image
    fragment: Markup | None = None  # text: the examples table, rebuilt by fragment_html
    numbers: str = ""  # the row's metrics, in words for the title


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
    data, why = _read_saved(base, rel, "image", "its")
    if data is None:
        return None, why
    if not data.startswith(PNG_SIGNATURE):
        return None, f"image {rel} not embedded: not a PNG file"
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), None


class _Rebuild(HTMLParser):
    """An examples fragment rebuilt from :data:`FRAGMENT_TAGS` with only a ``class`` attribute: every other
    tag is dropped (the content of ``script`` and ``style`` with it), every text escaped once."""

    def __init__(self):
        super().__init__(convert_charrefs=True)  # text arrives unescaped (&lt; is <), so escaping it once keeps it as written
        self.out: list[str] = []
        self.open: list[str] = []
        self.drop = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.drop += 1
            return
        if tag not in FRAGMENT_TAGS or self.drop:
            return
        cls = next((v for k, v in attrs if k == "class" and v), None)
        attr = f' class="{cls}"' if cls is not None and _CLASS.fullmatch(cls) else ""
        self.out.append(f"<{tag}{attr}>")
        if tag != "br":
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag in self.open and self.open[-1] == tag:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.drop = max(0, self.drop - 1)
            return
        if tag in self.open:
            while self.open:
                t = self.open.pop()
                self.out.append(f"</{t}>")
                if t == tag:
                    break

    def handle_data(self, data):
        if not self.drop:
            self.out.append(html.escape(data, quote=False))

    def result(self) -> str:
        self.close()
        return "".join(self.out) + "".join(f"</{t}>" for t in reversed(self.open))


def sanitize_fragment(text: str) -> Markup:
    """``text`` (an examples table, escaped) as markup the page can hold: the same table, nothing else."""
    p = _Rebuild()
    p.feed(text)
    return Markup(p.result())


def _read_saved(base: Path | None, rel: str, noun: str, its: str) -> tuple[bytes | None, str | None]:
    """The bytes of a file the writer saved beside results.json (``rel`` under ``base``), or (None, why not):
    only a file inside the results folder, of bounded size, is read."""
    if base is None:
        return None, f"{noun} {rel} not embedded: the report was rendered without the results folder"
    are = "are" if noun == "examples" else "is"
    try:
        root = Path(base).resolve()
        path = (root / rel).resolve()
        if not path.is_relative_to(root):
            return None, f"{noun} {rel} not embedded: {its} path leaves the results folder"
        if not path.is_file():
            return None, f"{noun} {rel} {are} missing"
        if path.stat().st_size > MAX_IMAGE_BYTES:
            return None, f"{noun} {rel} not embedded: larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB"
        return path.read_bytes(), None
    except OSError as exc:
        return None, f"{noun} {rel} could not be read ({exc.strerror or exc})"


def fragment_html(base: Path | None, rel: str | None) -> tuple[Markup | None, str | None]:
    """(the rebuilt table, None) for a text examples fragment under ``base``, or (None, the reason there is
    none). The same rules as :func:`image_uri`: only a file inside the results folder, of bounded size."""
    if not rel:
        return None, "no examples were saved for this row"
    data, why = _read_saved(base, rel, "examples", "their")
    if data is None:
        return None, why
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None, f"examples {rel} not embedded: not UTF-8 text"
    if "<table" not in text.lower():
        return None, f"examples {rel} not embedded: not an examples table"
    return sanitize_fragment(text), None


def _examples(base: Path | None, rel: str | None) -> tuple[str | None, Markup | None, str | None]:
    """(image URI, text fragment, why neither) for a row's examples, by the file's kind."""
    if rel and rel.lower().endswith((".html", ".htm")):
        frag, missing = fragment_html(base, rel)
        return None, frag, missing
    uri, missing = image_uri(base, rel)
    return uri, None, missing


def _lead(row: ResultRow | None, key: str) -> tuple[float, float, float]:
    """(mean, lo, hi) of metric ``key`` in ``row``; NaN where absent."""
    nan = math.nan
    if row is None:
        return nan, nan, nan
    v, ci = row.value(key), row.value(f"{key}_ci")
    v = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else nan
    if ci is None or len(ci) != 2:
        return v, nan, nan
    lo, hi = (float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else nan for c in ci)
    return v, lo, hi


def _numbers(row: ResultRow, modality) -> str:
    """Every metric of the modality for one row, in words: the headline with its interval."""
    parts = []
    for m in modality.metrics:
        v, lo, hi = _lead(row, m.name)
        text = f"{m.label} {_num(v, m.digits)}"
        if m.name == modality.headline and _finite(lo) and _finite(hi):
            text += f" [{_num(lo, m.digits)}, {_num(hi, m.digits)}]"
        parts.append(text)
    return " · ".join(parts)


def _verdict(result: AuditResult, a: Assessment, *, undefended: bool, ref_acc: float | None) -> Verdict:
    thr = result.threshold
    row = a.headline
    if row is None:
        nan = math.nan
        return Verdict(cut=a.cut, defense=a.defense, undefended=undefended, text=a.words, kind="failed", value=nan, lo=nan, hi=nan,
                       straddles=False, attack="", reasons=a.reasons)
    value, lo, hi = _lead(row, a.metric)
    acc_note = ""
    if not undefended and row.accuracy is not None:
        acc_note = f"accuracy {_pct(row.accuracy)}"
        if ref_acc is not None:
            acc_note += f" ({100 * (row.accuracy - ref_acc):+.1f} points)".replace("-", "−")
    return Verdict(
        cut=row.cut, defense=row.defense, undefended=undefended, text=a.words, kind=_kind(a),
        value=value, lo=lo, hi=hi,
        straddles=_finite(lo) and _finite(hi) and lo <= thr < hi, attack=_attack_name(row), accuracy_note=acc_note,
        reasons=a.reasons if a.status in ("no_conclusion", "no_leakage_beyond_prior") else (),
        identity=_identity(row, result.headline_metric),
    )


def _identity(row: ResultRow, info=None) -> str:
    key, label, nd = (info.name, info.label, info.digits) if info is not None else ("ssim", "SSIM", 3)
    parts = []
    gain, (_, glo, ghi) = row.value(f"{key}_gain"), _lead(row, f"{key}_gain")
    if isinstance(gain, (int, float)) and _finite(glo) and _finite(ghi):
        parts.append(f"{label} gain over the no-information guess {gain:+.{nd}f} [{glo:+.{nd}f}, {ghi:+.{nd}f}]")
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


def _plan_view(plan: Any, threshold: float, metric_label: str = "SSIM") -> dict[str, Any] | None:
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
        measured = c.get("value", c.get("ssim"))  # the headline metric; plans written before text named it ssim
        if c.get("placement") == "device":
            leak = "nothing sent"
        elif not isinstance(measured, (int, float)) or isinstance(measured, bool):
            leak = "no conclusion"
        else:
            leak = _num(measured) + ("" if c.get("verified", True) else " (lower bound)")
        rows.append({
            "label": str(c.get("label", "")), "placement": str(c.get("placement", "split")), "value": leak, "kb": _kb(c.get("bytes_sent")), "device_ms": f(c, "device_ms"),
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
    plot = plan_front(points, threshold=threshold, currency=currency, metric_label=metric_label) if any(math.isfinite(p.latency_ms) for p in points) else None
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


def _fisher_view(result: AuditResult, cut_names: list[str], defenses: list[str]) -> list[dict[str, Any]]:
    """One line per (cut, noise defense) with a dFIL reference (:mod:`splitaudit.dfil`): the bound on an unbiased
    attacker's MSE next to the lowest MSE an attack reached there and the no-information guess's. Informational:
    no verdict reads it."""
    out = []
    for cut in cut_names:
        for d in defenses:
            rows = result.rows(cut=cut, defense=d)
            ref = next((r for r in rows if _finite(r.dfil)), None)
            if ref is None:
                continue
            scored = [r for r in rows if r.status != "failed" and _finite(r.mse)]
            best = min(scored, key=lambda r: r.mse) if scored else None
            crb = ref.crb_mse if _finite(ref.crb_mse) else math.nan
            out.append({
                "cut": cut, "defense": d, "noise_std": ref.defense_info.get("noise_std"), "dfil": ref.dfil, "dfil_se": ref.dfil_se,
                "crb": crb, "mse": best.mse if best else math.nan, "attack": _attack_name(best) if best else "n/a",
                "baseline": ref.baseline_mse if _finite(ref.baseline_mse) else math.nan,
                "below": best is not None and math.isfinite(crb) and best.mse < crb,
            })
    return out


# --- context ------------------------------------------------------------------------------------------
def build_context(result: AuditResult, *, base: Path | None = None) -> dict[str, Any]:
    """Everything the template shows, as plain data; the template only lays it out."""
    thr = result.threshold
    modality = result.modality
    hm = modality.metric(modality.headline)  # what verdicts, plots and rankings rest on
    lead = hm.name
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

    # 2. leakage curve: headline rows by cut position; one panel for the headline metric (with the threshold)
    # and one for the modality's next metric (PSNR for images, ROUGE-L for text)
    curve_metrics = [hm] + [m for m in modality.metrics if m.name != lead][:1]

    def baseline(key: str) -> float | None:
        return next((float(v) for r in result.results if _finite(v := r.value(f"baseline_{key}"))), None)

    series: dict[str, list[CurvePoint]] = {}
    headlines: list[ResultRow] = []
    for d in defenses:
        for pos, cut in enumerate(cut_names):
            h = result.headline(cut, d)
            if h is None:
                continue
            headlines.append(h)
            series.setdefault(d, []).append(CurvePoint(pos, {m.name: _lead(h, m.name) for m in curve_metrics}))
    base_values = [baseline(m.name) for m in curve_metrics]
    panels = [
        Panel(m.name, f"{m.label} (higher = more recovered)", f"{m.label} by cut, mean and 95% interval",
              threshold=thr if m.name == lead else None, baseline=b, bounded=m.range)
        for m, b in zip(curve_metrics, base_values)
    ]
    curve_uri = leakage_curve(cut_names, series, panels=panels) if series else None
    base_lead = base_values[0]
    second = {"label": curve_metrics[1].label, "digits": curve_metrics[1].digits, "base": base_values[1]} if len(curve_metrics) > 1 else None

    # 2b. metrics split by kind (text: PII recovery by kind of span), headline rows only
    by_kind = []
    for m in modality.metrics:
        key = f"{m.name}_by_kind"
        lines = [(h, h.value(key)) for h in headlines if isinstance(h.value(key), dict) and h.value(key)]
        if not lines:
            continue
        kinds = list(dict.fromkeys(k for _, d in lines for k in d))
        table = []
        for h, d in lines:
            cells = []
            for k in kinds:
                e = d.get(k)
                if isinstance(e, dict) and _finite(e.get("mean")):
                    ci = e.get("ci") or [None, None]
                    cells.append(_num(e["mean"], m.digits) + (f" [{_num(ci[0], m.digits)}, {_num(ci[1], m.digits)}]" if len(ci) == 2 and
                                                              all(_finite(c) for c in ci) else ""))
                else:
                    cells.append("n/a")
            table.append({"cut": h.cut, "defense": h.defense, "attack": _attack_name(h), "cells": cells})
        by_kind.append({"label": m.label, "kinds": [str(k) for k in kinds], "rows": table})

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
        trade.append(TradePoint(label=f"{h.cut} / {h.defense}", defense=h.defense, leakage=_lead(h, lead)[0], utility_loss=loss,
                                overhead_ms=over))
    # What a (cut, defense) pair costs beyond the split itself: leakage, utility, device time.
    front = set(pareto_front([(p.leakage, p.utility_loss, p.overhead_ms) for p in trade]))
    trade = [TradePoint(**{**p.__dict__, "pareto": i in front}) for i, p in enumerate(trade)]
    utility_label = "accuracy drop vs the undefended model (points)" if use_acc else "predictions changed vs the undefended model (%)"
    trade_uri = tradeoff(trade, threshold=thr, defenses=defenses, utility_label=utility_label, metric_label=hm.label) if trade else None
    pareto_rows = [(p, h) for p, h in zip(trade, headlines) if p.pareto]

    # 4. examples: every row, the headline first (image grids, or text tables)
    grids: list[CutGrids] = []
    for cut in cut_names:
        g = CutGrids(cut)
        for d in defenses:
            h = result.headline(cut, d)
            rows = sorted(result.rows(cut=cut, defense=d), key=lambda r: (r is not h, r.attack, r.adaptive))
            for r in rows:
                uri, frag, missing = _examples(base, r.images)
                g.figures.append(Figure(defense=d, attack=_attack_name(r), headline=r is h, row=r, uri=uri, missing=missing, fragment=frag,
                                        numbers=_numbers(r, modality)))
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
                    plain, adaptive = _lead(na[0], lead)[0], _lead(ad[0], lead)[0]
                    gaps.append({"cut": cut, "defense": d, "attack": attack, "plain": plain, "adaptive": adaptive, "gap": adaptive - plain})
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
    fisher = _fisher_view(result, cut_names, defenses)
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
    repro_run = [("created", result.created), ("seed", result.seed), ("modality", modality.name), (f"threshold ({hm.label})", _num(thr, 2))]
    repro_run += [(k, _value(v)) for k, v in cfg.items() if k not in ("threshold", "budget")]
    repro_run += [("training budget", line) for line in budget_lines(result.config)]  # the ledger itself is in results.json

    def lead_text(row: ResultRow) -> str:
        v, lo, hi = _lead(row, lead)
        return _num(v, hm.digits) + (f" [{_num(lo, hm.digits)}, {_num(hi, hm.digits)}]" if _finite(lo) and _finite(hi) else "")

    return {
        "r": result,
        "kind_of": lambda row: _kind(verdicts[(row.cut, row.defense)]),
        "words_of": lambda row: verdicts[(row.cut, row.defense)].words,
        "lead_of": lambda row: _lead(row, lead)[0],
        "lead_text": lead_text,
        "label": hm.label,
        "nd": hm.digits,
        "modality": modality.name,
        "examples_format": modality.examples_format,
        "prior_words": PRIOR_WORDS.get(modality.name, "the no-information guess"),
        "samples": SAMPLE_NOUNS.get(modality.name, "samples"),
        "threshold_origin": "He et al. 2019’s level, configurable" if lead == "ssim" else "configurable",
        "second": second,
        "by_kind": by_kind,
        "plan": _plan_view(result.plan, thr, hm.label),
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
        "base_lead": base_lead,
        "grids": grids,
        "costs": costs,
        "gaps": gaps,
        "dp": dp,
        "fisher": fisher,
        "fisher_how": result.config.get("dfil") if isinstance(result.config.get("dfil"), dict) else {},
        "flags": flags,
        "row_notes": row_notes,
        "budget": budget_lines(result.config),
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
