"""The hybrid attack (attacks/hybrid.py): rMLE started from the decoder's reconstruction, its place in the
job graph (it starts from the audit's own decoder of the same cut and defense) and in the ladder."""

from __future__ import annotations

import functools
import re
from dataclasses import replace

import pytest
import torch

from splitaudit.attacks import AttackContext, make_attack
from splitaudit.attacks.decoder import DecoderAttack
from splitaudit.config import AuditConfig
from splitaudit.cuts import capture, head_forward
from splitaudit.defenses import make_defense
from splitaudit.jobs import plan_cut
from splitaudit.runner import run_audit
from tests.conftest import write_tiny_npz
from tests.tiny import white_box_setup

NOISE = "noise:sigma=1,kind=gaussian"


@pytest.fixture(scope="module")
def setup():
    return white_box_setup(160, 32)


def _ctx(model, cut, z, head=True):
    return AttackContext(input_shape=(1, 12, 12), act_shape=tuple(z.shape[1:]), profile="quick", generator=torch.Generator().manual_seed(1),
                         head=functools.partial(head_forward, model, cut) if head else None)


@pytest.fixture(scope="module")
def decoder_at_fc(setup):
    """A short decoder at the vector cut, where the optimization alone falls back towards the prior."""
    model, x_aux, _ = setup
    z_aux = capture(model, "fc", x_aux)
    dec = make_attack("decoder", profile="quick", params={"epochs": 3, "restarts": 0, "extensions": 0})
    dec.fit(z_aux, x_aux, _ctx(model, "fc", z_aux, head=False))
    return dec


def test_the_hybrid_matches_the_activation_at_least_as_well_as_the_decoders_start(setup, decoder_at_fc):
    model, x_aux, x_eval = setup
    z_aux, z_eval = capture(model, "fc", x_aux), capture(model, "fc", x_eval)
    hybrid = make_attack("hybrid", profile="quick", params={"iterations": 10, "select": 8})
    hybrid.start_from(decoder_at_fc)
    report = hybrid.fit(z_aux, x_aux, _ctx(model, "fc", z_aux))
    assert hybrid.iterations == 10  # the optimization ran (the start did not win the selection), so the comparison means something
    with torch.no_grad():  # the runner may score under no_grad: reconstruct turns gradients on itself
        rec = hybrid.reconstruct(z_eval)
        start = decoder_at_fc.reconstruct(z_eval).clamp(0, 1)
        fid_start, fid_rec = hybrid._fidelity(start, z_eval), hybrid._fidelity(rec, z_eval)
    assert rec.shape == x_eval.shape and float(rec.min()) >= 0 and float(rec.max()) <= 1
    assert torch.all(fid_rec <= fid_start)  # per sample: the better of start and result by the attacker's own loss
    assert float(fid_rec.mean()) < 0.5 * float(fid_start.mean())  # and the optimization did improve on it
    assert report.notes[0] == "started from the audit's decoder for this cut and defense"
    assert all(p.grad is None for p in model.parameters())
    # The step (rule, size) was picked with lambda on aux data: the best of the profile's candidates.
    note = next(n for n in report.notes if n.startswith("step picked"))
    scores = {k: float(v) for k, v in re.findall(r"(\w+ [\d.]+): (-?[\d.]+)", note)}
    assert set(scores) == {f"{r} {lr:g}" for r, lr in hybrid.steps} and len(scores) == 3
    assert scores[f"{hybrid.rule} {hybrid.lr:g}"] == max(scores.values())


