"""The terminal views: the cuts table and the final audit table (rich)."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from splitaudit.results import AuditResult


STYLE = {"recognizable": "red", "no_leakage_beyond_prior": "green", "not_recognizable": "green", "no_conclusion": "yellow"}


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.2f}"


def cuts_table(rows: list[dict], *, title: str = "candidate cuts", compact: bool = False) -> Table:
    """The candidate cuts. ``compact`` (a narrow terminal) leaves out the module type and the fp16/int8
    sizes, which ``--json`` still has."""
    t = Table(title=title)
    cols = ("#", "cut", "module", "shape", "KB/sample f32", "fp16", "int8", "head MFLOPs", "head ms (b=1)", "tail MFLOPs", "tail ms (b=1)")
    keep = [c for c in cols if not (compact and c in ("module", "fp16", "int8"))]
    for col in keep:
        t.add_column(col, justify="right" if col not in ("cut", "module", "shape") else "left", overflow="fold")
    for r in rows:
        cells = dict(zip(cols, (
            str(r["index"]), r["name"] + (f" (= {', '.join(r['aliases'])})" if r.get("aliases") else ""), r["module_type"],
            "×".join(map(str, r["shape"])), _kb(r["bytes_per_sample"]), _kb(r["bytes_fp16"]), _kb(r["bytes_int8"]),
            f"{r['head_flops'] / 1e6:.3f}", f"{r['head_latency_ms']:.3f}",
            "-" if r.get("tail_flops") is None else f"{r['tail_flops'] / 1e6:.3f}",
            "-" if r.get("tail_latency_ms") is None else f"{r['tail_latency_ms']:.3f}",
        )))
        t.add_row(*(cells[c] for c in keep))
    return t


SHORT = {"recognizable": "recognizable", "no_leakage_beyond_prior": "prior only", "not_recognizable": "not recognizable",
         "no_conclusion": "no conclusion"}


def _fmt(v, nd: int, signed: bool = False) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "-"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def metric_columns(modality) -> list[tuple[str, str]]:
    """The metric columns of the audit table for ``modality``: (header, row key).

    The headline metric (SSIM, token accuracy), its gain over the no-information guess and the no-information
    guess's own score of it ("prior"); then the modality's other bounded metrics (ROUGE-L, PII recovery:
    shares, which fit a narrow column; an unbounded one such as PSNR in dB is in the report)."""
    head = modality.metric(modality.headline)
    cols = [(head.label, head.name), ("gain", f"{head.name}_gain"), ("prior", f"baseline_{head.name}")]
    cols += [(m.label, m.name) for m in modality.metrics if m.name != head.name and m.range is not None]
    return cols


def audit_table(result: AuditResult, width: int = 80) -> Table:
    """One line per (cut, defense): its assessment, and the numbers of the headline row it rests on (the
    strongest attack). Columns are dropped, never wrapped or cut, to fit ``width`` (80 in a CI log): the
    details (every attack, the reasons) are in the report and results.json. Defense specs are shortened
    to their first parameter where that still tells them apart, so no two lines read alike. The metric
    columns are the modality's (:func:`metric_columns`)."""
    from splitaudit.plan import short_defense_names

    modality = result.modality
    head_info = modality.metric(modality.headline)
    digits = {m.name: m.digits for m in modality.metrics}
    mcols = metric_columns(modality)
    short = short_defense_names(result.defenses())
    info = {c.name: c for c in result.cuts}
    lines, last = [], None
    for a in result.assessments():
        h, c = a.headline, info.get(a.cut)
        style = "red" if a.failed else STYLE[a.status]
        word = "ALL FAILED" if a.failed else SHORT[a.status]
        cells = {"cut": a.cut if a.cut != last else "", "defense": short.get(a.defense, a.defense), "verdict": (word, style)}
        last = a.cut
        if h is not None:
            ci = h.value(f"{head_info.name}_ci")
            half = (ci[1] - ci[0]) / 2 if ci is not None and all(isinstance(v, (int, float)) and math.isfinite(v) for v in ci) else math.nan
            kb = h.bytes_per_sample if h.bytes_per_sample is not None else (c.bytes_per_sample if c else None)
            for header, key in mcols:
                base = key.removeprefix("baseline_").removesuffix("_gain")
                cells[header] = _fmt(h.value(key), digits.get(base, 3), signed=key.endswith("_gain"))
            cells.update({
                "±": "-" if math.isnan(half) else f"{half:.{head_info.digits}f}",
                "re-id": "-" if h.reid_top1 is None else f"{100 * h.reid_top1:.1f}%",
                "acc": "-" if h.accuracy is None else f"{h.accuracy:.3f}", "KB": _kb(kb),
                "attack": h.attack + (" adaptive" if h.adaptive else ""),
            })
        lines.append(cells)
    names = [header for header, _ in mcols]  # headline, gain, prior, the other metrics
    # in order of importance: the verdict; the headline, its gain, identity and the prior; the other metrics; utility; the rest
    order = ["cut", "defense", "verdict", *names[:2], "re-id", names[2], *names[3:], "acc", "±", "KB", "attack"]
    shown = ["cut", "defense", "verdict", names[0], names[2], names[1], *names[3:], "re-id", "acc", "±", "KB", "attack"]

    def w(col):  # the column's width: its longest cell or its header
        return max([len(col)] + [len(x[0] if isinstance(x, tuple) else x) for ln in lines if (x := ln.get(col, "-"))])

    keep = []
    for col in order:  # in order of importance, while they fit (a column and its separator)
        if sum(w(k) + 2 for k in keep) + w(col) <= width or col in ("cut", "defense", "verdict"):
            keep.append(col)
    keep = [col for col in shown if col in keep]
    t = Table(title=f"leakage by cut ({head_info.label} threshold {result.threshold:g}; gain over the no-information guess)",
              title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0), show_edge=False, collapse_padding=True)
    for col in keep:
        t.add_column(col, justify="left" if col in ("cut", "defense", "verdict", "attack") else "right", no_wrap=True, min_width=w(col))
    for ln in lines:
        row = []
        for col in keep:
            v = ln.get(col, "-")
            row.append(f"[{v[1]}]{v[0]}[/{v[1]}]" if isinstance(v, tuple) else v)
        t.add_row(*row)
    return t


