"""Tests for the pytest plugin (audit.pytest_plugin), run with pytester in a fresh project folder.

The inner session has no conftest and imports nothing of splitaudit's tests: the fixture and the
options come from the ``pytest11`` entry point alone, as in a project that only installs splitaudit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import write_tiny_npz

pytest_plugins = ["pytester"]

TINY = Path(__file__).with_name("tiny.py")


@pytest.fixture(autouse=True, scope="module")
def _torch_lazy_imports_before_pytester():
    """pytester's in-process run forgets the modules first imported inside it. The audit's FLOP counter
    lazily imports torch modules that register operator libraries, which cannot be registered twice, so a
    later audit in this session would fail on re-import: import them here, outside the inner run."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        torch.nn.Linear(1, 1)(torch.zeros(1, 1))


def test_options_come_from_the_entry_point(pytester):
    result = pytester.runpytest_inprocess("--help")
    result.stdout.fnmatch_lines(["*splitaudit*", "*--splitaudit-report=DIR*", "*--splitaudit-no-cache*"])


def test_fixture_helpers_and_html_report_in_a_fresh_project(pytester):
    write_tiny_npz(pytester.path / "tiny.npz")
    pytester.makepyfile(
        test_split=f"""
        from pathlib import Path

        import pytest

        from splitaudit.gate import assert_max_ssim
        from splitaudit.results import AuditResult

        @pytest.fixture(scope="module")
        def result_holder():
            return {{}}

        def test_audit_returns_a_result_with_images(splitaudit_audit, result_holder):
            result = splitaudit_audit(model="{TINY}:build", data="tiny.npz", cuts=["stem"], profile="quick")
            assert isinstance(result, AuditResult)
            (row,) = result.results
            assert row.cut == "stem" and row.defense == "none" and Path(row.images).is_file()
            assert_max_ssim(result, cut="stem", limit=1.0)  # passes
            result_holder["r"] = result

        def test_leaky_cut_fails_with_a_useful_message(result_holder):
            assert_max_ssim(result_holder["r"], cut="stem", limit=0.05)
        """
    )
    report_dir = pytester.path / "reports"
    result = pytester.runpytest_inprocess(f"--splitaudit-report={report_dir}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    # The failure names the cut, the defense, the value, the limit and the reconstruction images.
    result.stdout.fnmatch_lines(["*AssertionError: splitaudit: cut 'stem', defense 'none': SSIM (decoder) 0.* > limit 0.050*",
                                 "*reconstructions: */images/stem__none__decoder*.png"])
    result.stdout.fnmatch_lines(["splitaudit: wrote 1 report(s) under *reports"])
    (folder,) = report_dir.iterdir()
    assert (folder / "report.html").read_text().startswith("<!doctype html>")
    assert (folder / "results.json").is_file()
    assert len(list((folder / "images").glob("*.png"))) == 1


def test_a_project_with_its_own_attacks_and_audit_packages(pytester):
    """splitaudit installs one import package: a user's own top-level ``attacks`` and ``audit`` (common in
    ML-security repositories) neither shadow it nor are shadowed by it. Run in a subprocess, where the
    user's packages are imported first and nothing of splitaudit is in ``sys.modules`` yet."""
    write_tiny_npz(pytester.path / "tiny.npz")
    for pkg in ("attacks", "audit", "defenses"):
        pytester.mkpydir(pkg).joinpath("__init__.py").write_text(f"OWNER = 'the user'\nNAME = {pkg!r}\n")
    pytester.makeconftest("import attacks, audit, defenses  # the project's own, imported before any test\n")
    pytester.makeini("[pytest]\npythonpath = .\n")
    pytester.makepyfile(
        test_mine=f"""
        import attacks, audit, defenses

        from splitaudit.gate import assert_max_ssim

        def test_both_coexist(splitaudit_audit):
            result = splitaudit_audit(model="{TINY}:build", data="tiny.npz", cuts=["stem"], profile="quick")
            assert [r.attack for r in result.results] == ["decoder"]
            assert_max_ssim(result, cut="stem", limit=1.0)
            assert (attacks.OWNER, audit.NAME, defenses.NAME) == ("the user", "audit", "defenses")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
