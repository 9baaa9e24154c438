"""Budget by difficulty: the flattening rule and the training loop's plateau stop."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitaudit.attacks.training import Plateau, TrainConfig, flattened, train

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
    assert not flattened([0.9, math.nan, 0.9, 0.9], 0.1, window=3, share=0.01) or True  # a NaN never raises


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
