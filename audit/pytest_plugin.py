"""pytest plugin, registered through the ``pytest11`` entry point: options and thin fixtures only.

The engine lives elsewhere: :func:`splitaudit.runner.run_audit` audits, :mod:`splitaudit.gate` judges. Use::

    from splitaudit.gate import assert_max_ssim

    def test_split_does_not_leak(splitaudit_audit):
        result = splitaudit_audit(model="mypkg.model:build", data="tests/data.npz", cuts=["layer2"],
                                  defenses=["noise:sigma=1"])
        assert_max_ssim(result, cut="layer2", defense="noise:sigma=1", limit=0.3)

For text (``splitaudit[text]``), the headline is token accuracy: ``assert_max_token_accuracy(result, 0.3,
cut="encoder.layer.2")`` (every defense when ``defense`` is left out, every cut when ``cut`` is). A helper
for the other modality's metric (``assert_max_ssim`` on text results) is an error, never a pass.

Options: ``--splitaudit-report=DIR`` writes the HTML report (and results.json) of every audit run in
the session under DIR; ``--splitaudit-cache-dir`` and ``--splitaudit-no-cache`` control the cache,
which is on by default so that reruns reuse captured activations and fitted attacks.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("splitaudit", "splitaudit privacy audits")
    group.addoption("--splitaudit-report", metavar="DIR", default=None,
                    help="write the HTML report of every audit run in the session under DIR")
    group.addoption("--splitaudit-cache-dir", metavar="DIR", default=None,
                    help="cache location (default $SPLITAUDIT_CACHE_DIR or ~/.cache/splitaudit)")
    group.addoption("--splitaudit-no-cache", action="store_true", default=False, help="recompute everything")


_REPORTS = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_REPORTS] = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    written = config.stash.get(_REPORTS, [])
    if written:
        terminalreporter.write_line(f"splitaudit: wrote {len(written)} report(s) under {config.getoption('splitaudit_report')}")


def _absolute_images(result, out: Path):
    """Rows carry their image path relative to results.json; hand tests the absolute path instead."""
    rows = tuple(replace(r, images=str(out / r.images)) if r.images else r for r in result.results)
    return replace(result, results=rows)


def _model_spec(model) -> str:
    """A spec string as is, or a module-level callable (``module:qualname``) for convenience."""
    if isinstance(model, str):
        return model
    mod, name = getattr(model, "__module__", None), getattr(model, "__qualname__", "")
    if callable(model) and mod and name.isidentifier():
        return f"{mod}:{name}"
    raise TypeError(f"model must be a spec string or a module-level function, got {model!r}")


@pytest.fixture
def splitaudit_audit(request, tmp_path):
    """A callable that audits a model and returns the :class:`AuditResult`.

    ``audit(model=..., data=..., cuts=..., defenses=..., attacks=..., profile="quick", weights=None, seed=0,
    device="cpu", threshold=0.3, reid_threshold=0.05, output=None, input_norm=None)``. Each call writes results.json, report.html and the reconstruction images into a
    temporary folder; rows' ``images`` are absolute paths there.
    """
    from splitaudit.config import AuditConfig
    from splitaudit.runner import run_audit
    from splitaudit.writer import write

    opts = request.config
    calls = {"n": 0}

    def audit(*, model, data, cuts=(), defenses=("none",), attacks=("decoder",), profile="quick", weights=None, seed=0,
              device="cpu", threshold=0.3, reid_threshold=0.05, output=None, input_norm=None):
        calls["n"] += 1
        out = tmp_path / f"splitaudit-{calls['n']}"
        cfg = AuditConfig(
            model=_model_spec(model), data=str(data), weights=str(weights) if weights else None, cuts=tuple(cuts),
            defenses=tuple(defenses), attacks=tuple(attacks), profile=profile, device=device, seed=seed, out=str(out),
            threshold=threshold, reid_threshold=reid_threshold, output=output, input_norm=input_norm, cache_dir=opts.getoption("splitaudit_cache_dir"), use_cache=not opts.getoption("splitaudit_no_cache"),
            command=f"pytest {request.node.nodeid}",
        )
        result = run_audit(cfg)
        write(result, out)
        report_dir = opts.getoption("splitaudit_report")
        if report_dir:  # a self-contained folder per audit: results.json, report.html, images/
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", request.node.nodeid).strip("_")[:150] + f"-{calls['n']}"
            target = Path(report_dir) / name
            write(result, target)
            opts.stash[_REPORTS].append(target / "report.html")
        return _absolute_images(result, out)

    return audit
