"""Static plots for the HTML report, drawn with matplotlib's Agg/SVG backends and returned as data URIs.

The plots are embedded as ``<img src="data:image/svg+xml;base64,...">`` rather than inline ``<svg>``:
an SVG shown through ``<img>`` can neither run script nor fetch anything, so names that come from the
user (cut and defense names become tick labels and legend entries) cannot turn into live markup, and
the ids matplotlib writes into each SVG cannot collide between plots. Mathtext is switched off so a
``$`` in a module name is drawn as a dollar sign instead of failing to parse.

``pareto_front`` (from :mod:`splitaudit.plan`) is the pure core of the trade-off plot and is tested on its own.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # never open a window; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

# Colour-blind-safe cycle (Okabe-Ito); "none" always gets the first colour.
PALETTE = ("#d55e00", "#0072b2", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")

_RC = {
    "text.parse_math": False,
    "svg.fonttype": "path",  # glyphs as paths: no font lookup in the viewer
    "svg.hashsalt": "splitaudit",  # deterministic ids: the same results render the same bytes
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}


# --- the pure part: defined with the planner, which ranks placements by it --------------------------
from splitaudit.plan import pareto_front  # noqa: E402,F401  (re-exported: the report's trade-off plot uses it)


# --- plot inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurvePoint:
    """One (cut, defense) headline row on the leakage curve: each panel's metric as (mean, lo, hi)."""

    cut_pos: int  # position of the cut in execution order
    values: dict[str, tuple[float, float, float]]


@dataclass(frozen=True)
class Panel:
    """One panel of the leakage curve: a metric of the modality (the headline first, with the threshold)."""

    key: str  # the row key: ssim, psnr, token_accuracy, ...
    ylabel: str
    title: str
    threshold: float | None = None  # drawn on this panel (the headline's)
    baseline: float | None = None  # the no-information guess's score
    bounded: tuple[float, float] | None = None  # the metric's range: the axis runs from min(0, the data) to its top


@dataclass(frozen=True)
class TradePoint:
    """One (cut, defense) pair on the trade-off plot."""

    label: str
    defense: str
    leakage: float  # the headline metric of the strongest attack (SSIM, token accuracy)
    utility_loss: float  # accuracy drop (or disagreement) in percentage points
    overhead_ms: float  # the defense's latency overhead on the device (batch 1); timing noise below 0 counts as 0
    pareto: bool = False


def colors_for(defenses: Sequence[str]) -> dict[str, str]:
    return {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(defenses)}


