"""Progress reporting, kept out of the library's logic.

The runner talks to a :class:`Reporter`; the CLI passes one that draws rich progress bars on stderr,
tests and the pytest plugin pass the silent default.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager


class Task:
    def update(self, completed: float | None = None, *, total: float | None = None, description: str | None = None) -> None:
        pass

    def advance(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Reporter:
    """Silent reporter; subclasses draw. ``open`` a task and ``close`` it, or use ``task`` as a context.

    ``keep``: the task stays on screen once closed (a phase, an overall count); a task opened without
    it (one attack job) leaves the screen when it ends, so the bars shown are the work in progress.
    """

    def open(self, description: str, total: float | None = None, *, keep: bool = False) -> Task:
        return Task()

    @contextmanager
    def task(self, description: str, total: float | None = None, *, keep: bool = False):
        t = open_task(self, description, total, keep=keep)
        try:
            yield t
        finally:
            t.close()

    def log(self, message: str) -> None:
        pass


def open_task(reporter: Reporter, description: str, total: float | None = None, *, keep: bool = False) -> Task:
    """``reporter.open``, with ``keep`` only where its ``open`` takes it: a reporter written before
    ``keep`` existed (``open(description, total)``) still works, and keeps every task."""
    try:
        params = inspect.signature(reporter.open).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if any(p.name == "keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return reporter.open(description, total, keep=keep)
    return reporter.open(description, total)


class RichReporter(Reporter):
    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            # Redrawn 4 times a second, not rich's 10: with dozens of jobs the redraw took a share of a
            # core from the attacks (1.8 s of the quick demo's samples, drawing for a non-terminal too).
            refresh_per_second=4,
        )

    def __enter__(self):
        self._started = False  # the display starts with the first task: an error before any prints nothing else
        return self

    def __exit__(self, *exc):
        if self._started:
            self.progress.stop()

    def open(self, description: str, total: float | None = None, *, keep: bool = False) -> Task:
        if not getattr(self, "_started", True):
            self.progress.start()
            self._started = True
        tid = self.progress.add_task(description, total=total)
        progress = self.progress

        class _T(Task):
            def update(self, completed=None, *, total=None, description=None):
                kw = {k: v for k, v in (("completed", completed), ("total", total), ("description", description)) if v is not None}
                progress.update(tid, **kw)

            def advance(self, n=1):
                progress.advance(tid, n)

            def close(self):
                t = progress.tasks[[x.id for x in progress.tasks].index(tid)]
                if t.total is not None:
                    progress.update(tid, completed=t.total)
                progress.stop_task(tid)
                if not keep:
                    progress.update(tid, visible=False)

        return _T()

    def log(self, message: str) -> None:
        self.progress.console.print(message)
