"""The one writer of an audit's files: ``results.json``, ``report.html`` and the example images.

The CLI, the gate and the pytest plugin all call :func:`write`; the runner writes nothing but cache
entries. Every file is renamed into place whole (a reader never sees half a file), images first, so
that a results.json on disk never names an image that is not there yet.
"""

from __future__ import annotations

from pathlib import Path

from splitaudit.results import AuditResult, atomic_write_bytes


def write(result: AuditResult, out: str | Path, *, report: bool = True) -> Path:
    """Write ``result`` under ``out``: its examples (image grids, or text tables as HTML fragments), results.json
    and (``report``) report.html. Returns the path of results.json."""
    from splitaudit.errors import UserError

    out = Path(out)
    try:
        for rel, png in result.grids.items():
            atomic_write_bytes(out / rel, png)
        path = result.save(out / "results.json")
        if report:
            from splitaudit.report.html import write_report

            write_report(result, out / "report.html", base=out)
    except OSError as exc:
        raise UserError(f"cannot write the results under {str(out)!r}: {exc.strerror or exc}") from None
    return path