# --- rendering -------------------------------------------------------------------------------------
def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _to_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def warm_plots() -> None:
    """Draw a tiny figure and throw it away: the first SVG of a process loads fonts and fills caches."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(2, 1))
        ax.plot([0, 1], [0, 1], label="x")
        ax.set_title("x")
        ax.legend()
        _to_uri(fig)


def leakage_curve(
    cuts: Sequence[str],
    series: dict[str, list[CurvePoint]],
    *,
    panels: Sequence[Panel],
) -> str:
    """Each panel's metric by cut in execution order, one line per defense with its 95% interval band; the
    threshold on the panels that have one, the no-information baseline on each."""
    colors = colors_for(list(series))
    with plt.rc_context(_RC):
        width = min(11.0, max(7.5, 0.55 * len(cuts) * 2 + 2))
        rotate = len(cuts) > 4 or max((len(c) for c in cuts), default=0) > 10
        n_legend = len(series) + 1 + any(_finite(p.baseline) for p in panels[:1])
        legend_in = 0.25 * math.ceil(n_legend / 6)
        height = (3.5 if rotate else 3.1) + legend_in
        fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
        axes = list(axes[0])
        # Fixed margins, not a layout engine: each engine pass redraws every text, which doubles the time.
        fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.3 / height, bottom=((0.9 if rotate else 0.55) + legend_in) / height, wspace=0.22)
        x = list(range(len(cuts)))
        for defense, pts in series.items():
            pts = sorted(pts, key=lambda p: p.cut_pos)
            c = colors[defense]
            for ax, panel in zip(axes, panels):
                have = [(p.cut_pos, p.values[panel.key]) for p in pts if panel.key in p.values and _finite(p.values[panel.key][0])]
                if not have:
                    continue
                xs = [pos for pos, _ in have]
                ys, lo, hi = ([v[i] for _, v in have] for i in range(3))
                ax.plot(xs, ys, marker="o", ms=4, lw=1.6, color=c, label=defense)
                if all(_finite(v) for v in lo + hi):
                    ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
        for ax, panel in zip(axes, panels):
            if panel.threshold is not None:
                ax.axhline(panel.threshold, color="#b00020", ls="--", lw=1.2, label=f"threshold {panel.threshold:.2f}")
            if _finite(panel.baseline):
                ax.axhline(panel.baseline, color="#777777", ls=":", lw=1.2, label="no-information baseline")
            if panel.bounded is not None:
                ax.set_ylim(min(0.0, ax.get_ylim()[0]), panel.bounded[1])
            ax.set_ylabel(panel.ylabel)
            ax.set_xticks(x, [_short(c) for c in cuts], rotation=35 if rotate else 0, ha="right" if rotate else "center",
                          rotation_mode="anchor")
            ax.set_xlabel("cut, in execution order (input side → output side)")
            ax.set_xlim(-0.4, max(0.4, len(cuts) - 0.6))
            ax.set_title(panel.title, fontsize=9)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
        return _to_uri(fig)


def tradeoff(points: Sequence[TradePoint], *, threshold: float, defenses: Sequence[str], utility_label: str,
             metric_label: str = "SSIM") -> str:
    """Leakage against utility loss (left) and against the defense's latency overhead (right).

    Pareto-optimal pairs are ringed and named in both panels, so a reader can follow one pair across.
    """
    colors = colors_for(defenses)
    with plt.rc_context(_RC):
        height = 4.2
        fig, (ax_u, ax_l) = plt.subplots(1, 2, figsize=(10.0, height))
        fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.3 / height, bottom=0.85 / height, wspace=0.2)
        for d in defenses:
            pts = [p for p in points if p.defense == d and _finite(p.leakage)]
            if not pts:
                continue
            ax_u.scatter([p.utility_loss for p in pts], [p.leakage for p in pts], s=30, color=colors[d], alpha=0.85, label=d, zorder=3)
            ax_l.scatter([p.overhead_ms for p in pts], [p.leakage for p in pts], s=30, color=colors[d], alpha=0.85, zorder=3)
        front = [p for p in points if p.pareto]
        for ax, xkey in ((ax_u, "utility_loss"), (ax_l, "overhead_ms")):
            ax.axhline(threshold, color="#b00020", ls="--", lw=1.2, label=f"threshold {threshold:.2f}" if ax is ax_u else None)
            ax.scatter([getattr(p, xkey) for p in front], [p.leakage for p in front], s=130, facecolors="none", edgecolors="#111111",
                       lw=1.2, zorder=4, label="Pareto-optimal" if ax is ax_u else None)
            ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
            xs = [getattr(p, xkey) for p in points if _finite(getattr(p, xkey))]
            lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
            if hi - lo < 1e-9:
                ax.set_xlim(lo - 1, hi + 1)
            mid = (lo + hi) / 2
            for p in front:  # labels point inwards so they stay inside the axes
                x = getattr(p, xkey)
                right = x > mid and hi > lo
                ax.annotate(_short(p.label, 24), (x, p.leakage), xytext=(-7 if right else 7, 4), textcoords="offset points",
                            ha="right" if right else "left", fontsize=7, color="#333333")
            ax.set_ylabel(f"{metric_label} of the strongest attack")
        ax_u.set_xlabel(utility_label)
        ax_l.set_xlabel("defense latency overhead on the device, batch 1 (ms)")
        ax_u.set_title("leakage vs utility loss", fontsize=9)
        ax_l.set_title("leakage vs latency overhead", fontsize=9)
        handles, labels = ax_u.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
        return _to_uri(fig)


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


@dataclass(frozen=True)
class PlanPoint:
    """One placement of the deployment plan."""

    label: str
    placement: str  # split | device | server
    latency_ms: float
    cost: float  # per million inferences
    leakage: float  # what the planner ranks by: 0 nothing sent, 1 raw input or unverified
    verified: bool
    pareto: bool
    recommended: bool


def plan_front(points: Sequence[PlanPoint], *, threshold: float, currency: str, metric_label: str = "SSIM") -> str:
    """Leakage against end-to-end latency (left, log scale) and against cost (right); the front ringed, the pick starred."""
    with plt.rc_context(_RC):
        height = 4.5
        fig, (ax_l, ax_c) = plt.subplots(1, 2, figsize=(10.0, height))
        fig.subplots_adjust(left=0.07, right=0.985, top=1 - 0.3 / height, bottom=1.15 / height, wspace=0.2)
        groups = (
            ("split, verified", lambda p: p.placement == "split" and p.verified, dict(color=PALETTE[1], marker="o")),
            ("split, unverified (drawn at 1)", lambda p: p.placement == "split" and not p.verified,
             dict(facecolors="none", edgecolors=PALETTE[4], marker="o")),
            ("all on the device", lambda p: p.placement == "device", dict(color=PALETTE[2], marker="s")),
            ("all on the server", lambda p: p.placement == "server", dict(color=PALETTE[0], marker="^")),
        )
        for ax, xkey in ((ax_l, "latency_ms"), (ax_c, "cost")):
            for name, pred, style in groups:
                pts = [p for p in points if pred(p) and _finite(getattr(p, xkey))]
                if pts:
                    ax.scatter([getattr(p, xkey) for p in pts], [p.leakage for p in pts], s=30, alpha=0.85, zorder=3,
                               label=name if ax is ax_l else None, **style)
            front = sorted((p for p in points if p.pareto), key=lambda p: getattr(p, xkey))
            ax.scatter([getattr(p, xkey) for p in front], [p.leakage for p in front], s=130, facecolors="none", edgecolors="#111111",
                       lw=1.2, zorder=4, label="Pareto-optimal" if ax is ax_l else None)
            rec = [p for p in points if p.recommended]
            ax.scatter([getattr(p, xkey) for p in rec], [p.leakage for p in rec], s=220, marker="*", color="#111111", zorder=5,
                       label="recommended" if ax is ax_l else None)
            ax.axhline(threshold, color="#b00020", ls="--", lw=1.2, label=f"threshold {threshold:.2f}" if ax is ax_l else None)
            ax.set_ylim(-0.05, 1.08)
            ax.set_ylabel(f"leakage ({metric_label} of the strongest attack)")
            xs = [getattr(p, xkey) for p in points if _finite(getattr(p, xkey))]
            if xkey == "latency_ms" and xs and min(xs) > 0:
                ax.set_xscale("log")
                # Plain numbers: with mathtext off, the default log labels would print their TeX source.
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels even within one decade
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            lo, hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
            for p in front:
                x = getattr(p, xkey)
                right = (math.log(x) > (math.log(lo) + math.log(hi)) / 2) if ax.get_xscale() == "log" and hi > lo else (x > (lo + hi) / 2 and hi > lo)
                ax.annotate(_short(p.label, 26), (x, p.leakage), xytext=(-7 if right else 7, 4), textcoords="offset points",
                            ha="right" if right else "left", fontsize=7, color="#333333")
        ax_l.set_xlabel("end-to-end latency, batch 1 (ms, log scale)")
        ax_c.set_xlabel(f"cost per million inferences ({currency})")
        ax_l.set_title("leakage vs latency", fontsize=9)
        ax_c.set_title("leakage vs cost", fontsize=9)
        handles, labels = ax_l.get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
        return _to_uri(fig)
