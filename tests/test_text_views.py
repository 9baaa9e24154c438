"""Every view of a text audit: the assessment, the console table, the HTML report, the gate, the pytest
helpers and the planner read the text modality's metrics (token accuracy first), never SSIM."""

from __future__ import annotations

import html
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from splitaudit.assess import NO_CONCLUSION, NO_LEAKAGE_BEYOND_PRIOR, NOT_RECOGNIZABLE, RECOGNIZABLE, assess
from splitaudit.attacks.text import examples_html
from splitaudit.cli import main
from splitaudit.errors import UserError
from splitaudit.gate import (
    GateConfig,
    assert_max_ssim,
    assert_max_token_accuracy,
    evaluate,
    markdown_summary,
    parse_gate_config,
)
from splitaudit.plan import DeviceSpec, LinkSpec, PlanProfile, ServerSpec, constraints_from_flags, make_plan
from splitaudit.report.console import audit_table, print_plan
from splitaudit.report.html import render_report, sanitize_fragment
from splitaudit.results import AuditResult, CutInfo, ResultRow
from splitaudit.writer import write

NOISE = "noise:sigma=1,kind=gaussian"  # the canonical spec of noise:sigma=1
CUTS = ("embeddings", "encoder.layer.0", "encoder.layer.2", "encoder.layer.5", "pooler")


def _ci(v: float, half: float = 0.02) -> tuple[float, float]:
    return (v - half, v + half)


def trow(cut: str = "encoder.layer.0", defense: str = "none", acc: float = 0.6, *, attack: str = "decoder", adaptive: bool = False,
         gain: float | None = None, base: float = 0.1, reid: float = 0.001, n: int = 400, status: str = "ok", pii: float = 0.5,
         images: str | None = None, flags=()) -> ResultRow:
    """A text row: the image fields stay None, the text metrics live in ``metrics``."""
    gain = acc - base if gain is None else gain
    rouge, exact = min(1.0, acc + 0.05), acc / 4
    metrics = {
        "token_accuracy": acc, "token_accuracy_ci": _ci(acc), "token_accuracy_gain": gain, "token_accuracy_gain_ci": _ci(gain),
        "baseline_token_accuracy": base,
        "rouge_l": rouge, "rouge_l_ci": _ci(rouge), "rouge_l_gain": rouge - 0.15, "rouge_l_gain_ci": _ci(rouge - 0.15), "baseline_rouge_l": 0.15,
        "exact_match": exact, "exact_match_ci": _ci(exact, 0.01), "exact_match_gain": exact, "exact_match_gain_ci": _ci(exact, 0.01),
        "baseline_exact_match": 0.0,
        "pii_recovery": pii, "pii_recovery_ci": _ci(pii), "pii_recovery_gain": pii, "pii_recovery_gain_ci": _ci(pii),
        "baseline_pii_recovery": 0.0,
        "pii_recovery_by_kind": {"email": {"mean": pii + 0.1, "ci": [pii + 0.05, pii + 0.15]}, "phone": {"mean": pii - 0.1, "ci": [pii - 0.15, pii - 0.05]}},
    }
    return ResultRow(
        cut=cut, defense=defense, attack=attack, adaptive=adaptive, n_eval=n, accuracy=0.9 if defense == "none" else 0.88,
        agreement=1.0 if defense == "none" else 0.97, latency_ms=0.5, latency_overhead_ms=0.0 if defense == "none" else 0.02,
        worst_ssim=min(1.0, acc + 0.3), bytes_per_sample=12288, reid_top1=reid, reid_top1_ci=(max(0.0, reid - 0.004), reid + 0.004),
        reid_chance=1 / n, status=status, converged=status == "ok", flags=tuple(flags), images=images, metrics=metrics,
    )


def text_result(rows, *, threshold: float = 0.3, cuts=CUTS) -> AuditResult:
    infos = tuple(CutInfo(name=c, shape=(32, 384), bytes_per_sample=49152, head_flops=10_000 * (i + 1), head_latency_ms=0.2 * (i + 1),
                          index=i, tail_flops=10_000 * (len(cuts) - i), tail_latency_ms=0.2 * (len(cuts) - i))
                  for i, c in enumerate(cuts))
    return AuditResult(
        created="2026-01-01T00:00:00+00:00", seed=0, model={"spec": "builtin:minilm", "flops": 60_000, "latency_ms": 1.2},
        data={"spec": "builtin:pii-text", "modality": "text", "n_aux": 800, "n_eval": 400, "shape": [2, 32]},
        environment={}, cuts=infos, results=tuple(rows), threshold=threshold,
    )


