"""The terminal views: the cuts table and the final audit table (rich)."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from audit.results import AuditResult, ResultRow


def verdict(row: ResultRow, threshold: float) -> str:
    """Plain words, never "safe": what the attacks that ran achieved."""
    if row.status == "failed":
        return "attack failed: no conclusion"
    if row.ssim > threshold:
        text = "recognizable"
    else:
        text = "not recognizable by the attacks run"
    if not row.converged or row.flags:
        text += " (lower bound)"
    return text


def _kb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024:.2f}"


def cuts_table(rows: list[dict], *, title: str = "candidate cuts") -> Table:
    t = Table(title=title)
    cols = ("#", "cut", "module", "shape", "KB/sample f32", "fp16", "int8", "head MFLOPs", "head ms (b=1)", "tail MFLOPs", "tail ms (b=1)")
    for col in cols:
        t.add_column(col, justify="right" if col not in ("cut", "module", "shape") else "left")
    for r in rows:
        t.add_row(
            str(r["index"]), r["name"] + (f" (= {', '.join(r['aliases'])})" if r.get("aliases") else ""), r["module_type"],
            "×".join(map(str, r["shape"])), _kb(r["bytes_per_sample"]), _kb(r["bytes_fp16"]), _kb(r["bytes_int8"]),
            f"{r['head_flops'] / 1e6:.3f}", f"{r['head_latency_ms']:.3f}",
            "-" if r.get("tail_flops") is None else f"{r['tail_flops'] / 1e6:.3f}",
            "-" if r.get("tail_latency_ms") is None else f"{r['tail_latency_ms']:.3f}",
        )
    return t


def audit_table(result: AuditResult) -> Table:
    """One line per (cut, defense): the headline row, i.e. the strongest attack, adaptive or not."""
    thr = result.threshold
    t = Table(title=f"leakage by cut (threshold SSIM {thr:.2f}; higher = more recognizable)")
    for col in ("cut", "shape", "KB/sample", "head MFLOPs", "defense", "SSIM [95% CI]", "PSNR dB", "baseline", "acc", "verdict"):
        t.add_column(col, justify="left" if col in ("cut", "shape", "defense", "verdict") else "right")
    for c in result.cuts:
        for d in result.defenses():
            h = result.headline(c.name, d)
            if h is None:
                continue
            style = "red" if h.ssim > thr else "green"
            attack = h.attack + (" adaptive" if h.adaptive else "")
            t.add_row(
                c.name, "×".join(map(str, c.shape)), _kb(h.bytes_per_sample or c.bytes_per_sample), f"{c.head_flops / 1e6:.3f}",
                d, f"{h.ssim:.3f} [{h.ssim_ci[0]:.3f}, {h.ssim_ci[1]:.3f}]",
                "inf" if not math.isfinite(h.psnr) else f"{h.psnr:.1f}", f"{h.baseline_ssim:.3f}",
                "-" if h.accuracy is None else f"{h.accuracy:.3f}", f"[{style}]{verdict(h, thr)}[/{style}] ({attack})",
            )
    return t


def print_audit(result: AuditResult, console: Console | None = None) -> None:
    console = console or Console()
    console.print(audit_table(result))
    flagged = [r for r in result.results if r.flags]
    for r in flagged:
        for f in r.flags:
            console.print(f"[yellow]! {r.cut} / {r.defense} / {r.attack}{' adaptive' if r.adaptive else ''}: {f}[/yellow]")
    for n in result.notes:
        console.print(f"[yellow]note: {n}[/yellow]")