def print_audit(result: AuditResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(audit_table(result, width=console.width))
    counts: dict[str, int] = {}
    for a in result.assessments():
        counts[a.status] = counts.get(a.status, 0) + 1
    line = "verdicts: " + ", ".join(f"{n} {SHORT[k].lower()}" for k, n in counts.items())
    chance = next((r.reid_chance for r in result.results if r.reid_chance), None)
    if chance:
        line += f". re-id: the share of inputs a reconstruction picks out of the evaluation set (chance {100 * chance:.2f}%)"
    console.print(line, markup=False, highlight=False, soft_wrap=True)
    from splitaudit.ledger import budget_lines

    for text in budget_lines(result.config):  # where each learned attack's training budget went
        console.print(f"training budget, {text}", markup=False, highlight=False, soft_wrap=True)
    for a in result.assessments():
        if a.status == "no_conclusion":
            console.print(f"no conclusion at {a.cut} / {a.defense}: {a.reasons[0]}", style="yellow", markup=False, highlight=False,
                          soft_wrap=True)
    for w in result.data.get("warnings", []) or []:
        console.print(f"warning: {w}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    for n in result.notes:
        console.print(f"note: {n}", style="yellow", markup=False, highlight=False, soft_wrap=True)


# --- the plan ------------------------------------------------------------------------------------------
def _sig(v: float | None, n: int = 3) -> str:
    from splitaudit.plan import sig

    return "-" if v is None else sig(v, n)


def _mbit(v: float) -> str:
    return _sig(v, 2)


def plan_header(plan) -> list[str]:
    p = plan.profile
    d, link, s = p.device, p.link, p.server
    dev = f"device ×{d.speed:g} the audit machine" + (f", {d.flops_per_s:.3g} FLOP/s for compute" if d.flops_per_s else "")
    srv = f"server ×{s.speed:g}" + (f", {s.flops_per_s:.3g} FLOP/s" if s.flops_per_s else "")
    prices = [f"{s.price_per_s:.3g} {p.currency}/s" if s.price_per_s else "", f"{s.price_per_request:.3g} {p.currency}/request" if s.price_per_request else "",
              f"egress {s.egress_per_gb:g} {p.currency}/GB" if s.egress_per_gb else "", f"ingress {s.ingress_per_gb:g} {p.currency}/GB" if s.ingress_per_gb else "",
              f"link {link.price_per_gb:g} {p.currency}/GB" if link.price_per_gb else ""]
    lines = [
        f"profile {p.name} ({p.source})" + (f": {p.description}" if p.description else ""),
        f"  {dev} · uplink {_mbit(link.uplink_mbit)} Mbit/s, RTT {link.rtt_ms:g} ms · {srv}"
        + (" · " + ", ".join(x for x in prices if x) if any(prices) else " · no prices"),
        "  limits: " + ", ".join(f"{_limit(lim)} ({lim.source})" for lim in plan.limits) + f" · objective: lowest {plan.objective}",
    ]
    return lines


def _leak_label(plan) -> str:
    """The label of the leakage metric the plan ranks by (SSIM, token acc.): its max_ssim limit says."""
    return next((lim.label for lim in plan.limits if lim.key == "max_ssim" and lim.label), "SSIM")


def _limit(lim) -> str:
    from splitaudit.plan import limit_text

    return limit_text(lim)


def plan_table(plan, *, show_all: bool = False) -> Table:
    rec = plan.recommendation.index
    front = set(plan.pareto)
    shown = [c for c in plan.candidates if show_all or c.index in front or c.index == rec]
    shown.sort(key=lambda c: (c.latency_ms, c.cost_per_million, c.index))
    what = "every candidate" if show_all else f"the Pareto front, {len(shown)} of {len(plan.candidates)} candidates; --all lists every one"
    t = Table(title=f"placements, fastest first ({what})", title_justify="left")
    label = _leak_label(plan)
    for col in ("", "placement", label, "KB sent", "device ms", "transfer ms", "server ms", "total ms", f"{plan.profile.currency}/1M",
                "acc. loss", "limits"):
        t.add_column(col, justify="left" if col in ("", "placement", "limits") else "right", overflow="fold")
    for c in shown:
        mark = "★" if c.index == rec else ("◆" if c.index in front else "")
        measured = c.value if c.value is not None else c.ssim
        if c.placement == "device":
            ssim = "nothing sent"
        elif measured is None:
            ssim = "no conclusion"
        else:
            ssim = f"{measured:.3f}" + ("" if c.verified else " (lower bound)")
        fails = plan.failed_limits(c)
        t.add_row(
            mark, _esc(c.label), ssim, f"{c.bytes_sent / 1024:.2f}", _sig(c.device_ms), _sig(c.transfer_ms), _sig(c.server_ms),
            _sig(c.latency_ms), _sig(c.cost_per_million), f"{100 * c.utility_loss:.1f} pt",
            "[green]met[/]" if not fails else "[red]fails " + "; ".join(fails) + "[/]",
            style="bold" if c.index == rec else None,
        )
    return t


def sensitivity_table(plan) -> Table:
    t = Table(title="recommendation by uplink bandwidth (everything else as in the profile)", title_justify="left")
    t.add_column("uplink Mbit/s")
    t.add_column("recommendation", overflow="fold")
    n = len(plan.sensitivity)
    for i, iv in enumerate(plan.sensitivity):
        if n == 1:
            rng = f"{_mbit(iv.lo_mbit)} – {_mbit(iv.hi_mbit)} (all swept)"
        elif i == 0:
            rng = f"up to {_mbit(iv.hi_mbit)}"
        elif i == n - 1:
            rng = f"above {_mbit(iv.lo_mbit)}"
        else:
            rng = f"{_mbit(iv.lo_mbit)} – {_mbit(iv.hi_mbit)}"
        label = _esc(iv.label) if iv.index is not None else f"[red]{_esc(iv.label)}[/]"
        t.add_row(rng + ("  ← profile" if iv.current else ""), label)
    return t


def print_plan(plan, console: Console | None = None, *, show_all: bool = False) -> None:
    console = console or Console()
    for line in plan_header(plan):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(plan_table(plan, show_all=show_all))
    console.print("★ recommended · ◆ Pareto-optimal (no other placement is at least as good in latency, cost, leakage and "
                  "accuracy loss, and better in one)", highlight=False)
    rec = plan.recommendation
    if rec.index is not None:
        c = plan.candidates[rec.index]
        console.print(f"[bold green]recommendation:[/] {_esc(rec.text)}", highlight=False, soft_wrap=True)
        console.print(f"  {_sig(c.latency_ms)} ms end to end ({_sig(c.device_ms)} device + {_sig(c.transfer_ms)} transfer + "
                      f"{_sig(c.server_ms)} server), {_sig(c.cost_per_million)} {plan.profile.currency} per million inferences"
                      + (f", {_leak_label(plan)} {c.value:.3f} ({c.attack})" if c.value is not None and c.placement == "split" else ""),
                      markup=False, highlight=False, soft_wrap=True)
    else:
        console.print("[bold red]no recommendation:[/] " + _esc(rec.unmet[0]), highlight=False, soft_wrap=True)
        for line in rec.unmet[1:]:
            console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
    console.print(sensitivity_table(plan))
    for n in plan.notes:
        console.print(f"note: {n}", markup=False, highlight=False, soft_wrap=True)
    console.print("These are the numbers the attacks run in the audit achieved, not a guarantee; costs and latencies are "
                  "estimates from the profile.", markup=False, highlight=False, soft_wrap=True)


def _esc(text: str) -> str:
    from rich.markup import escape

    return escape(text)