def two_pairs() -> AuditResult:
    """encoder.layer.0 leaks undefended (token accuracy 0.6) and not under noise (0.2)."""
    return text_result([trow(acc=0.6, pii=0.5), trow(defense=NOISE, acc=0.2, pii=0.1, adaptive=True)],
                       cuts=("encoder.layer.0",))


# --- the modality ------------------------------------------------------------------------------------------
def test_the_result_knows_its_modality():
    r = two_pairs()
    assert r.modality.name == "text" and r.headline_metric.name == "token_accuracy"
    image = replace(r, data={"spec": "builtin:mnist"})
    assert image.modality.name == "image" and image.headline_metric.name == "ssim"  # results written before text
    back = AuditResult.from_dict(r.to_dict())
    assert back.modality.name == "text" and back.results[0].value("token_accuracy_ci") == (0.58, 0.62)
    assert [a["status"] for a in back.to_dict()["assessment"]] == [RECOGNIZABLE, NOT_RECOGNIZABLE]
    assert "token acc. 0.600 [0.580, 0.620]" in r.summary() and "SSIM" not in r.summary()


# --- 1. the assessment ------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, threshold, status, words", [
    # above the threshold and above the prior
    ([trow(acc=0.6)], 0.3, RECOGNIZABLE, "token acc. 0.600"),
    # below the threshold, above the prior, re-identification at chance
    ([trow(acc=0.2)], 0.3, NOT_RECOGNIZABLE, "<= threshold 0.3"),
    # the threshold is the result's: 0.6 is under 0.7
    ([trow(acc=0.6)], 0.7, NOT_RECOGNIZABLE, "<= threshold 0.7"),
    # over the threshold, but no better than the most frequent token at each position
    ([trow(acc=0.45, gain=0.0, base=0.45)], 0.3, NO_LEAKAGE_BEYOND_PRIOR, "no better than the no-information guess"),
    # the interval straddles the threshold
    ([trow(acc=0.3)], 0.3, NO_CONCLUSION, "straddles the threshold 0.3"),
    # an unconverged attack makes a low headline a lower bound
    ([trow(acc=0.2), trow(acc=0.1, attack="rmle", status="not_converged")], 0.3, NO_CONCLUSION, "did not converge"),
    # identity leaks whatever token accuracy says
    ([trow(acc=0.2, reid=0.3)], 0.3, RECOGNIZABLE, "whatever token acc. says"),
])
def test_assessment_reads_token_accuracy(rows, threshold, status, words):
    a = assess(text_result(rows, threshold=threshold), rows[0].cut, rows[0].defense)
    assert a.status == status, a.reasons
    assert a.metric == "token_accuracy"
    assert any(words in r for r in a.reasons), a.reasons
    assert not any("SSIM" in r for r in a.reasons), a.reasons


def test_the_headline_is_the_strongest_by_token_accuracy_and_failures_fail_closed():
    r = text_result([trow(acc=0.25), trow(acc=0.55, attack="rmle"), trow(defense=NOISE, acc=0.1),
                     trow(defense=NOISE, acc=math.nan, adaptive=True, status="failed")])
    a = r.assessment("encoder.layer.0", "none")
    assert (a.headline.attack, a.value) == ("rmle", 0.55) and a.status == RECOGNIZABLE
    b = r.assessment("encoder.layer.0", NOISE)
    assert b.status == NO_CONCLUSION and b.headline.adaptive is False  # the low naive row is only a lower bound


