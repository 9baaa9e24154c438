"""The split planner: profiles, candidates, the Pareto front, the recommendation, sensitivity, and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splitaudit.cli import main
from splitaudit.plan import (
    Constraints,
    DeviceSpec,
    LinkSpec,
    PlanProfile,
    ServerSpec,
    choose,
    effective_limits,
    load_profile,
    make_plan,
    pareto_front,
    preset_names,
)
from splitaudit.results import AuditResult, CutInfo, ResultRow
from tests.conftest import write_tiny_npz

TINY = "tests/tiny.py:build"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *needles):
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


# --- a made-up audit --------------------------------------------------------------------------------
# Three cuts, the deeper the smaller the activation and the longer the head:
#   conv1  13,824 bytes, head 0.05 ms, tail 0.30 ms
#   conv2   4,096 bytes, head 0.20 ms, tail 0.15 ms
#   fc         40 bytes, head 0.40 ms, tail 0.01 ms;   the whole model 0.60 ms.
CUTS = (
    CutInfo(name="conv1", shape=(6, 24, 24), bytes_per_sample=13824, head_flops=100_000, head_latency_ms=0.05, index=0,
            tail_flops=500_000, tail_latency_ms=0.30),
    CutInfo(name="conv2", shape=(16, 8, 8), bytes_per_sample=4096, head_flops=400_000, head_latency_ms=0.20, index=1,
            tail_flops=200_000, tail_latency_ms=0.15),
    CutInfo(name="fc", shape=(10,), bytes_per_sample=40, head_flops=590_000, head_latency_ms=0.40, index=2,
            tail_flops=10_000, tail_latency_ms=0.01),
)


def row(cut: str, defense: str, ssim: float, *, acc: float = 0.95, adaptive: bool = False, **kw) -> ResultRow:
    head = {c.name: c.head_latency_ms for c in CUTS}[cut]
    over = 0.0 if defense == "none" else 0.01
    return ResultRow(
        cut=cut, defense=defense, attack="decoder", adaptive=adaptive, ssim=ssim, ssim_ci=(ssim - 0.01, ssim + 0.01), psnr=15.0,
        psnr_ci=(14.0, 16.0), baseline_ssim=0.1, n_eval=200, accuracy=acc, agreement=1.0 if defense == "none" else 0.97,
        latency_ms=head + over, latency_overhead_ms=over, **kw,
    )


def made_up(rows=None, *, threshold: float = 0.3, cuts=CUTS, **model) -> AuditResult:
    rows = rows if rows is not None else (row("conv1", "none", 0.25), row("conv2", "none", 0.20), row("fc", "none", 0.15))
    return AuditResult(
        created="2026-01-01T00:00:00+00:00", seed=0, model={"spec": "made-up", "flops": 600_000, "latency_ms": 0.6, **model},
        data={"spec": "made-up", "shape": [1, 28, 28]}, environment={}, cuts=cuts, results=tuple(rows), threshold=threshold,
    )


def profile(mbit: float = 8.0, *, speed: float = 0.1, rtt: float = 0.0, **server) -> PlanProfile:
    return PlanProfile(name="test", device=DeviceSpec(speed=speed), link=LinkSpec(uplink_mbit=mbit, rtt_ms=rtt),
                       server=ServerSpec(**server), source="test")


def by_label(plan, label: str):
    return next(c for c in plan.candidates if c.label == label)


# --- the Pareto front: exactly the non-dominated points -------------------------------------------------
def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# Few distinct values, so that ties and exact duplicates are common.
POINTS = st.lists(st.tuples(*[st.sampled_from([0.0, 0.5, 1.0, 2.0])] * 4), max_size=14)


@settings(max_examples=300, deadline=None)
@given(POINTS)
def test_front_holds_exactly_the_non_dominated_points(points):
    front = pareto_front(points)
    assert front == sorted(set(front))  # input order, no repeats
    members = set(front)
    for i in members:  # no point, member or not, dominates a member
        assert not any(dominates(q, points[i]) for q in points)
    for i in set(range(len(points))) - members:  # every other point is dominated by a member
        assert any(dominates(points[j], points[i]) for j in members)
    for i in members:  # duplicates of a member are members too
        assert all(j in members for j, q in enumerate(points) if q == points[i])
    if points:
        assert front  # a finite, non-empty set always has a non-dominated point


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(0.5, 1.0), st.sampled_from(["none", "noise:sigma=1", "quant:bits=4"]),
                       st.sampled_from(["ok", "not_converged", "failed"])), min_size=1, max_size=8),
    st.floats(0.01, 1000.0), st.sampled_from([None, 0.2, 0.5]), st.sampled_from([None, 2.0, 50.0]),
)
def test_plan_front_and_pick_on_random_audits(cells, mbit, max_ssim, max_latency):
    rows, seen = [], set()
    for k, (ssim, acc, defense, status) in enumerate(cells):
        cut = CUTS[k % 3].name
        if (cut, defense) in seen:
            continue
        seen.add((cut, defense))
        nan = status == "failed"
        rows.append(row(cut, defense, math.nan if nan else ssim, acc=acc, status=status, converged=status == "ok"))
    result = made_up(rows)
    plan = make_plan(result, profile(mbit), flags=Constraints(max_ssim=max_ssim, max_latency_ms=max_latency))
    coords = [(c.latency_ms, c.cost_per_million, c.leakage, c.utility_loss) for c in plan.candidates]
    assert all(all(math.isfinite(v) for v in p) for p in coords)
    front = set(plan.pareto)
    for i, p in enumerate(coords):
        assert (i in front) == (not any(dominates(q, p) for q in coords))
    for c in plan.candidates:  # a failed or unconverged attack never makes a candidate look private
        if c.placement == "split" and not c.verified:
            assert c.leakage == 1.0
    pick = plan.recommendation.index
    feasible = [c for c in plan.candidates if not plan.failed_limits(c)]
    if pick is None:
        assert not feasible and plan.recommendation.unmet
    else:
        assert pick in front  # the pick is never dominated
        best = min(feasible, key=lambda c: (c.latency_ms, c.cost_per_million, c.leakage, c.utility_loss, c.index))
        assert pick == best.index


# --- the recommendation follows the bandwidth --------------------------------------------------------
def test_recommendation_moves_to_a_deeper_smaller_cut_as_bandwidth_falls():
    # Device 10x slower than the audit machine, no RTT. End to end (ms, b in Mbit/s):
    #   conv1 0.8 + 110.6/b, conv2 2.15 + 32.8/b, fc 4.01 + 0.32/b, all on the device 6.0.
    # So: conv1 above ~57.6 Mbit/s, conv2 down to ~17.5, fc down to ~0.16, then the device alone.
    result = made_up()
    picks = []
    for mbit in (1000, 100, 30, 20, 10, 2, 0.5, 0.05):
        plan = make_plan(result, profile(mbit))
        c = plan.candidates[plan.recommendation.index]
        picks.append((mbit, c.label, c.bytes_sent))
    labels = [p[1] for p in picks]
    assert labels == ["cut conv1, no defense"] * 2 + ["cut conv2, no defense"] * 2 + ["cut fc, no defense"] * 3 + ["all on the device"]
    sent = [p[2] for p in picks]
    assert sent == sorted(sent, reverse=True)  # less and less on the wire as the link gets slower

    sens = make_plan(result, profile(8.0)).sensitivity
    assert [iv.label for iv in sens] == ["all on the device", "cut fc, no defense", "cut conv2, no defense", "cut conv1, no defense"]
    bounds = [iv.hi_mbit for iv in sens[:-1]]
    # where the lines cross: fc = device, conv2 = fc, conv1 = conv2
    for got, want in zip(bounds, (0.32 / 1.99, (32.768 - 0.32) / 1.86, (110.592 - 32.768) / 1.35)):
        assert got == pytest.approx(want, rel=1e-3)
    assert [iv.current for iv in sens] == [False, True, False, False]  # 8 Mbit/s: the fc interval
    for a, b in zip(sens, sens[1:]):
        assert a.hi_mbit == b.lo_mbit


def test_latency_and_cost_formulas():
    result = made_up()
    prof = PlanProfile(
        name="t", source="t", device=DeviceSpec(speed=0.5), link=LinkSpec(uplink_mbit=8.0, rtt_ms=40.0, price_per_gb=2.0),
        server=ServerSpec(speed=2.0, price_per_s=0.001, price_per_request=1e-6, ingress_per_gb=0.5, egress_per_gb=0.1, reply_bytes=100,
                          billed_increment_ms=1.0),
    )
    plan = make_plan(result, prof)
    c = by_label(plan, "cut conv2, no defense")
    assert c.device_ms == pytest.approx(0.2 / 0.5)
    assert c.transfer_ms == pytest.approx(4096 * 8 / 8e6 * 1e3 + 40.0)
    assert c.server_ms == pytest.approx(0.15 / 2.0)
    assert c.latency_ms == pytest.approx(c.device_ms + c.transfer_ms + c.server_ms)
    # billed: 0.075 ms rounds up to 1 ms
    per = 1e-3 * 0.001 + 1e-6 + 4096 * (2.0 + 0.5) / 1e9 + 100 * 0.1 / 1e9
    assert c.cost_per_million == pytest.approx(1e6 * per)
    dev = by_label(plan, "all on the device")
    assert dev.ssim is None and dev.leakage == 0.0 and dev.bytes_sent == 0 and dev.cost_per_million == 0.0
    assert dev.latency_ms == pytest.approx(0.6 / 0.5)
    srv = by_label(plan, "all on the server (raw input sent)")
    assert srv.ssim == 1.0 and srv.leakage == 1.0 and srv.bytes_sent == 28 * 28 and srv.device_ms == 0.0
    assert srv.server_ms == pytest.approx(0.6 / 2.0)
    # FLOP/s instead of measured time: compute from the counted FLOPs
    flops = replace(prof, device=DeviceSpec(speed=0.5, flops_per_s=1e8), server=replace(prof.server, flops_per_s=1e9))
    c = by_label(make_plan(result, flops), "cut conv2, no defense")
    assert c.device_ms == pytest.approx(400_000 / 1e8 * 1e3) and c.server_ms == pytest.approx(200_000 / 1e9 * 1e3)


def test_a_defense_sends_its_wire_bytes_and_costs_accuracy():
    rows = (row("conv1", "none", 0.9), row("conv1", "quant:bits=4", 0.25, bytes_per_sample=13824 // 8 + 8, acc=0.948),
            row("conv1", "noise:sigma=2", 0.1, acc=0.60, adaptive=True))
    plan = make_plan(made_up(rows), profile(1000.0, speed=0.05))  # the device alone: 12 ms
    q = by_label(plan, "cut conv1, quant:bits=4")
    assert q.bytes_sent == 13824 // 8 + 8 and q.utility_loss == pytest.approx(0.002)
    noise = by_label(plan, "cut conv1, noise:sigma=2")
    assert noise.utility_loss == pytest.approx(0.35)
    # noise leaks least but costs 35 points: the default limit (1 point) rules it out; quant is recommended
    assert plan.candidates[plan.recommendation.index] is q
    assert "accuracy loss ≤ 1.0 points" in plan.failed_limits(noise)
    loose = make_plan(made_up(rows), profile(1000.0, speed=0.05), flags=Constraints(max_accuracy_drop=0.5, max_ssim=0.2))
    assert loose.candidates[loose.recommendation.index] is by_label(loose, "cut conv1, noise:sigma=2")


def test_an_unconverged_or_failed_attack_never_reads_as_private():
    rows = (
        row("conv1", "none", 0.9),
        row("conv2", "none", 0.05, status="not_converged", converged=False),  # low, but only a lower bound
        row("fc", "none", math.nan, status="failed", converged=False, error="boom"),
        row("fc", "noise:sigma=1", 0.12, flags=("leaks less than the deeper cut x",)),
    )
    plan = make_plan(made_up(rows), profile(1000.0), flags=Constraints(max_ssim=0.2))
    for label in ("cut conv2, no defense", "cut fc, no defense", "cut fc, noise:sigma=1"):
        c = by_label(plan, label)
        assert not c.verified and c.leakage == 1.0 and "SSIM ≤ 0.200" in plan.failed_limits(c)
        assert any("unverified" in n for n in c.notes)
    assert by_label(plan, "cut fc, no defense").ssim is None
    # the only placement below 0.2 that is not a lower bound is the device alone
    assert plan.candidates[plan.recommendation.index].placement == "device"


def test_limits_default_to_the_audit_threshold_then_profile_then_flags():
    result = made_up(threshold=0.25)
    limits = {lim.key: (lim.value, lim.source) for lim in effective_limits(result, profile(), Constraints())}
    assert limits == {"max_ssim": (0.25, "default"), "max_accuracy_drop": (0.01, "default")}
    prof = replace(profile(), constraints=Constraints(max_ssim=0.4, max_latency_ms=50.0))
    limits = {lim.key: (lim.value, lim.source) for lim in effective_limits(result, prof, Constraints(max_latency_ms=20.0))}
    assert limits["max_ssim"] == (0.4, "profile") and limits["max_latency_ms"] == (20.0, "flag")
    assert choose(make_plan(result, prof).candidates, effective_limits(result, prof, Constraints()), "latency") is not None


def test_objective_cost_and_leakage():
    result = made_up()
    by_cost = make_plan(result, profile(1000.0, price_per_s=1.0), objective="cost")
    assert by_cost.candidates[by_cost.recommendation.index].placement == "device"  # free
    fast = make_plan(result, profile(1000.0, price_per_s=1.0))
    assert fast.candidates[fast.recommendation.index].label == "cut conv1, no defense"
    least = make_plan(result, profile(1000.0), flags=Constraints(max_latency_ms=5.0), objective="leakage")
    assert least.candidates[least.recommendation.index].label == "cut fc, no defense"  # the device alone is 6 ms


# --- unmet limits --------------------------------------------------------------------------------------
@pytest.fixture
def results_file(tmp_path) -> Path:
    return made_up().save(tmp_path / "results.json")


def test_a_limit_no_candidate_meets_exits_1_and_says_by_how_much(capsys, results_file):
    code, out, err = run(capsys, "plan", results_file, "--max-latency-ms", "0.5")
    assert code == 1, err
    text = " ".join(out.split())
    assert "no candidate has latency ≤ 0.500 ms; the fastest has latency 1.20 ms (all on the device), 0.700 ms over" in text, out


def test_limits_that_cannot_hold_together_exit_1_with_each_gap(capsys, results_file):
    # phone-4g at 1000 Mbit/s without RTT: every split is under 1 ms but leaks 0.15 or more; the device alone
    # leaks nothing but takes 0.6 / 0.5 = 1.2 ms.
    code, out, _ = run(capsys, "plan", results_file, "--bandwidth", "1000", "--rtt", "0", "--max-ssim", "0.1", "--max-latency-ms", "1",
                       "--profile", "phone-4g")
    assert code == 1
    text = " ".join(out.split())
    assert "no candidate meets every limit at once" in text
    assert "with the other limits met, the least leaky has SSIM 0.150 (cut fc, no defense), 0.050 over" in text, text
    assert "with the other limits met, the fastest has latency 1.20 ms (all on the device), 0.200 ms over" in text, text


def test_the_example_of_the_issue(capsys, tmp_path, results_file):
    # A device that cannot run the whole model: nothing is below 0.1, and the message says the closest.
    (tmp_path / "p.toml").write_text('[device]\nspeed = 0.5\nwhole_model = false\n[link]\nuplink_mbit = 8\n')
    code, out, _ = run(capsys, "plan", results_file, "--profile", tmp_path / "p.toml", "--max-ssim", "0.1")
    assert code == 1
    assert "no candidate has SSIM ≤ 0.100; the least leaky has SSIM 0.150 (cut fc, no defense), 0.050 over" in " ".join(out.split())


def test_without_explicit_limits_the_plan_exits_0(capsys, results_file):
    code, out, err = run(capsys, "plan", results_file)
    assert code == 0, err
    assert "recommendation:" in out and "phone-4g" in out and "uplink Mbit/s" in out


# --- the --json shape -------------------------------------------------------------------------------------
def test_json_shape(capsys, results_file):
    code, out, err = run(capsys, "plan", results_file, "--profile", "camera-wifi", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert {"candidates", "pareto", "recommendation", "sensitivity", "profile", "limits", "objective"} <= set(d)
    assert d["profile"]["name"] == "camera-wifi" and d["profile"]["link"]["uplink_mbit"] == 20.0
    cands = d["candidates"]
    assert len(cands) == 3 + 2 and [c["index"] for c in cands] == list(range(5))
    assert {c["placement"] for c in cands} == {"split", "device", "server"}
    for c in cands:
        assert {"label", "cut", "defense", "ssim", "leakage", "verified", "bytes_sent", "device_ms", "transfer_ms", "server_ms",
                "latency_ms", "cost_per_million", "accuracy", "agreement", "utility_loss", "pareto", "fails"} <= set(c)
        assert c["latency_ms"] == pytest.approx(c["device_ms"] + c["transfer_ms"] + c["server_ms"])
    assert all(isinstance(i, int) and 0 <= i < len(cands) for i in d["pareto"])
    assert [c["pareto"] for c in cands] == [c["index"] in d["pareto"] for c in cands]
    rec = d["recommendation"]
    assert rec["index"] in d["pareto"] and rec["candidate"]["index"] == rec["index"] and rec["text"]
    assert d["sensitivity"][0]["lo_mbit"] <= 20.0 <= d["sensitivity"][-1]["hi_mbit"]
    assert sum(iv["current"] for iv in d["sensitivity"]) == 1


def test_json_when_unmet(capsys, results_file):
    code, out, _ = run(capsys, "plan", results_file, "--json", "--max-cost", "0", "--min-accuracy", "0.99")
    assert code == 1
    rec = json.loads(out)["recommendation"]
    assert rec["index"] is None and rec["candidate"] is None
    assert rec["unmet"] and "accuracy ≥ 99.0%" in rec["unmet"][0]


# --- profiles ---------------------------------------------------------------------------------------------
def test_presets_load_and_cite_their_figures():
    names = preset_names()
    assert len(names) >= 3 and "phone-4g" in names
    for name in names:
        p = load_profile(name)
        assert p.name == name and p.description and p.link.uplink_mbit > 0
        text = (Path(__file__).parents[1] / "audit" / "plan_profiles" / f"{name}.toml").read_text()
        assert "approximate" in text.lower() and "2024" in text
        for key in ("uplink_mbit", "rtt_ms", "price_per_s"):  # each figure has a comment with its source just above it
            lines = text.splitlines()
            i = next(k for k, ln in enumerate(lines) if ln.startswith(key))
            assert any(ln.startswith("#") for ln in lines[max(0, i - 4) : i]) or "#" in lines[i], (name, key)
        plan = make_plan(made_up(), p)
        assert plan.recommendation.index is not None


def test_a_user_profile_file(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text('name = "edge"\ncurrency = "EUR"\n[device]\nflops_per_s = 1e9\n[link]\nuplink_mbit = 100\nrtt_ms = 2\n'
                    '[server]\nprice_per_s = 0.00001\n[constraints]\nmax_latency_ms = 30\n')
    p = load_profile(str(path))
    assert p.name == "edge" and p.currency == "EUR" and p.device.flops_per_s == 1e9 and p.device.speed == 1.0
    assert p.constraints.max_latency_ms == 30.0 and p.link.price_per_gb == 0.0
    assert p.with_link(bandwidth=5, rtt=7).link == LinkSpec(uplink_mbit=5.0, rtt_ms=7.0)


BAD_PROFILES = [
    ('[link]\nuplink_mbit = 8\nspeeed = 1\n', "unknown key 'speeed' in [link]"),
    ('colour = "red"\n[link]\nuplink_mbit = 8\n', "unknown key 'colour'"),
    ('[device]\nsped = 0.5\n[link]\nuplink_mbit = 8\n', "did you mean 'speed'?"),
    ('[link]\nuplink_mbit = -8\n', "uplink_mbit=-8 is out of range"),
    ('[link]\nuplink_mbit = 0\n', "out of range"),
    ('[link]\nuplink_mbit = "fast"\n', "must be a finite number"),
    ('[link]\nuplink_mbit = true\n', "must be a finite number"),
    ('[link]\nuplink_mbit = nan\n', "must be a finite number"),
    ('[link]\nrtt_ms = 20\n', "no uplink_mbit"),
    ('[device]\nspeed = 1\n', "no [link] table"),
    ('[server]\nreply_bytes = 1.5\n[link]\nuplink_mbit = 8\n', "must be an integer"),
    ('[server]\nprice_per_s = -1\n[link]\nuplink_mbit = 8\n', "price_per_s=-1 is out of range"),
    ('[device]\nwhole_model = "no"\n[link]\nuplink_mbit = 8\n', "true or false"),
    ('[constraints]\nmax_ssim = 1.5\n[link]\nuplink_mbit = 8\n', "max_ssim=1.5 is out of range"),
    ('link = 3\n', "must be a table"),
    ('[link\nuplink_mbit = 8\n', "is not valid TOML"),
    ('name = 3\n[link]\nuplink_mbit = 8\n', "name in"),
]


@pytest.mark.parametrize("text,needle", BAD_PROFILES)
def test_a_bad_profile_file_is_exit_2(capsys, tmp_path, results_file, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    code, _, err = run(capsys, "plan", results_file, "--profile", path)
    assert_user_error(code, err, needle)


@pytest.mark.parametrize("argv,needle", [
    (["--profile", "no-such-preset"], "unknown plan profile 'no-such-preset'; presets: camera-wifi"),
    (["--profile", "missing/profile.toml"], "not found"),
    (["--bandwidth", "-3"], "--bandwidth must be a positive number"),
    (["--bandwidth", "0"], "--bandwidth must be a positive number"),
    (["--rtt", "-1"], "--rtt must be"),
    (["--max-ssim", "2"], "--max-ssim: max_ssim=2 is out of range"),
    (["--min-accuracy", "1.5"], "out of range"),
    (["--max-latency-ms", "0"], "out of range"),
    (["--objective", "speed"], "speed"),
])
def test_bad_plan_flags_are_exit_2(capsys, results_file, argv, needle):
    code, _, err = run(capsys, "plan", results_file, *argv)
    assert_user_error(code, err, needle)


def test_results_without_tail_measurements_are_exit_2(capsys, tmp_path):
    old = made_up(cuts=tuple(replace(c, tail_flops=None, tail_latency_ms=None) for c in CUTS))
    code, _, err = run(capsys, "plan", old.save(tmp_path / "old.json"))
    assert_user_error(code, err, "no server-side (tail) measurements", "run the audit again")
    code, _, err = run(capsys, "plan", tmp_path / "nope.json")
    assert_user_error(code, err, "not found")


# --- the plan in results.json and the report ----------------------------------------------------------------
def test_plan_round_trips_in_results_json(tmp_path):
    result = made_up()
    with_plan = replace(result, plan=make_plan(result, load_profile("iot-nbiot")).to_dict())
    back = AuditResult.load(with_plan.save(tmp_path / "r.json"))
    assert back.plan == json.loads(json.dumps(with_plan.plan))
    assert back.cuts == result.cuts and back.results == result.results
    assert "plan" not in json.loads(result.save(tmp_path / "none.json").read_text())  # no key without a plan


def test_report_renders_the_plan_escaped_and_self_contained(tmp_path, capsys):
    from tests.test_report import EVIL, _tags, _visible_text

    evil_cuts = tuple(replace(c, name=f"{c.name}{EVIL}") for c in CUTS)
    rows = tuple(replace(r, cut=f"{r.cut}{EVIL}") for r in made_up().results)
    result = made_up(rows, cuts=evil_cuts)
    path = result.save(tmp_path / "results.json")
    code, _, err = run(capsys, "report", path, "-o", tmp_path / "r.html", "--plan-profile", "camera-wifi")
    assert code == 0, err
    page = (tmp_path / "r.html").read_text()
    assert json.loads(path.read_text()).get("plan") is None  # the report command leaves results.json alone
    start = page.index('<section id="plan">')
    section = _visible_text(page[start : page.index("</section>", start)])
    assert "6. Where to cut" in section and "Recommendation:" in section and "If the bandwidth changes" in section
    assert f"cut fc{EVIL}, no defense" in section  # shown as written ...
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page  # ... never as markup
    for t, attrs in _tags(page):
        assert t != "script"
        for k, v in attrs:
            assert not k.startswith("on"), (t, k)
            if k in ("src", "href"):
                assert v.startswith(("data:", "#")), (t, k, v)
    assert page.index('<section id="costs">') < start < page.index('<section id="threat">')
    assert "7. Threat model" in page and "8. Reproducibility" in page


# --- end to end: a real tiny audit -----------------------------------------------------------------------
def test_audit_with_a_plan_profile_records_tails_and_the_plan(capsys, tmp_path):
    npz = write_tiny_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "audit", "--model", TINY, "--data", npz, "--cut", "stem", "--cut", "fc", "--profile", "quick",
                            "--out", out, "--plan-profile", "camera-wifi")
    assert code == 0, err
    raw = json.loads((out / "results.json").read_text())
    full = raw["model"]["flops"]
    assert full > 0 and raw["model"]["latency_ms"] > 0
    for c in raw["cuts"]:
        assert c["tail_flops"] + c["head_flops"] == full
        assert c["tail_latency_ms"] > 0
    assert {c["name"]: c["tail_flops"] for c in raw["cuts"]}["fc"] == 0
    plan = raw["plan"]
    assert plan["profile"]["name"] == "camera-wifi" and len(plan["candidates"]) == 2 + 2
    assert AuditResult.load(out / "results.json").plan == plan
    assert '<section id="plan">' in (out / "report.html").read_text()
    assert "where to cut (camera-wifi)" in stdout
    # ... and `splitaudit cuts` shows the same split of the FLOPs
    code, stdout, err = run(capsys, "cuts", "--model", TINY, "--input-shape", "1,12,12", "--json")
    assert code == 0, err
    cuts = {c["name"]: c for c in json.loads(stdout)}
    assert cuts["stem"]["head_flops"] + cuts["stem"]["tail_flops"] == full and cuts["fc"]["tail_flops"] == 0
    assert all(c["tail_latency_ms"] >= 0 for c in cuts.values())


def test_a_bad_plan_profile_fails_before_the_audit_runs(capsys, tmp_path):
    code, _, err = run(capsys, "audit", "--model", TINY, "--data", tmp_path / "missing.npz", "--plan-profile", "nope")
    assert_user_error(code, err, "unknown plan profile 'nope'")


def test_the_readme_profile_example_loads(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("### Deployment profiles") :]
    block = section[section.index("```toml\n") + len("```toml\n") : section.index("```", section.index("```toml\n") + 7)]
    (tmp_path / "p.toml").write_text(block)
    p = load_profile(str(tmp_path / "p.toml"))
    assert p.name == "my-deployment" and p.link.uplink_mbit == 8.0 and p.constraints.max_latency_ms == 100.0
    for name in preset_names():
        assert f"`{name}`" in readme
