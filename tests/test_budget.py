"""Budget by difficulty: the flattening rule, the training loop's plateau stop, the ledger's grants, and a tiny
audit where a flattened cut stops early while an improving one is extended (and an identical rerun hits the cache)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from splitaudit.attacks.training import Plateau, TrainConfig, flattened, train
from splitaudit.ledger import Ledger, Outcome

# ------------------------------------------------------------------------------------------------
# the rule, on synthetic curves
# ------------------------------------------------------------------------------------------------


def test_a_loss_that_still_halves_but_has_made_its_gain_is_flattened_and_one_far_from_it_is_not():
    # conv1: MSE at 1e-4 against a guess at 0.07, still halving: its gain over the guess is all made
    assert flattened([4e-4, 3e-4, 2e-4, 1e-4], 0.07, window=3, share=0.015, higher_is_better=False)
    # fc3: 0.040 against 0.069, gaining 0.001 an epoch: 10% of its gain over three epochs
    assert not flattened([0.043, 0.042, 0.041, 0.040], 0.069, window=3, share=0.015, higher_is_better=False)


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_the_rule_does_not_depend_on_the_scale(scale):
    curve = [0.05, 0.03, 0.0295, 0.0292, 0.0291]
    flat = flattened([v * scale for v in curve], 0.07 * scale, window=3, share=0.05, higher_is_better=False)
    still = flattened([v * scale for v in curve[:3]], 0.07 * scale, window=2, share=0.05, higher_is_better=False)
    assert flat and not still


def test_a_score_curve_flattens_near_its_ceiling_not_on_its_way_there():
    prior = 0.12  # the mean image's SSIM
    rising = [0.90, 0.93, 0.95, 0.97]  # +0.07 over 3 epochs: 8% of the gain
    saturated = [0.9950, 0.9960, 0.9965, 0.9968]  # +0.0018: 0.2% of the gain
    assert not flattened(rising, prior, window=3, share=0.005)
    assert flattened(saturated, prior, window=3, share=0.005)


def test_a_noisy_plateau_reads_as_one_and_a_new_best_resets_it():
    prior = 0.1
    noisy = [0.80, 0.85, 0.84, 0.83, 0.849]  # nothing better than 0.85 for three epochs
    assert flattened(noisy, prior, window=3, share=0.005)
    assert not flattened(noisy + [0.90], prior, window=3, share=0.005)


def test_a_curve_that_has_not_beaten_the_guess_or_is_too_short_has_not_flattened():
    assert not flattened([0.05, 0.05, 0.05, 0.05], 0.1, window=3, share=0.01)  # a score below the guess's 0.1
    assert not flattened([0.9, 0.9, 0.9], 0.1, window=3, share=0.01)  # three epochs cannot show a window of three
    assert not flattened([0.9, 0.9, 0.9, 0.9], 0.1, window=3, share=0.0)  # the rule switched off
    assert flattened([0.9, math.nan, 0.9, 0.9], 0.1, window=3, share=0.01)  # a NaN epoch is no improvement, never a new best


# ------------------------------------------------------------------------------------------------
# the training loop
# ------------------------------------------------------------------------------------------------


def _regression(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    return x, y


def _loss(m, b):
    return nn.functional.mse_loss(m(b[0]), b[1])


def test_train_stops_a_flattened_run_and_says_why():
    x, y = _regression()
    cfg = TrainConfig(epochs=200, lr=0.05, batch_size=32, patience=3)
    model = nn.Linear(4, 1)
    prior = float(y.var())
    res = train(model, _loss, (x[:200], y[:200]), config=cfg, generator=torch.Generator().manual_seed(0), val_data=(x[200:], y[200:]),
                plateau=Plateau(share=0.01, prior=prior))
    assert res.stop == "flattened" and res.epochs_run < 200
    assert len(res.watched) == res.epochs_run and res.best_val < 1e-2 * prior
    # the same run without the rule goes on until patience stops it, or its budget ends
    other = train(nn.Linear(4, 1), _loss, (x[:200], y[:200]), config=cfg, generator=torch.Generator().manual_seed(0),
                  val_data=(x[200:], y[200:]))
    assert other.stop in ("no_improvement", "budget") and other.epochs_run > res.epochs_run


def test_a_score_plateau_is_watched_in_eval_mode():
    x, y = _regression()
    seen = []

    def score(m):
        seen.append(m.training)
        return -float(_loss(m, (x[200:], y[200:])))

    train(nn.Sequential(nn.Linear(4, 1), nn.Dropout(0.1)), _loss, (x[:200], y[:200]), config=TrainConfig(epochs=4, lr=0.05, patience=3),
          generator=torch.Generator().manual_seed(0), val_data=(x[200:], y[200:]), plateau=Plateau(share=0.01, prior=-float(y.var()), score=score))
    assert seen and not any(seen)


def test_a_resumed_run_never_ends_worse_than_its_start():
    x, y = _regression()
    model = nn.Linear(4, 1)
    with torch.no_grad():  # start at the solution; a huge learning rate can only make it worse
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
        model.bias.zero_()
    res = train(model, _loss, (x[:200], y[:200]), config=TrainConfig(epochs=3, lr=5.0, patience=None, keep_start=True),
                generator=torch.Generator().manual_seed(0), val_data=(x[200:], y[200:]))
    assert res.best_epoch == 0 and res.start_val is not None and res.start_val < 1e-10
    assert torch.allclose(model.weight, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))


# ------------------------------------------------------------------------------------------------
# the ledger
# ------------------------------------------------------------------------------------------------
CUTS = ["conv1", "pool1", "fc1", "fc2", "fc3"]
COST = {"conv1": 8.0, "pool1": 4.0, "fc1": 1.0, "fc2": 1.0, "fc3": 1.0}  # FLOPs per epoch: a shallow cut's epoch costs more


def _ledger(nominal=10, cap=3.0, cuts=CUTS, cost=COST):
    return Ledger(cuts, cost, nominal_epochs=nominal, cap=cap)


OUTCOMES = {
    "conv1": Outcome(4, False, "flattened"),  # saves 6 epochs x 8 = 48
    "pool1": Outcome(10, True, "budget"),
    "fc1": Outcome(10, True, "budget"),
    "fc2": Outcome(5, False, "flattened"),  # saves 5
    "fc3": Outcome(10, True, "budget"),
}


def _grants(order):
    ledger = _ledger()
    for c in order:
        ledger.record(c, OUTCOMES[c])
    return {c: ledger.grant(c) for c in CUTS}, ledger.summary()


def test_grants_do_not_depend_on_the_order_outcomes_arrive_in():
    first = _grants(CUTS)
    for order in itertools.islice(itertools.permutations(CUTS), 0, 120, 7):
        assert _grants(order) == first


def test_a_flattened_cuts_savings_buy_the_cheap_improving_cuts_many_epochs():
    g, summary = _grants(CUTS)
    assert g["conv1"].epochs == 0 and g["conv1"].reason == "flattened"
    assert g["fc2"].epochs == 0
    # pool1 gets its nominal share of conv1's 48: 48 x 40 / (40 + 10 + 10 + 10) = 27.4 -> 6 epochs of 4
    assert g["pool1"].epochs == 6 and g["pool1"].sources == {"conv1": 24.0}
    # fc1: (48 - 24) x 10 / 30 = 8 -> 8 epochs of 1 (eight epochs from one conv1 epoch)
    assert g["fc1"].epochs == 8
    # fc3, the last: all that is left of conv1's and fc2's savings (16 + 5), capped at 3x its nominal 10 epochs
    assert g["fc3"].epochs == 20 and g["fc3"].reason == "cap"
    assert g["fc3"].sources == pytest.approx({"conv1": 16 * 20 / 21, "fc2": 5 * 20 / 21})
    moved = summary["moved"]
    assert {m["from"] for m in moved} == {"conv1", "fc2"} and {m["to"] for m in moved} == {"pool1", "fc1", "fc3"}
    assert sum(m["flops"] for m in moved) == pytest.approx(sum(x.flops for x in g.values()), rel=1e-3)
    assert summary["granted"] == pytest.approx(24 + 8 + 20)


def test_a_grant_waits_for_the_cuts_before_it_and_no_others():
    ledger = _ledger()
    ledger.record("fc1", OUTCOMES["fc1"])
    assert ledger.grant("fc1") is None  # conv1 and pool1 are not in yet
    ledger.record("conv1", OUTCOMES["conv1"])
    assert ledger.grant("conv1").epochs == 0 and ledger.grant("fc1") is None
    ledger.record("pool1", OUTCOMES["pool1"])
    assert ledger.grant("fc1") is not None  # fc2 and fc3, after it, change nothing
    with pytest.raises(ValueError):
        ledger.record("fc1", Outcome(3, False, "flattened"))  # an outcome is recorded once


def test_grants_are_capped_at_a_few_times_the_nominal_allotment():
    cost = {"big": 100.0, "small": 1.0}
    ledger = Ledger(["big", "small"], cost, nominal_epochs=10, cap=2.5)
    ledger.record("big", Outcome(1, False, "flattened"))  # saves 900: 900 small epochs
    ledger.record("small", Outcome(10, True, "budget"))
    g = ledger.grant("small")
    assert g.epochs == 15 and g.reason == "cap"  # 2.5 x 10 in all
    ledger.record_extension("small", 15, "budget")
    summary = ledger.summary()
    assert summary["spent"] == pytest.approx(100 + 10 + 15) and summary["unspent"] == pytest.approx(1010 - 125)
    assert summary["cuts"][1]["extend_epochs"] == 15


def test_a_cut_audited_alone_has_its_own_share_only():
    ledger = Ledger(["fc1"], {"fc1": 3.0}, nominal_epochs=10, cap=3.0)
    ledger.record("fc1", Outcome(10, True, "budget"))
    g = ledger.grant("fc1")
    assert g.epochs == 0 and g.reason == "no surplus"


def test_a_failed_base_gives_its_allotment_to_the_cuts_after_it():
    ledger = Ledger(["a", "b"], {"a": 1.0, "b": 1.0}, nominal_epochs=4, cap=3.0)
    ledger.record("a", Outcome(0, False, "failed"))
    ledger.record("b", Outcome(4, True, "budget"))
    assert ledger.grant("b").epochs == 4 and ledger.grant("b").sources == {"a": 4.0}


def test_the_ledger_refuses_what_it_cannot_price():
    with pytest.raises(ValueError):
        Ledger(["a"], {"a": 0.0}, nominal_epochs=4, cap=2.0)
    with pytest.raises(ValueError):
        Ledger(["a", "a"], {"a": 1.0}, nominal_epochs=4, cap=2.0)
    assert json.loads(json.dumps(_grants(CUTS)[1]))  # the summary is plain JSON


# ------------------------------------------------------------------------------------------------
# end to end: a tiny audit, then an identical rerun
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_audits(tmp_path_factory):
    """A tiny audit whose first cut's curve is made to flatten at once and whose vector cut's never does (the
    rule itself is tested above; here, what the runner does with it); the identical audit again, cached; and
    once more uncached, with the first cut's base held back so that the second's ends first and must wait for
    its grant."""
    import time

    from splitaudit.attacks import decoder as D
    from splitaudit.config import AuditConfig
    from splitaudit.runner import run_audit
    from tests.conftest import write_tiny_npz

    d = tmp_path_factory.mktemp("budget")
    npz = write_tiny_npz(d / "d.npz", n=400)
    mp = pytest.MonkeyPatch()
    mp.setitem(D.PROFILES, "quick", D.Budget(16, 8, 2, 0, 0, 32, 1e-3, flat=0.5, cap=3.0, beta2=0.95))
    fit = D.DecoderAttack.fit
    delay = {"stem": 0.0}
    ended: list[str] = []  # base fits, in the order they ended

    def scripted(self, z_aux, x_aux, ctx):
        base = getattr(self, "_init", None) is None
        if z_aux.dim() == 4:  # the stem: any gain over two epochs below half the gain so far reads as flat
            self.flat = 1.0
        else:  # the vector cut: never flat, never stopped by patience
            self.flat, self.patience = 0.0, 10**6
        report = fit(self, z_aux, x_aux, ctx)
        if base:
            time.sleep(delay["stem"] if z_aux.dim() == 4 else 0.0)
            ended.append("stem" if z_aux.dim() == 4 else "fc")
        return report

    mp.setattr(D.DecoderAttack, "fit", scripted)
    cfg = AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem", "fc"), defenses=("none", "noise:sigma=1"),
                      profile="quick", seed=1, cache_dir=str(d / "cache"))
    try:
        first, second = run_audit(cfg), run_audit(cfg)
        ended.clear()
        delay["stem"] = 3.0
        third = run_audit(replace(cfg, use_cache=False))
        yield first, second, third, list(ended)
    finally:
        mp.undo()


def test_a_flattened_cut_stops_early_and_its_savings_extend_an_improving_one(budget_audits):
    first = budget_audits[0]
    ledger = first.config["budget"]["decoder"]
    stem, fc = ledger["cuts"]
    assert stem["base_stop"] == "flattened" and stem["base_epochs"] == 3 and stem["grant_epochs"] == 0
    assert fc["base_stop"] == "budget" and fc["base_epochs"] == 8
    expected = int(5 * stem["flops_per_epoch"] // fc["flops_per_epoch"])  # the stem's 5 unspent epochs, in the fc's
    assert expected >= 1 and fc["grant_epochs"] == expected and fc["extend_epochs"] == expected
    assert ledger["moved"] and all(m["from"] == "stem" and m["to"] == "fc" for m in ledger["moved"])
    assert ledger["spent"] <= ledger["total"]
    # every row records what was spent, per phase, and why each phase stopped
    for row in first.results:
        phases = row.attack_info["phases"]
        assert set(phases) == {"base", "extend", "refine"}
        assert row.epochs == sum(p["epochs"] for p in phases.values()) and row.train_seconds is not None
        if row.cut == "stem":
            assert phases["base"]["stop"] == "flattened" and phases["extend"]["stop"] == "not extended: flattened"
            assert row.attack_info["stop"] == "flattened"
        else:
            assert phases["extend"] == {**phases["extend"], "epochs": expected, "grant_epochs": expected, "stop": "budget"}
            assert row.attack_info["grant_epochs"] == expected and row.attack_info["stop"] == "budget"
    # the adaptive refinement starts from the same extended state as the undefended one: equal budgets
    fc_rows = [r for r in first.results if r.cut == "fc"]
    assert len({r.epochs for r in fc_rows}) == 1


def test_an_identical_rerun_hits_the_cache_for_every_job_and_grants_the_same(budget_audits):
    first, second = budget_audits[:2]
    by_kind = second.config["cache"]["by_kind"]
    assert by_kind["attacks"]["misses"] == 0 and by_kind["attacks"]["hits"] >= 5  # 2 bases, 1 extension, 2+ refinements
    assert second.config["budget"]["decoder"]["cuts"] == first.config["budget"]["decoder"]["cuts"]
    assert [r.ssim for r in second.results] == [r.ssim for r in first.results]


def test_a_cut_whose_base_ends_first_waits_for_its_grant_and_gets_the_same(budget_audits):
    first, _, third, ended = budget_audits
    assert ended == ["fc", "stem"]  # the improving cut ended first, before the outcome its grant depends on
    assert third.config["budget"]["decoder"]["cuts"] == first.config["budget"]["decoder"]["cuts"]
    assert [(r.cut, r.defense, r.adaptive, r.ssim) for r in third.results] == [(r.cut, r.defense, r.adaptive, r.ssim) for r in first.results]