# --- 2. the console ------------------------------------------------------------------------------------------
def _table_text(result: AuditResult, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(audit_table(result, width))
    return [ln.rstrip() for ln in console.export_text().splitlines()]


def test_console_table_shows_the_text_metrics_and_fits():
    rows = [trow(cut, d, acc=0.8 - 0.12 * i - (0.3 if d != "none" else 0.0), pii=0.6 - 0.1 * i, adaptive=d != "none")
            for i, cut in enumerate(CUTS) for d in ("none", NOISE, "dropout:p=0.5")]
    result = text_result(rows)
    for width in (80, 120):
        lines = _table_text(result, width)
        header = next(ln for ln in lines if ln.startswith("cut "))
        body = [ln for ln in lines[lines.index(header) + 2:] if ln]
        assert len(body) == 15 and len(set(body)) == 15  # one line per (cut, defense), none wrapped
        assert max(len(ln) for ln in lines) <= width
        assert "token acc." in header and "SSIM" not in "\n".join(lines)
        assert "token acc. threshold 0.3" in lines[0]
    wide = _table_text(result, 120)
    header = next(ln for ln in wide if ln.startswith("cut "))
    for col in ("token acc.", "prior", "gain", "ROUGE-L", "PII rec.", "re-id"):
        assert col in header, (col, header)
    first = next(ln for ln in wide if ln.startswith("embeddings"))
    assert "0.800" in first and "0.100" in first and "+0.700" in first and "0.600" in first  # value, prior, gain, PII


# --- 3. the HTML report --------------------------------------------------------------------------------------
VOCAB = ["[PAD]", "[CLS]", "call", "<script>alert(1)</script>", "john", "@", "example", ".", "com", "at", "555", "##0199"]


def _fragment() -> bytes:
    """The text modality's own examples table, with a token that is markup."""
    x = torch.tensor([[[1, 2, 4, 9, 10, 11, 3], [-1, 0, 1, 0, 2, 2, 0]],
                      [[1, 2, 6, 5, 7, 8, 0], [-1, 0, 1, 1, 1, 1, -2]]])
    recon = x.clone()
    recon[0, 0, 4] = 6  # the phone number's first piece comes back wrong
    recon[1, 0, 2] = 3
    return examples_html(x, recon, fixed=torch.tensor([0]), ranked=torch.tensor([1]), values=torch.tensor([0.83, 0.5]),
                         data=SimpleNamespace(vocab=VOCAB)).encode()


def test_html_inlines_the_examples_and_escapes_names(tmp_path):
    evil_cut, evil_def = "layer<b>0</b>", "noise:sigma=1,<i>x"
    rels = ["images/a.html", "images/b.html"]
    rows = [trow(evil_cut, "none", acc=0.6, images=rels[0]), trow(evil_cut, evil_def, acc=0.2, adaptive=True, images=rels[1]),
            trow("encoder.layer.2", "none", acc=0.4)]
    result = text_result(rows, cuts=(evil_cut, "encoder.layer.2"))
    result = replace(result, grids={rels[0]: _fragment(), rels[1]: _fragment()})
    result = replace(result, plan=make_plan(result, PlanProfile(name="p", device=DeviceSpec(speed=0.1), link=LinkSpec(uplink_mbit=50.0),
                                                                server=ServerSpec(), source="test")).to_dict())
    write(result, tmp_path)  # the writer writes the fragments beside results.json, and the report from there
    page = (tmp_path / "report.html").read_text()
    assert (tmp_path / rels[0]).read_bytes() == _fragment()
    # the fragment is inline, its markup kept and its text escaped once
    assert page.count('<table class="text-examples">') == 2
    assert '<span class="pii">john</span>' in page and '<span class="pii hit">' in page and '<span class="pii miss">' in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&amp;lt;" not in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    for css in (".pii {", ".hit {", ".miss {", "line-through", "underline"):
        assert css in page, css
    # names from the results are escaped by the report itself
    assert "<b>0</b>" not in page and "<i>x" not in page
    assert html.escape(evil_cut) in page and html.escape(evil_def) in page
    # PII recovery by kind, the leakage-by-cut plot of token accuracy, and the metric named everywhere
    assert "PII rec. by kind" in page and ">email<" in page and "0.600 [0.550, 0.650]" in page
    assert re.search(r'<img src="data:image/svg\+xml;base64,[^"]+" alt="token acc\. and ROUGE-L of the strongest attack', page)
    assert "inputs are rebuilt recognizably (token acc. 0.600 [0.580, 0.620], threshold 0.30)" in html.unescape(page)
    assert "SSIM" not in re.sub(r"data:[^\"]+", "", page)  # no image metric anywhere on a text report


def test_a_hostile_fragment_cannot_bring_markup(tmp_path):
    bad = ('<table class="text-examples"><tr><td onclick="x()"><script>alert(2)</script><a href="http://evil">link</a>'
           '<span class="hit" style="background:url(http://evil)">ok</span><img src=x onerror=alert(3)>&lt;kept&gt;</td></tr></table>')
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "e.html").write_text(bad)
    (tmp_path / "images" / "x.png.html").write_text("no table here")
    result = text_result([trow(images="images/e.html"), trow(defense=NOISE, acc=0.2, adaptive=True, images="../e.html")],
                         cuts=("encoder.layer.0",))
    page = render_report(result, base=tmp_path)
    assert "alert(2)" not in page and "alert(3)" not in page and "evil" not in page and "onclick" not in page
    assert '<span class="hit">ok</span>' in page and "link" in page and "&lt;kept&gt;" in page
    assert "leaves the results folder" in page  # a path outside the folder is a placeholder
    assert str(sanitize_fragment("<table><tr><td>a &amp; b</td></tr>")) == "<table><tr><td>a &amp; b</td></tr></table>"


# --- 4. the gate ------------------------------------------------------------------------------------------
def config(thresholds=None, rules=(), **kw) -> GateConfig:
    return parse_gate_config({"thresholds": {**(thresholds or {}), "rule": list(rules)}, **kw}, root=Path("/r"))


def _by(report):
    return {(c.defense, c.metric): c for c in report.checks}


def test_gate_checks_token_accuracy_and_pii_recovery():
    r = two_pairs()
    checks = _by(evaluate(r, config({"max_token_accuracy": 0.5, "max_pii_recovery": 0.3, "max_rouge_l": 0.9})))
    assert not checks[("none", "max_token_accuracy")].passed and checks[(NOISE, "max_token_accuracy")].passed
    assert "token acc. (decoder) 0.600 > limit 0.500 (95% CI [0.580, 0.620])" in checks[("none", "max_token_accuracy")].message
    assert not checks[("none", "max_pii_recovery")].passed and checks[(NOISE, "max_pii_recovery")].passed
    assert checks[("none", "max_rouge_l")].passed and checks[("none", "max_rouge_l")].value == pytest.approx(0.65)
    # the default (max_ssim = 0.3, which nobody wrote) is the headline's on text: token accuracy <= 0.3
    default = _by(evaluate(r, config()))
    assert set(default) == {("none", "max_token_accuracy"), (NOISE, "max_token_accuracy")}
    assert not default[("none", "max_token_accuracy")].passed and default[(NOISE, "max_token_accuracy")].limit == 0.3
    assert set(_by(evaluate(r, GateConfig()))) == set(default)  # a config built in code too
    # a rule overrides the default for its pair; a failed adaptive attack fails closed
    ruled = _by(evaluate(r, config({"max_token_accuracy": 0.1}, rules=[{"defense": "noise:sigma=1", "max_token_accuracy": 0.25}])))
    assert ruled[(NOISE, "max_token_accuracy")].passed and not ruled[("none", "max_token_accuracy")].passed
    failing = text_result([trow(defense=NOISE, acc=0.1), trow(defense=NOISE, acc=math.nan, adaptive=True, status="failed")])
    assert not _by(evaluate(failing, config({"max_token_accuracy": 0.5})))[(NOISE, "max_token_accuracy")].passed


def test_gate_refuses_keys_of_the_other_modality():
    r = two_pairs()
    with pytest.raises(UserError, match=r"max_ssim .* image results .* text results .*'max_token_accuracy'"):
        evaluate(r, config({"max_ssim": 0.3}))  # written by the user: an error, never a silent pass
    with pytest.raises(UserError, match="max_psnr"):
        evaluate(r, config(rules=[{"cut": "encoder.layer.0", "max_psnr": 20.0}]))
    image = replace(r, data={"spec": "builtin:mnist"}, results=tuple(replace(x, ssim=0.5, ssim_ci=(0.4, 0.6), metrics={}) for x in r.results))
    with pytest.raises(UserError, match=r"max_token_accuracy .* text results .* image results .*'max_ssim'"):
        evaluate(image, config({"max_token_accuracy": 0.3}))
    with pytest.raises(UserError, match="baseline holds image results"):
        evaluate(r, config(), image)
    # an audit the gate would run: the wrong key fails before the audit; the text threshold is the audit's
    with pytest.raises(UserError, match="max_ssim"):
        config({"max_ssim": 0.4}, model="builtin:minilm", data="builtin:pii-text").audit_config()
    assert config({"max_token_accuracy": 0.4}, model="builtin:minilm", data="builtin:pii-text").audit_config().threshold == 0.4
    assert config(model="builtin:minilm", data="builtin:pii-text").audit_config().threshold == 0.3
    with pytest.raises(UserError, match="out of range"):
        config({"max_token_accuracy": 0.0})


def test_gate_command_and_summary_on_text(tmp_path, capsys):
    r = two_pairs()
    write(r, tmp_path / "res", report=False)
    results = tmp_path / "res" / "results.json"
    good, bad, wrong = tmp_path / "good.toml", tmp_path / "bad.toml", tmp_path / "wrong.toml"
    good.write_text('[thresholds]\nmax_token_accuracy = 0.7\nmax_pii_recovery = 0.6\n')
    bad.write_text('[thresholds]\nmax_token_accuracy = 0.5\n')
    wrong.write_text('[thresholds]\nmax_ssim = 0.5\n')
    summary = tmp_path / "summary.md"
    assert main(["gate", "--config", str(good), "--results", str(results), "--summary", str(summary)]) == 0
    assert main(["gate", "--config", str(bad), "--results", str(results)]) == 1
    capsys.readouterr()
    assert main(["gate", "--config", str(wrong), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "max_ssim" in err and "Traceback" not in err
    md = summary.read_text()
    assert "| token acc. [95% CI] | gain |" in md and "PII rec." in md and "SSIM" not in md
    assert "| `encoder.layer.0` | `none` | recognizable | 0.600 [0.580, 0.620] | +0.500 |" in md
    assert "SSIM" not in markdown_summary(evaluate(r, config()), r)


# --- 5. the pytest helpers ---------------------------------------------------------------------------------
def test_assert_max_token_accuracy():
    r = two_pairs()
    [check] = assert_max_token_accuracy(r, 0.3, cut="encoder.layer.0", defense="noise:sigma=1")
    assert check.passed and check.value == 0.2
    with pytest.raises(AssertionError, match=r"token acc\. \(decoder\) 0\.600 > limit 0\.300"):
        assert_max_token_accuracy(r, 0.3, cut="encoder.layer.0", defense="none")
    with pytest.raises(AssertionError, match="'none'"):  # every pair when none is named
        assert_max_token_accuracy(r, 0.3)
    assert len(assert_max_token_accuracy(r, 0.7)) == 2
    with pytest.raises(AssertionError, match="no result"):
        assert_max_token_accuracy(r, 0.7, cut="pooler")
    with pytest.raises(UserError, match="max_ssim"):
        assert_max_ssim(r, cut="encoder.layer.0", defense="none", limit=0.9)  # the image helper on text: an error


# --- 6. the planner ---------------------------------------------------------------------------------------
def test_planner_ranks_text_by_token_accuracy():
    rows = [trow("encoder.layer.0", "none", acc=0.6), trow("encoder.layer.0", NOISE, acc=0.25, adaptive=True),
            trow("encoder.layer.5", "none", acc=0.2), trow("encoder.layer.5", NOISE, acc=0.05, adaptive=True)]
    result = text_result(rows, cuts=("encoder.layer.0", "encoder.layer.5"))
    profile = PlanProfile(name="p", device=DeviceSpec(speed=0.1, whole_model=False), link=LinkSpec(uplink_mbit=50.0),
                          server=ServerSpec(), source="test")
    plan = make_plan(result, profile)
    split = {(c.cut, c.defense): c for c in plan.candidates if c.placement == "split"}
    leaky = split[("encoder.layer.0", "none")]
    assert leaky.metric == "token_accuracy" and leaky.value == 0.6 and leaky.leakage == 0.6 and leaky.ssim is None
    assert plan.failed_limits(leaky) == ["token acc. ≤ 0.300"]
    rec = plan.candidates[plan.recommendation.index]
    assert rec.placement == "split" and rec.value <= 0.3 and "token acc. ≤ 0.300" in plan.recommendation.text
    # the command's --max-ssim is the leakage limit, on token accuracy here
    strict = make_plan(result, profile, flags=constraints_from_flags(max_ssim=0.1, max_accuracy_drop=0.05))
    assert strict.candidates[strict.recommendation.index].value == 0.05
    console = Console(width=160, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_plan(plan, console)
    out = console.export_text()
    assert "token acc." in out and "SSIM" not in out
