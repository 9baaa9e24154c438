"""Tests for audit.gate: strict config, the evaluate() engine, JUnit, and `splitaudit gate` exit codes."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitaudit.cli import main
from splitaudit.errors import UserError
from splitaudit.gate import (
    GateConfig,
    Rule,
    assert_max_ssim,
    assert_min_accuracy,
    evaluate,
    junit_xml,
    load_gate_config,
    parse_gate_config,
)
from splitaudit.results import AuditResult, CutInfo, ResultRow

NOISE = "noise:sigma=1,kind=gaussian"  # the canonical spec of noise:sigma=1
TINY = Path(__file__).with_name("tiny.py")


# ------------------------------------------------------------------------------------------------
# helpers: hand-built results
# ------------------------------------------------------------------------------------------------
def row(cut="stem", defense="none", ssim=0.5, *, attack="decoder", adaptive=False, status="ok", psnr=15.0, accuracy=0.9,
        agreement=1.0, overhead=0.0, images=None, **kw) -> ResultRow:
    return ResultRow(
        cut=cut, defense=defense, attack=attack, adaptive=adaptive, ssim=ssim, ssim_ci=(ssim - 0.01, ssim + 0.01), psnr=psnr,
        psnr_ci=(psnr - 0.1, psnr + 0.1), baseline_ssim=0.02, n_eval=48, accuracy=accuracy, agreement=agreement,
        latency_overhead_ms=overhead, status=status, converged=status == "ok", images=images, **kw,
    )


def result(*rows: ResultRow, cuts=("stem", "block")) -> AuditResult:
    infos = tuple(CutInfo(name=c, shape=(4, 12, 12), bytes_per_sample=2304, head_flops=1, head_latency_ms=0.1) for c in cuts)
    return AuditResult(created="2026-01-01T00:00:00+00:00", seed=0, model={"spec": "m"}, data={"spec": "d"}, environment={},
                       cuts=infos, results=tuple(rows))


def config(thresholds=None, rules=(), **kw) -> GateConfig:
    return parse_gate_config({"thresholds": {**(thresholds or {}), "rule": list(rules)}, **kw}, root=Path("/r"))


def by_name(report):
    return {c.name: c for c in report.checks}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "table, words",
    [
        ({"modle": "builtin:lenet"}, ["'modle'", "did you mean 'model'", "allowed keys", "thresholds"]),
        ({"thresholds": {"max_ssimm": 0.3}}, ["'max_ssimm'", "[thresholds]", "max_ssim", "rule"]),
        ({"thresholds": {"rule": [{"cut": "a", "max_ssim": 0.4, "colour": 1}]}}, ["'colour'", "rule]] #1", "defense"]),
        ({"thresholds": {"max_ssim": 1.5}}, ["max_ssim", "out of range", "(0, 1]"]),
        ({"thresholds": {"min_accuracy": "high"}}, ["min_accuracy", "number"]),
        ({"thresholds": {"rule": [{"max_ssim": 0.4}]}}, ["matches nothing"]),
        ({"thresholds": {"rule": [{"cut": "a"}]}}, ["sets no threshold"]),
        ({"cuts": "stem"}, ["cuts", "list of non-empty strings"]),
        ({"seed": True}, ["seed", "integer"]),
        ({"profile": "fast"}, ["unknown profile", "quick"]),
        ({"defenses": ["nois:sigma=1"]}, ["unknown defense", "noise"]),
        ({"attacks": ["magic"]}, ["unknown attack", "decoder"]),
        ({"model": "no_callable_part"}, ["model spec"]),
        ({"aux_queries": "random"}, ["aux_queries", "data or noise"]),
        ({"executor": "spark"}, ["unknown executor", "local or ray"]),
        ({"workers": -1}, ["workers", "out of range"]),
    ],
)
def test_config_is_strict(table, words):
    with pytest.raises(UserError) as exc:
        parse_gate_config(table, root=Path("/r"), where="splitaudit.toml")
    for w in words:
        assert w in str(exc.value)


def test_config_resolves_paths_against_its_folder_and_canonicalizes_defenses(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg_file = tmp_path / "sub" / "splitaudit.toml"
    cfg_file.write_text(
        'model = "m.py:build"\nweights = "w.pt"\ndata = "d.npz"\naux_data = "builtin:mnist"\ncache_dir = "c"\nbaseline = "/abs/b.json"\n'
        'defenses = ["none", "noise:sigma=1"]\nexecutor = "ray"\nworkers = 3\n[thresholds]\nmin_accuracy = 0.5\n'
        '[[thresholds.rule]]\ndefense = "noise:sigma=1"\nmax_ssim = 0.6\n'
    )
    cfg = load_gate_config(cfg_file)
    root = cfg_file.parent.resolve()
    assert cfg.model == f"{root / 'm.py'}:build"
    assert (cfg.weights, cfg.data, cfg.cache_dir, cfg.baseline) == (str(root / "w.pt"), str(root / "d.npz"), str(root / "c"), "/abs/b.json")
    assert cfg.defenses == ("none", NOISE) and cfg.aux_data == "builtin:mnist"
    assert cfg.audit_config().executor == "ray" and cfg.audit_config().workers == 3
    assert cfg.thresholds == {"max_ssim": 0.3, "min_accuracy": 0.5}  # max_ssim defaults to 0.3
    assert cfg.rules[0].defense == NOISE
    assert cfg.audit_config().threshold == 0.3
    assert load_gate_config(cfg_file).limits_for("stem", NOISE)["max_ssim"] == 0.6


def test_config_discovery_splitaudit_toml_then_pyproject_then_error(tmp_path):
    with pytest.raises(UserError, match="neither splitaudit.toml nor"):
        load_gate_config(cwd=tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(UserError, match="neither"):
        load_gate_config(cwd=tmp_path)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.splitaudit]\ndata = "builtin:mnist"\n'
                                             '[tool.splitaudit.thresholds]\nmax_ssim = 0.4\n')
    cfg = load_gate_config(cwd=tmp_path)
    assert (cfg.data, cfg.thresholds["max_ssim"]) == ("builtin:mnist", 0.4)
    (tmp_path / "splitaudit.toml").write_text("[thresholds]\nmax_ssim = 0.2\n")
    assert load_gate_config(cwd=tmp_path).thresholds["max_ssim"] == 0.2  # splitaudit.toml wins
    (tmp_path / "pyproject.toml").write_text('[tool.splitaudit]\nbogus = 1\n')
    with pytest.raises(UserError, match=r"'bogus' in \[tool.splitaudit\]"):
        load_gate_config(tmp_path / "pyproject.toml")
    (tmp_path / "bad.toml").write_text("max_ssim = = 1")
    with pytest.raises(UserError, match="not valid TOML"):
        load_gate_config(tmp_path / "bad.toml")


def test_rule_precedence_specific_beats_general_and_later_beats_earlier():
    cfg = config(
        {"max_ssim": 0.3},
        [
            {"cut": "a", "defense": "none", "max_ssim": 0.7},  # most specific, though first
            {"cut": "a", "max_ssim": 0.5, "max_psnr": 20},
            {"defense": "none", "max_ssim": 0.6},  # same specificity as the cut rule, later: wins
        ],
    )
    assert cfg.limits_for("a", "none") == {"max_ssim": 0.7, "max_psnr": 20.0}  # a rule overrides only its keys
    assert cfg.limits_for("a", NOISE) == {"max_ssim": 0.5, "max_psnr": 20.0}
    assert cfg.limits_for("b", "none") == {"max_ssim": 0.6}
    assert cfg.limits_for("b", NOISE) == {"max_ssim": 0.3}


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
def test_headline_is_the_strongest_attack_and_limits_are_inclusive():
    res = result(row(ssim=0.2, attack="decoder"), row(ssim=0.3, attack="optimization"), cuts=("stem",))
    rep = evaluate(res, config())
    (c,) = rep.checks
    assert (c.value, c.limit, c.passed) == (0.3, 0.3, True)
    assert "optimization" in c.message
    rep = evaluate(res, config({"max_ssim": 0.29}))
    assert not rep.passed and "0.300 > limit 0.290" in rep.checks[0].message


@pytest.mark.parametrize("status", ["not_converged", "failed"])
def test_an_attack_that_failed_or_did_not_converge_fails_its_leakage_checks(status):
    res = result(row(ssim=0.05), row(ssim=0.01, adaptive=True, status=status, error="boom" if status == "failed" else None),
                 cuts=("stem",))
    rep = by_name(evaluate(res, config({"max_ssim": 0.3, "max_psnr": 40, "min_accuracy": 0.5})))
    for key in ("max_ssim", "max_psnr"):
        c = rep[f"stem / none: {key}"]
        assert not c.passed and c.value is not None
        assert ("did not converge" if status == "not_converged" else "failed: boom") in c.message
    assert rep["stem / none: min_accuracy"].passed  # utility does not depend on the attack


def test_every_attack_failed_fails_with_no_value():
    res = result(row(status="failed", error="out of memory"), cuts=("stem",))
    (c,) = evaluate(res, config()).checks
    assert (c.passed, c.value) == (False, None)
    assert "every attack failed" in c.message and "out of memory" in c.message


def test_missing_pairs_fail_whether_expected_by_config_rule_or_baseline():
    res = result(row("stem", "none"), cuts=("stem", "block"))
    cfg = config({}, [{"cut": "block", "max_ssim": 0.9}], defenses=["none", "noise:sigma=1"])
    base = result(row("stem", "dropout:p=0.5"))
    rep = by_name(evaluate(res, cfg, base))
    for pair in (f"stem / {NOISE}", "block / none", f"block / {NOISE}", "stem / dropout:p=0.5"):
        assert not rep[f"{pair}: present"].passed, pair
    assert "stem / none: present" not in rep and rep["stem / none: max_ssim"].value == 0.5


def test_unmeasured_utility_fails_rather_than_passing():
    res = result(row(accuracy=None), cuts=("stem",))
    c = by_name(evaluate(res, config({"min_accuracy": 0.5})))["stem / none: min_accuracy"]
    assert not c.passed and "not measured" in c.message


def test_regression_against_a_baseline():
    base = result(row(ssim=0.20, accuracy=0.90), row("block", ssim=0.1))
    cur = result(row(ssim=0.25, accuracy=0.80), row("block", ssim=0.1), row("block", NOISE, ssim=0.05))
    cfg = config({"max_ssim": 1.0, "max_ssim_increase": 0.02, "max_accuracy_drop": 0.05},
                 [{"cut": "block", "max_ssim_increase": 0.0}])
    rep = by_name(evaluate(cur, cfg, base))
    inc = rep["stem / none: max_ssim_increase"]
    assert not inc.passed and math.isclose(inc.value, 0.05) and "increase" in inc.message
    assert not rep["stem / none: max_accuracy_drop"].passed
    assert rep["block / none: max_ssim_increase"].passed  # 0 <= 0
    assert f"block / {NOISE}: max_ssim_increase" not in rep  # a pair new since the baseline: noted, not judged
    assert any("not in the baseline" in n for n in evaluate(cur, cfg, base).notes)
    no_base = evaluate(cur, cfg)  # regression limits without a baseline: skipped, and said so
    assert not any("increase" in c.metric or "drop" in c.metric for c in no_base.checks)
    assert any("no baseline" in n for n in no_base.notes)


def test_cut_aliases_match_config_and_rules():
    res = result(row("features.3", ssim=0.4))
    res = AuditResult(**{**res.__dict__, "cuts": (CutInfo("features.3", (1,), 4, 1, 0.1, aliases=("relu2",)),)})
    cfg = config({}, [{"cut": "relu2", "max_ssim": 0.5}], cuts=["relu2"])
    (c,) = evaluate(res, cfg).checks
    assert (c.cut, c.limit, c.passed) == ("features.3", 0.5, True)


@settings(max_examples=60, deadline=None)
@given(ssim=st.floats(0, 1), limit=st.floats(0.01, 1), status=st.sampled_from(["ok", "not_converged", "failed"]))
def test_a_leakage_check_passes_only_when_every_attack_ran_well_and_the_value_is_within(ssim, limit, status):
    res = result(row(ssim=0.0), row(ssim=ssim, attack="optimization", status=status), cuts=("stem",))
    (c,) = evaluate(res, GateConfig(thresholds={"max_ssim": limit})).checks
    assert c.passed == (status == "ok" and ssim <= limit)


def test_images_are_joined_with_the_results_folder(tmp_path):
    res = result(row(ssim=0.9, images="images/stem.png"), cuts=("stem",))
    (c,) = evaluate(res, config(), base=tmp_path).checks
    assert c.images == str(tmp_path / "images" / "stem.png")


def test_assertion_helpers_name_cut_defense_value_limit_and_images(tmp_path):
    res = result(row(ssim=0.8, images=str(tmp_path / "grid.png")), row("stem", NOISE, ssim=0.1, accuracy=0.4), cuts=("stem",))
    assert_max_ssim(res, cut="stem", defense="noise:sigma=1", limit=0.3).passed  # canonicalized, passes
    with pytest.raises(AssertionError) as exc:
        assert_max_ssim(res, cut="stem", limit=0.3)
    msg = str(exc.value)
    for w in ("'stem'", "'none'", "0.800", "limit 0.300", str(tmp_path / "grid.png")):
        assert w in msg
    with pytest.raises(AssertionError, match="accuracy 0.400 < limit 0.500"):
        assert_min_accuracy(res, cut="stem", defense="noise:sigma=1", limit=0.5)
    with pytest.raises(AssertionError, match="no result for cut 'block'"):
        assert_max_ssim(res, cut="block", limit=0.3)


def test_junit_parses_with_one_testcase_per_check_and_a_failure_per_fail():
    rep = evaluate(result(row(ssim=0.9), row("block", ssim=0.1)), config({"min_agreement": 0.5}))
    root = ET.fromstring(junit_xml(rep))
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert len(cases) == len(rep.checks) == 4
    assert int(suite.get("failures")) == len(rep.failures) == 1
    failed = [tc for tc in cases if tc.find("failure") is not None]
    assert [(tc.get("classname"), tc.get("name")) for tc in failed] == [("splitaudit.stem.none", "max_ssim")]
    assert "0.900" in failed[0].find("failure").get("message")


# ------------------------------------------------------------------------------------------------
# the command: exit codes 0, 1, 2
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "results.json"
    result(row(ssim=0.25, images="images/a.png"), row("block", ssim=0.6)).save(path)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_gate_exit_0_when_every_check_passes(tmp_path, saved, capsys):
    cfg = _write(tmp_path / "splitaudit.toml", '[thresholds]\nmax_ssim = 0.3\n[[thresholds.rule]]\ncut = "block"\nmax_ssim = 0.7\n')
    junit = tmp_path / "out" / "junit.xml"
    assert main(["gate", "--config", str(cfg), "--results", str(saved), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert "stem / none: max_ssim" in out and "pass" in out and "FAIL" not in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "0")


def test_gate_exit_1_when_a_threshold_is_breached(tmp_path, saved, capsys, monkeypatch):
    _write(tmp_path / "pyproject.toml", '[tool.splitaudit]\n[tool.splitaudit.thresholds]\nmax_ssim = 0.3\n')
    monkeypatch.chdir(tmp_path)  # found as ./pyproject.toml's [tool.splitaudit]
    assert main(["gate", "--results", str(saved), "--junit", "j.xml"]) == 1
    out = capsys.readouterr().out
    assert "FAIL block / none: max_ssim: SSIM (decoder) 0.600 > limit 0.300" in out
    assert ET.parse(tmp_path / "j.xml").getroot().find("testsuite").get("failures") == "1"


@pytest.mark.parametrize(
    "toml, args, words",
    [
        ("[thresholds]\nmax_ssim = 0.3\nspeed = 1\n", ["--results", "{saved}"], "unknown key 'speed' in [thresholds]"),
        ("", ["--results", "missing.json"], "results file 'missing.json' not found"),
        ("", ["--results", "{saved}", "--baseline", "missing.json"], "results file 'missing.json' not found"),
        ('defenses = ["none"]\n', [], "has no model and no data"),  # no --results: the audit needs model and data
        ("", ["--results", "{saved}", "--bogus"], "No such option"),
    ],
)
def test_gate_exit_2_on_bad_config_or_input(tmp_path, saved, capsys, monkeypatch, toml, args, words):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "splitaudit.toml", toml)
    assert main(["gate", "--config", str(cfg), *(a.format(saved=saved) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_gate_exit_2_without_any_config(tmp_path, saved, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["gate", "--results", str(saved)]) == 2
    assert "error: no gate config" in capsys.readouterr().err


def test_gate_turns_flags_and_config_into_the_audit_config(tmp_path, monkeypatch, capsys):
    """--no-cache, --cache-dir and the config reach run_audit (without running one)."""
    import splitaudit.runner
    from splitaudit.progress import RichReporter

    seen = {}

    def fake_run_audit(cfg, *, reporter=None):
        seen["cfg"], seen["reporter"] = cfg, reporter
        return result(row(ssim=0.1), row(defense=NOISE, ssim=0.05), cuts=("stem",))

    monkeypatch.setattr(splitaudit.runner, "run_audit", fake_run_audit)
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "splitaudit.toml", 'model = "builtin:lenet"\ndata = "builtin:mnist"\ndefenses = ["none", "noise:sigma=1"]\n'
                 'seed = 3\ncache_dir = "from-config"\n[thresholds]\nmax_ssim = 0.25\n')
    assert main(["gate", "--config", str(cfg), "--no-cache", "--cache-dir", "c"]) == 0
    c = seen["cfg"]
    assert (c.model, c.data, c.defenses, c.seed, c.profile) == ("builtin:lenet", "builtin:mnist", ("none", NOISE), 3, "quick")
    assert (c.use_cache, c.cache_dir, c.threshold, c.out) == (False, "c", 0.25, "splitaudit-gate")
    assert isinstance(seen["reporter"], RichReporter)
    assert main(["gate", "--config", str(cfg)]) == 0
    assert (seen["cfg"].use_cache, seen["cfg"].cache_dir) == (True, str(tmp_path / "from-config"))


def test_gate_runs_the_audit_end_to_end(tmp_path, capsys):
    """The one test that runs an audit through `gate`: tiny model, one cut, the session's cache."""
    from tests.conftest import write_tiny_npz

    write_tiny_npz(tmp_path / "tiny.npz")
    cfg = _write(tmp_path / "splitaudit.toml",
                 f'model = "{TINY}:build"\ndata = "tiny.npz"\ncuts = ["stem"]\nprofile = "quick"\nout = "gate-out"\n'
                 '[thresholds]\nmax_ssim = 0.3\nmin_agreement = 0.99\n')
    code = main(["gate", "--config", str(cfg), "--junit", str(tmp_path / "j.xml")])
    out = capsys.readouterr().out
    assert code == 1, out  # the first conv of a tiny net is easy to invert
    assert "FAIL stem / none: max_ssim" in out and "reconstructions:" in out
    saved_result = AuditResult.load(tmp_path / "gate-out" / "results.json")
    assert saved_result.threshold == 0.3
    png = tmp_path / "gate-out" / saved_result.results[0].images
    assert png.is_file() and str(png) in out
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
