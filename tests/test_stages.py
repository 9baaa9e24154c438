"""The stages on their own: the job graph, the assessment, the writer. Pure functions, no audit run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from splitaudit.assess import NO_CONCLUSION, NO_LEAKAGE_BEYOND_PRIOR, NOT_RECOGNIZABLE, RECOGNIZABLE, assess
from splitaudit.defenses import make_defense
from splitaudit.jobs import plan_cut
from splitaudit.results import AuditResult, CutInfo, ResultRow
from splitaudit.writer import write

NOISE = "noise:sigma=1,kind=gaussian"
DP = "dpsgd:epsilon=8,delta=1e-05,epochs=2,max_grad_norm=1,lr=0.05,batch_size=256,accountant=rdp"


# ------------------------------------------------------------------------------------------------
# the job graph
# ------------------------------------------------------------------------------------------------
def _graph(attacks, defenses, epochs=2):
    return plan_cut("c", attacks=attacks, defenses=[make_defense(d) for d in defenses], profile="quick", seed=3,
                    adaptive_epochs=epochs)


def test_a_warm_starting_attack_fits_once_then_refines_with_equal_budgets():
    jobs = _graph(["decoder"], ["none", "noise:sigma=1", "dpsgd:epsilon=8"])
    assert [(j.role, j.spec.kind, j.after) for j in jobs] == [
        ("base", "fit", None), ("extend", "extend", "base"), ("clean", "refine", "extend"), (NOISE, "refine", "clean"),
        (DP, "refine", "clean")]
    # the base's extension is granted by the ledger; every refinement starts from it with the same budget, so no
    # defense looks leaky (or private) from training alone
    assert jobs[0].spec.ledgered and not any(j.spec.ledgered for j in jobs[1:])
    assert jobs[1].spec.epochs is None  # the grant is the driver's to decide
    assert {j.spec.epochs for j in jobs if j.spec.kind == "refine"} == {2}
    clean = jobs[2].spec
    assert clean.score == ("none", NOISE, DP)  # the undefended attacker is scored on every defense: the non-adaptive rows
    assert [j.spec.score for j in jobs[3:]] == [(NOISE,), (DP,)]
    assert jobs[0].spec.score == jobs[1].spec.score == ()  # base and extension are never scored: only the refinements' start
    assert len({j.spec.id for j in jobs}) == len(jobs)


def test_an_attack_that_cannot_warm_start_is_fitted_afresh_per_defense():
    jobs = _graph(["rmle"], ["none", "noise:sigma=1"])
    assert [(j.role, j.spec.kind, j.spec.epochs, j.after) for j in jobs] == [("clean", "fit", None, None), (NOISE, "fit", None, None)]


def test_an_attack_that_learns_nothing_is_refitted_only_for_a_changed_model(monkeypatch):
    from splitaudit.attacks.base import ATTACKS

    monkeypatch.setattr(ATTACKS["rmle"], "needs_fit", False)
    jobs = _graph(["rmle"], ["none", "noise:sigma=1", "dpsgd:epsilon=8"])
    assert [j.role for j in jobs] == ["clean", DP]  # noise changes the activation, not what the attack could learn


def test_the_graph_lists_every_attack_and_only_depends_on_its_arguments():
    a = _graph(["decoder", "rmle"], ["none", "noise:sigma=1"])
    assert a == _graph(["decoder", "rmle"], ["none", "noise:sigma=1"])
    assert [j.spec.attack for j in a] == ["decoder"] * 4 + ["rmle"] * 2
    assert all(j.spec.seed == 3 and j.spec.cut == "c" for j in a)


# ------------------------------------------------------------------------------------------------
# the assessment: one table of cases
# ------------------------------------------------------------------------------------------------
def _row(attack="decoder", adaptive=False, ssim=0.2, status="ok", flags=(), defense="none", gain=None, reid=0.001, n=500):
    failed = status == "failed"
    gain = ssim - 0.1 if gain is None else gain  # the no-information guess scores 0.1 unless said otherwise
    extra = {} if failed else dict(ssim_gain=gain, ssim_gain_ci=(gain - 0.02, gain + 0.02), reid_top1=reid,
                                   reid_top1_ci=(max(0.0, reid - 0.004), reid + 0.004), reid_chance=1 / n)
    return ResultRow(cut="c", defense=defense, attack=attack, adaptive=adaptive, ssim=math.nan if failed else ssim,
                     ssim_ci=(math.nan, math.nan) if failed else (ssim - 0.01, ssim + 0.01), psnr=20.0, psnr_ci=(19.0, 21.0),
                     baseline_ssim=0.1, n_eval=n, status=status, converged=status == "ok", flags=tuple(flags),
                     error="boom" if failed else None, **extra)


def _result(*rows, threshold=0.3):
    cut = CutInfo(name="c", shape=(4, 6, 6), bytes_per_sample=576, head_flops=10, head_latency_ms=0.1)
    return AuditResult(created="t", seed=0, model={"spec": "m"}, data={"spec": "d"}, environment={}, cuts=(cut,), results=rows,
                       threshold=threshold)


@pytest.mark.parametrize("rows, status, head, words", [
    # every attack converged, stays under the threshold, beats the prior, re-identifies at chance: not recognizable
    ([_row(ssim=0.2), _row("rmle", ssim=0.25)], NOT_RECOGNIZABLE, ("rmle", False), "every attack converged"),
    # the strongest attack is the headline, adaptive or not; over the threshold and above the prior is recognizable
    ([_row(ssim=0.2, defense=NOISE), _row(adaptive=True, ssim=0.45, defense=NOISE)], RECOGNIZABLE, ("decoder", True), "excludes 0"),
    # a strong prior: SSIM over the threshold, but no better than the mean image (aligned faces): no leakage beyond the prior
    ([_row(ssim=0.33, gain=-0.01)], NO_LEAKAGE_BEYOND_PRIOR, ("decoder", False), "no better than the no-information guess"),
    # ... unless the reconstructions pick their own inputs out: identity leaks whatever SSIM says
    ([_row(ssim=0.2, gain=0.0, reid=0.2)], RECOGNIZABLE, ("decoder", False), "re-identifies 20.0%"),
    # re-identification above chance but under the threshold: not recognizable, and said
    ([_row(ssim=0.2, reid=0.02)], NOT_RECOGNIZABLE, ("decoder", False), "above chance, below the threshold"),
    # an interval that straddles the threshold: the sample is too small to decide
    ([_row(ssim=0.3)], NO_CONCLUSION, ("decoder", False), "straddles the threshold 0.3"),
    ([_row(ssim=0.2, reid=0.05)], NO_CONCLUSION, ("decoder", False), "straddles the re-identification threshold"),
    # the adaptive attack failed and the naive one survived low: no conclusion, never "not recognizable"
    ([_row(adaptive=True, status="failed", defense=NOISE), _row(ssim=0.1, defense=NOISE)], NO_CONCLUSION, ("decoder", False), "failed"),
    # an unconverged attack makes the low headline a lower bound
    ([_row(ssim=0.15), _row("rmle", ssim=0.05, status="not_converged")], NO_CONCLUSION, ("decoder", False), "did not converge"),
    # a headline flagged as under-trained (leaks less than a deeper cut) is a lower bound too
    ([_row(ssim=0.15, flags=("leaks less than the deeper cut d",))], NO_CONCLUSION, ("decoder", False), "deeper cut"),
    # a recognizable reconstruction stays evidence of leakage even when another attack failed
    ([_row(ssim=0.8), _row("rmle", status="failed")], RECOGNIZABLE, ("decoder", False), "rmle failed"),
    # every attack failed: shown, as a failure with no headline
    ([_row(status="failed"), _row("rmle", status="failed")], NO_CONCLUSION, None, "every attack failed"),
])
def test_assessment_cases(rows, status, head, words):
    defense = rows[0].defense
    a = assess(_result(*rows), "c", defense)
    assert a.status == status, a.reasons
    assert (None if a.headline is None else (a.headline.attack, a.headline.adaptive)) == head
    assert any(words in r for r in a.reasons), a.reasons
    if head is not None:  # a verdict that rests on a threshold names it, the interval and n
        assert any("n=500" in r and "95% CI" in r for r in a.reasons), a.reasons


def test_results_without_gains_are_judged_by_ssim_alone():
    old = ResultRow(cut="c", defense="none", attack="decoder", adaptive=False, ssim=0.6, ssim_ci=(0.55, 0.65), psnr=20.0,
                    psnr_ci=(19.0, 21.0), baseline_ssim=0.1, n_eval=100)
    assert assess(_result(old), "c", "none").status == RECOGNIZABLE


def test_every_view_reads_the_one_assessment():
    """The gate, the planner, the console and the JSON render the assessment; none decides on its own."""
    from splitaudit.gate import GateConfig, evaluate
    from splitaudit.report.console import audit_table

    r = _result(_row(adaptive=True, status="failed", defense=NOISE), _row(ssim=0.1, defense=NOISE))
    a = r.assessment("c", NOISE)
    assert a.status == NO_CONCLUSION
    checks = evaluate(r, GateConfig(defenses=(NOISE,))).checks
    assert [c.passed for c in checks if c.metric == "max_ssim"] == [False]  # the green-looking 0.1 does not pass
    assert r.to_dict()["assessment"] == [{"cut": "c", "defense": NOISE, "status": "no_conclusion",
                                          "headline": {"attack": "decoder", "adaptive": False, "index": 1},
                                          "reasons": list(a.reasons)}]
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(audit_table(_result(_row(status="failed"))))
    assert "ALL FAILED" in console.export_text()  # a pair where every attack failed is shown, as a failure


# ------------------------------------------------------------------------------------------------
# the writer
# ------------------------------------------------------------------------------------------------
def test_the_writer_writes_images_results_and_report(tmp_path):
    from splitaudit.report.images import grid_png

    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    png = grid_png(x, x, fixed=torch.arange(2), worst=torch.arange(2, 4))
    row = _row(ssim=0.9)
    rel = "images/c__none__decoder-00000000.png"
    r = _result(ResultRow(**{**row.__dict__, "images": rel}))
    r = AuditResult(**{**r.__dict__, "grids": {rel: png}})
    path = write(r, tmp_path / "out")
    assert (tmp_path / "out" / rel).read_bytes() == png
    saved = json.loads(path.read_text())
    assert saved["results"][0]["images"] == rel and "grids" not in saved
    assert saved["assessment"][0]["status"] == RECOGNIZABLE
    assert AuditResult.load(path).results == r.results
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html  # the grid is embedded from the folder the writer wrote


def test_the_writer_says_why_it_cannot_write(tmp_path):
    from splitaudit.errors import UserError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write the results"):
        write(_result(_row()), blocker / "out")
    assert not (blocker.parent / "out").exists()


def test_the_console_table_fits_a_ci_log_and_a_terminal_without_wrapping():
    from rich.console import Console

    from splitaudit.report.console import audit_table

    specs = ["none", "noise:sigma=0.5,kind=gaussian", "noise:sigma=2,kind=gaussian", "dropout:p=0.5", DP]
    rows, cuts = [], []
    for i, cut in enumerate(["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2", "relu4", "fc3"]):
        cuts.append(CutInfo(name=cut, shape=(6, 28, 28), bytes_per_sample=18816, head_flops=10, head_latency_ms=0.1, index=i))
        for d in specs:
            rows.append(ResultRow(**{**_row(ssim=0.9 - 0.05 * i, defense=d).__dict__, "cut": cut, "accuracy": 0.95}))
    result = AuditResult(created="t", seed=0, model={"spec": "m"}, data={"spec": "d"}, environment={}, cuts=tuple(cuts),
                         results=tuple(rows))
    for width in (80, 120):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
        console.print(audit_table(result, width))
        lines = [ln.rstrip() for ln in console.export_text().splitlines()]
        body = [ln for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("cut "))) + 2:] if ln]
        assert len(body) == 55  # one line per (cut, defense): nothing wrapped
        assert max(len(ln) for ln in lines[1:]) <= width
        assert len(set(body)) == 55  # no two rows look alike (the noise levels keep their sigma)
        assert any("noise:sigma=0.5" in ln for ln in body) and any("noise:sigma=2 " in ln for ln in body)


# ------------------------------------------------------------------------------------------------
# identity: re-identification, the gate's identity keys and the Markdown summary
# ------------------------------------------------------------------------------------------------
def test_reidentification_finds_each_input_when_the_reconstruction_is_closest_to_it():
    from splitaudit.judge import reidentified

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    assert reidentified(x + 0.01 * torch.randn(50, 8, generator=g), x).mean() == 1.0
    shuffled = x[torch.randperm(50, generator=g)]
    assert reidentified(shuffled, x).mean() < 0.2  # a reconstruction closest to another input does not count
    prior = x.mean(dim=0, keepdim=True).expand_as(x)
    assert reidentified(prior, x).sum() <= 1  # the no-information guess identifies at most one input
    assert torch.equal(reidentified(x, x, chunk=7), reidentified(x, x))  # chunking changes nothing


def test_the_gate_checks_identity_and_writes_a_markdown_summary(tmp_path):
    from splitaudit.gate import GateConfig, Rule, append_summary, assert_max_reid, assert_max_ssim_gain, evaluate

    r = _result(_row(ssim=0.25, reid=0.2, n=100))
    cfg = GateConfig(thresholds={"max_ssim": 0.3, "max_reid": 0.1, "max_reid_over_chance": 30.0, "max_ssim_gain": 0.2},
                     rules=(Rule(cut="c", defense=None, limits={"max_attack_accuracy": 0.5}),))
    checks = {c.metric: c for c in evaluate(r, cfg).checks}
    assert checks["max_ssim"].passed  # 0.25 <= 0.3 ...
    assert not checks["max_reid"].passed and "0.200 > limit 0.100" in checks["max_reid"].message  # ... but identity leaks
    assert checks["max_reid_over_chance"].value == pytest.approx(20.0) and checks["max_reid_over_chance"].passed
    assert checks["max_ssim_gain"].passed and checks["max_ssim_gain"].value == pytest.approx(0.15)
    assert not checks["max_attack_accuracy"].passed and "was not measured" in checks["max_attack_accuracy"].message
    assert r.assessment("c", "none").status == RECOGNIZABLE  # 20% re-identified > the 5% threshold
    with pytest.raises(AssertionError, match="re-identified share"):
        assert_max_reid(r, cut="c", limit=0.1)
    assert_max_ssim_gain(r, cut="c", limit=0.2)
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    report = evaluate(r, cfg)
    append_summary(report, r, summary)
    text = summary.read_text()
    assert text.startswith("earlier step\n## splitaudit gate: FAILED")  # appended, as GITHUB_STEP_SUMMARY expects
    assert "| `c` | `none` | recognizable | 0.250 [0.240, 0.260] | +0.150 | 20.0% | - |" in text
    assert "### Failed checks" in text and "`c / none: max_reid`" in text


def test_gate_summary_flag_from_the_cli(tmp_path, capsys):
    from splitaudit.cli import main

    r = _result(_row(ssim=0.1))
    r.save(tmp_path / "results.json")
    (tmp_path / "splitaudit.toml").write_text("[thresholds]\nmax_ssim = 0.3\nmax_reid = 0.5\n")
    code = main(["gate", "--config", str(tmp_path / "splitaudit.toml"), "--results", str(tmp_path / "results.json"),
                 "--summary", str(tmp_path / "s.md")])
    assert code == 0, capsys.readouterr()
    assert "## splitaudit gate: passed" in (tmp_path / "s.md").read_text()