@pytest.mark.parametrize("attack, moves_unseen", [("hybrid", False), ("rmle", True)])
def test_a_hybrid_step_moves_the_input_only_where_the_head_can_see(attack, moves_unseen):
    """For a linear head, gradient steps from the start stay in the row space of its weights: what the head
    cannot see (its null space) is left as the decoder made it. Adam's per-pixel scaling moves it too."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=gen)
    a = make_attack(attack, profile="quick", params={"iterations": 20, "lr": 0.005, "tv": 0.0})
    a.head, a.scale, a.prior = (lambda x: x.flatten(1) @ w.T), 1.0, torch.zeros(1, 1, 4, 4)
    x0 = 0.5 + 0.01 * torch.rand(8, 1, 4, 4, generator=gen)
    z = (0.5 + 0.05 * torch.rand(8, 16, generator=gen)) @ w.T
    x, _, _ = a._descend(x0, z, torch.zeros(8))
    moved = (x - x0).flatten(1)
    unseen = moved - moved @ torch.linalg.pinv(w) @ w  # the part of the move in the head's null space
    assert float(moved.norm()) > 0.01 and float(x.min()) > 0 and float(x.max()) < 1  # it moved, inside the box
    assert (float(unseen.norm()) > 0.1 * float(moved.norm())) == moves_unseen


class _Oracle(DecoderAttack):
    """A "decoder" whose reconstruction is the true input (looked up by its activation): a start that can
    only be made worse."""

    def __init__(self, z, x):
        super().__init__(profile="quick")
        self.z, self.x = z, x

    def reconstruct(self, z, **_):
        return self.x[torch.cdist(z.flatten(1), self.z.flatten(1)).argmin(dim=1)]


def test_an_exact_start_is_kept_and_a_noisy_activation_does_not_undo_it(setup):
    model, x_aux, _ = setup
    z_aux = capture(model, "block", x_aux)
    # A strong TV prior smooths the exact start, which raises its activation-matching loss: every sample keeps its start.
    clean = make_attack("hybrid", profile="quick", params={"iterations": 5, "select": 8, "tv": 1.0})
    clean.start_from(_Oracle(z_aux, x_aux))
    rep = clean.fit(z_aux, x_aux, _ctx(model, "block", z_aux))
    assert any(n.startswith("kept the decoder's start for 8 of 8 aux samples") for n in rep.notes)
    clean.iterations = 5  # the optimization itself, whatever the selection decided (it may keep the start unoptimized)
    optimized, _ = clean._invert_chunk(z_aux[:8], torch.ones(8), torch.Generator(), 0)
    assert torch.equal(optimized, x_aux[:8])
    assert torch.equal(clean.reconstruct(z_aux[:8]), x_aux[:8])

    noisy_z = z_aux + 0.5 * z_aux.std() * torch.randn(z_aux.shape, generator=torch.Generator().manual_seed(0))
    noisy = make_attack("hybrid", profile="quick", params={"iterations": 5, "select": 8})
    noisy.start_from(_Oracle(noisy_z, x_aux))
    rep = noisy.fit(noisy_z, x_aux, _ctx(model, "block", noisy_z))
    # Matching noise lowers the loss but leaves the true input: on aux data the start wins, and it is kept as it is.
    assert noisy.iterations == 0 and any("kept it, unoptimized" in n for n in rep.notes)
    assert torch.equal(noisy.reconstruct(noisy_z[:8]), x_aux[:8])
    assert rep.converged  # the start as it is: as converged as the decoder it came from...

    lower = make_attack("hybrid", profile="quick", params={"iterations": 5, "select": 8})
    lower.start_from(_Oracle(noisy_z, x_aux), converged=False)
    assert not lower.fit(noisy_z, x_aux, _ctx(model, "block", noisy_z)).converged  # ...and a lower bound when that one is


def test_without_a_decoder_it_fits_its_own_and_picks_lambda_on_what_that_one_held_out(setup):
    model, x_aux, _ = setup
    z_aux = capture(model, "stem", x_aux)
    hybrid = make_attack("hybrid", profile="quick", params={"iterations": 3, "select": 8})
    rep = hybrid.fit(z_aux, x_aux, _ctx(model, "stem", z_aux))
    assert isinstance(hybrid.decoder, DecoderAttack) and hybrid.decoder.net is not None
    assert rep.notes[0].startswith("started from a decoder fitted here")
    picked = set(hybrid.selection[0].tolist())
    assert picked and picked <= set(hybrid.decoder.holdout.tolist())


def test_the_hybrid_refuses_to_run_without_the_head(setup):
    model, x_aux, _ = setup
    z_aux = capture(model, "fc", x_aux)
    hybrid = make_attack("hybrid", profile="quick")
    assert hybrid.white_box and hybrid.needs_fit and not hybrid.warm_start and hybrid.starts_from == "decoder"
    assert hybrid.modalities == ("image",)
    with pytest.raises(RuntimeError, match="fit"):
        hybrid.reconstruct(z_aux[:2])
    with pytest.raises(RuntimeError, match="white-box"):
        hybrid.fit(z_aux, x_aux, _ctx(model, "fc", z_aux, head=False))
    assert hybrid.decoder is None  # refused before any work: no decoder was trained
    with pytest.raises(TypeError, match="starts from a decoder"):
        hybrid.start_from(make_attack("rmle"))


def test_the_hybrid_waits_for_the_decoder_of_its_own_defense():
    defenses = [make_defense(d) for d in ("none", "noise:sigma=1")]
    for attacks in (["decoder", "hybrid"], ["hybrid", "decoder"]):  # the order of --attack changes nothing
        jobs = plan_cut("c", attacks=attacks, defenses=defenses, profile="quick", seed=0)
        hybrid = [j for j in jobs if j.spec.attack == "hybrid"]
        assert [(j.role, j.spec.kind, j.after, j.after_attack) for j in hybrid] == [
            ("clean", "fit", "clean", "decoder"), (NOISE, "fit", NOISE, "decoder")]
        assert hybrid[0].spec.score == ("none", NOISE) and hybrid[1].spec.score == (NOISE,)
    alone = plan_cut("c", attacks=["hybrid"], defenses=defenses, profile="quick", seed=0)
    assert [(j.role, j.after, j.after_attack) for j in alone] == [("clean", None, None), (NOISE, None, None)]  # fits its own


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    npz = write_tiny_npz(tmp_path_factory.mktemp("hybrid") / "d.npz", n=200)
    cfg = AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("fc",), profile="quick", seed=0, use_cache=False,
                      defenses=("none", "noise:sigma=1"), attacks=("decoder", "hybrid"), device="cpu")
    return run_audit(cfg)


def test_the_hybrid_has_its_own_rows_started_from_the_audits_decoder(ladder):
    rows = {(r.defense, r.attack, r.adaptive): r for r in ladder.results}
    assert set(rows) == {(d, a, ad) for a in ("decoder", "hybrid") for d, ad in (("none", False), (NOISE, False), (NOISE, True))}
    for key in (("none", "hybrid", False), (NOISE, "hybrid", True)):
        assert rows[key].status == "ok", rows[key].error
        assert "started from the audit's decoder for this cut and defense" in rows[key].notes
    # The adaptive hybrid picked lambda on defended aux activations, the clean one on clean ones.
    lam = {k: next(n for n in r.notes if n.startswith("lambda=")) for k, r in rows.items() if k[1] == "hybrid" and (k[2] or k[0] == "none")}
    assert len(lam) == 2
    head = ladder.headline("fc", "none")
    best = max((r for r in ladder.rows(cut="fc", defense="none")), key=lambda r: r.ssim)
    assert head is best and ladder.assessment("fc", "none").headline is best


def test_the_assessment_picks_the_hybrid_when_it_is_strongest(ladder):
    # The rule is the same for every attack: raise the hybrid above the decoder and it becomes the headline.
    rows = [replace(r, ssim=0.99, ssim_ci=(0.985, 0.995)) if (r.attack, r.defense) == ("hybrid", "none") else r for r in ladder.results]
    assert all(r.ssim < 0.985 for r in rows if r.attack == "decoder" and r.defense == "none")  # above the decoder, whatever it reached
    result = replace(ladder, results=tuple(rows))
    a = result.assessment("fc", "none")
    assert (a.headline.attack, a.headline.adaptive, a.value) == ("hybrid", False, 0.99)
    assert a.to_dict()["headline"]["attack"] == "hybrid"


def test_a_failed_decoder_fails_the_hybrid_that_starts_from_it(tmp_path, monkeypatch):
    def boom(self, *a, **k):
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(DecoderAttack, "fit", boom)
    npz = write_tiny_npz(tmp_path / "d.npz", n=120)
    res = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("stem",), profile="quick", use_cache=False,
                                attacks=("decoder", "hybrid"), device="cpu"))
    hybrid = res.rows(attack="hybrid")[0]
    assert hybrid.status == "failed" and "the decoder it starts from failed" in hybrid.error
