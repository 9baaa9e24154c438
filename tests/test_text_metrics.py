"""Tests for audit.text_metrics: hand-computed cases, a pure-Python LCS reference, PII spans, prior."""

from __future__ import annotations

import random

import pytest
import torch

from splitaudit.text_metrics import (
    bag_of_tokens,
    exact_match,
    most_frequent_prior,
    pii_recovery,
    pii_spans,
    rouge_l,
    token_accuracy,
)

PAD, SPECIAL = -2, -1


def span_tag(span_no: int, kind: int) -> int:
    return 16 * span_no + kind + 1


def batch(ids: list[list[int]], tags: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.tensor(ids), torch.tensor(tags)], dim=1).to(torch.int64)


def with_ids(x: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
    """A reconstruction of ``x`` predicting ``ids``; its tags are garbage on purpose."""
    r = torch.full_like(x, 7)
    r[:, 0] = torch.tensor(ids)
    return r


def lcs_reference(a: list[int], b: list[int]) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            t[i][j] = t[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(t[i - 1][j], t[i][j - 1])
    return t[-1][-1]


# Two samples: [CLS] 5 6 7 8 [SEP] PAD PAD, and [CLS] 1 2 3 [SEP] PAD PAD PAD.
X2 = batch(
    [[101, 5, 6, 7, 8, 102, 0, 0], [101, 1, 2, 3, 102, 0, 0, 0]],
    [[SPECIAL, 0, 0, 0, 0, SPECIAL, PAD, PAD], [SPECIAL, 0, 0, 0, SPECIAL, PAD, PAD, PAD]],
)


# --------------------------------------------------------------------------------------------------
# Token accuracy and exact match


def test_token_accuracy_and_exact_match_hand_computed():
    # Sample 0: 3 of 4 right. Sample 1: all right, but special and padding positions wrong.
    r = with_ids(X2, [[101, 5, 9, 7, 8, 102, 0, 0], [0, 1, 2, 3, 0, 9, 9, 9]])
    assert token_accuracy(r, X2).tolist() == [0.75, 1.0]
    assert exact_match(r, X2).tolist() == [0.0, 1.0]
    assert token_accuracy(r, X2).dtype == torch.float32
    assert exact_match(r, X2).dtype == torch.float32


def test_special_and_padding_positions_never_count():
    # Right only at special and padding positions: nothing scored is right.
    r = with_ids(X2, [[101, 0, 0, 0, 0, 102, 0, 0], [101, 0, 0, 0, 102, 0, 0, 0]])
    assert token_accuracy(r, X2).tolist() == [0.0, 0.0]
    assert exact_match(r, X2).tolist() == [0.0, 0.0]
    assert rouge_l(r, X2).tolist() == [0.0, 0.0]
    # Wrong only at special and padding positions: perfect.
    r = with_ids(X2, [[9, 5, 6, 7, 8, 9, 9, 9], [9, 1, 2, 3, 9, 9, 9, 9]])
    assert token_accuracy(r, X2).tolist() == [1.0, 1.0]
    assert exact_match(r, X2).tolist() == [1.0, 1.0]
    assert rouge_l(r, X2).tolist() == [1.0, 1.0]


def test_pii_tokens_are_scored_positions():
    x = batch([[101, 4, 5, 102]], [[SPECIAL, span_tag(1, 3), 0, SPECIAL]])
    r = with_ids(x, [[101, 9, 5, 102]])
    assert token_accuracy(r, x).tolist() == [0.5]


def test_sample_without_scored_positions_gets_zero_not_nan():
    x = batch([[101, 102, 0], [101, 3, 102]], [[SPECIAL, SPECIAL, PAD], [SPECIAL, 0, SPECIAL]])
    r = x.clone()
    for f in (token_accuracy, exact_match, rouge_l):
        v = f(r, x)
        assert v.tolist() == [0.0, 1.0], f.__name__


def test_perfect_reconstruction_gives_one_everywhere():
    x = batch(
        [[101, 4, 4, 5, 6, 102], [101, 9, 8, 102, 0, 0]],
        [
            [SPECIAL, span_tag(1, 0), span_tag(1, 0), 0, span_tag(2, 5), SPECIAL],
            [SPECIAL, 0, span_tag(1, 5), SPECIAL, PAD, PAD],
        ],
    )
    r = x.clone()
    r[:, 1] = 0
    assert token_accuracy(r, x).tolist() == [1.0, 1.0]
    assert exact_match(r, x).tolist() == [1.0, 1.0]
    assert rouge_l(r, x).tolist() == [1.0, 1.0]
    values, per_kind = pii_recovery(r, x, num_kinds=15)
    assert values.mean().item() == pytest.approx(1.0)
    assert set(per_kind) == {0, 5}
    assert all(v.mean().item() == pytest.approx(1.0) for v in per_kind.values())


def test_recon_of_batch_one_is_broadcast():
    r = with_ids(X2[:1], [[0, 5, 6, 3, 0, 0, 0, 0]])
    assert token_accuracy(r, X2).tolist() == [0.5, pytest.approx(1 / 3)]
    assert rouge_l(r, X2).tolist() == [0.5, pytest.approx(1 / 3)]
    x = _pii_batch()
    r = with_ids(x[:1], [[0, 10, 11, 0, 30, 31, 32, 0]])  # sample 0's spans right, sample 1's not
    values, _ = pii_recovery(r, x, num_kinds=15)
    assert values.tolist() == pytest.approx([2.0, 0.0, 0.0])


def test_shape_dtype_and_device_errors():
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(X2[:, :, :5], X2)
    with pytest.raises(ValueError, match=r"\(N, 2, L\)"):
        token_accuracy(X2[:, 0], X2)
    with pytest.raises(TypeError, match="integer"):
        rouge_l(X2.float(), X2)
    with pytest.raises(TypeError, match="Tensor"):
        exact_match(X2.tolist(), X2)
    bad = X2.clone()
    bad[0, 1, 0] = -3
    with pytest.raises(ValueError, match="tags"):
        token_accuracy(X2, bad)


# --------------------------------------------------------------------------------------------------
# ROUGE-L


def test_rouge_l_hand_computed():
    # True 5 6 7 8, predicted 6 7 8 5 (shifted): LCS 3 of 4, where token accuracy is 0.
    # True 1 2 3, predicted 3 2 1: LCS 1 of 3.
    r = with_ids(X2, [[0, 6, 7, 8, 5, 0, 0, 0], [0, 3, 2, 1, 0, 0, 0, 0]])
    assert rouge_l(r, X2).tolist() == [0.75, pytest.approx(1 / 3)]
    assert token_accuracy(r, X2).tolist() == [0.0, pytest.approx(1 / 3)]


def test_rouge_l_skips_non_scored_positions_inside_the_sequence():
    # A special token in the middle is removed from both sequences: true 1 2 3 4, predicted 2 3 4 1.
    x = batch([[1, 2, 50, 3, 4]], [[0, 0, SPECIAL, 0, 0]])
    r = with_ids(x, [[2, 3, 2, 4, 1]])  # predicted at scored positions: 2 3 4 1
    assert rouge_l(r, x).tolist() == [0.75]
    # Scored predicted 9 1 9 9 vs true 1 2 3 4: LCS 1. With the special position kept it would be
    # 9 1 2 9 9 vs 1 2 50 3 4: LCS 2.
    r = with_ids(x, [[9, 1, 2, 9, 9]])
    assert rouge_l(r, x).tolist() == [0.25]


def test_rouge_l_repeated_tokens():
    x = batch([[1, 1, 2, 1, 2, 2]], [[0] * 6])
    r = with_ids(x, [[2, 1, 2, 2, 1, 1]])
    assert rouge_l(r, x).item() == pytest.approx(lcs_reference([2, 1, 2, 2, 1, 1], [1, 1, 2, 1, 2, 2]) / 6)
    assert lcs_reference([2, 1, 2, 2, 1, 1], [1, 1, 2, 1, 2, 2]) == 4


def test_rouge_l_matches_pure_python_reference_on_random_pairs():
    rng = random.Random(1234)
    n, length = 200, 24
    ids = torch.zeros(n, 2, length, dtype=torch.int64)
    pred = torch.zeros(n, length, dtype=torch.int64)
    for i in range(n):
        vocab = rng.choice([2, 3, 5, 40])  # small vocabularies: many repeated tokens
        ids[i, 0] = torch.tensor([rng.randrange(vocab) for _ in range(length)])
        m = rng.randrange(0, length - 1)  # sequences of different lengths, some empty
        tags = [SPECIAL] + [rng.choice([0, 0, 0, span_tag(1, 2), SPECIAL]) for _ in range(m)]
        tags += [PAD] * (length - len(tags))
        ids[i, 1] = torch.tensor(tags)
        if rng.random() < 0.3:  # partly copied reconstructions: long common subsequences
            pred[i] = torch.where(torch.rand(length) < 0.7, ids[i, 0], torch.randint(0, vocab, (length,)))
        else:
            pred[i] = torch.tensor([rng.randrange(vocab) for _ in range(length)])
    r = torch.zeros_like(ids)
    r[:, 0] = pred
    got = rouge_l(r, ids)
    checked_nonempty = 0
    for i in range(n):
        keep = (ids[i, 1] >= 0).tolist()
        a = [t for t, k in zip(ids[i, 0].tolist(), keep) if k]
        b = [t for t, k in zip(pred[i].tolist(), keep) if k]
        if not a:
            assert got[i].item() == 0.0
            continue
        checked_nonempty += 1
        lcs = lcs_reference(b, a)
        p, rec = lcs / len(b), lcs / len(a)
        want = 0.0 if lcs == 0 else 2 * p * rec / (p + rec)
        assert got[i].item() == pytest.approx(want, abs=1e-6), i
    assert checked_nonempty > 150


# --------------------------------------------------------------------------------------------------
# PII spans


def _pii_batch():
    """Three samples. Kinds: 2 (name), 7 (phone).

    0: span 1 (kind 2) at 1-2, span 2 (kind 7) at 4-6.
    1: span 1 (kind 7) at 2-3.
    2: no span.
    """
    n2, p1, p2 = span_tag(1, 2), span_tag(2, 7), span_tag(1, 7)
    ids = [
        [101, 10, 11, 20, 30, 31, 32, 102],
        [101, 40, 50, 51, 60, 102, 0, 0],
        [101, 70, 71, 102, 0, 0, 0, 0],
    ]
    tags = [
        [SPECIAL, n2, n2, 0, p1, p1, p1, SPECIAL],
        [SPECIAL, 0, p2, p2, 0, SPECIAL, PAD, PAD],
        [SPECIAL, 0, 0, SPECIAL, PAD, PAD, PAD, PAD],
    ]
    return batch(ids, tags)


def test_pii_spans_counts():
    n_spans, kind_counts = pii_spans(_pii_batch(), num_kinds=15)
    assert n_spans.tolist() == [2, 1, 0]
    assert kind_counts.shape == (3, 15)
    assert kind_counts[:, 2].tolist() == [1, 0, 0]
    assert kind_counts[:, 7].tolist() == [1, 1, 0]
    assert kind_counts.sum().item() == 3


def test_pii_spans_same_kind_twice_in_a_sample_are_two_spans():
    t1, t2 = span_tag(1, 4), span_tag(2, 4)
    x = batch([[1, 2, 3, 4]], [[t1, t1, t2, t2]])  # adjacent spans of one kind
    n_spans, kind_counts = pii_spans(x, num_kinds=5)
    assert n_spans.tolist() == [2]
    assert kind_counts[0, 4].item() == 2


def test_pii_recovery_one_wrong_token_and_ratio_form():
    x = _pii_batch()
    # Sample 0: name span right, phone span with one wrong token (31 -> 99); non-PII 20 wrong too.
    # Sample 1: phone span right.
    r = with_ids(
        x,
        [
            [0, 10, 11, 0, 30, 99, 32, 0],
            [0, 0, 50, 51, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
    )
    values, per_kind = pii_recovery(r, x, num_kinds=15)
    # recovered 2 of 3 spans; s_bar = 1, so values are r_i = [1, 1, 0].
    assert values.dtype == torch.float32
    assert values.tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert values.mean().item() == pytest.approx(2 / 3)
    assert set(per_kind) == {2, 7}
    # kind 2: 1 planted, 1 recovered -> s_bar = 1/3, values r_i * 3.
    assert per_kind[2].tolist() == pytest.approx([3.0, 0.0, 0.0])
    assert per_kind[2].mean().item() == pytest.approx(1.0)
    # kind 7: 2 planted (samples 0 and 1), 1 recovered (sample 1) -> s_bar = 2/3.
    assert per_kind[7].tolist() == pytest.approx([0.0, 1.5, 0.0])
    assert per_kind[7].mean().item() == pytest.approx(0.5)


def test_pii_recovery_mean_equals_recovered_over_total_on_random_batches():
    g = torch.Generator().manual_seed(7)
    n, length, kinds = 300, 32, 15
    x = torch.zeros(n, 2, length, dtype=torch.int64)
    x[:, 0] = torch.randint(0, 30, (n, length), generator=g)
    recovered = total = 0
    rec_k = [0] * kinds
    tot_k = [0] * kinds
    recon = x.clone()
    for i in range(n):
        pos, span_no = 1, 1
        while True:  # plant 0..4 spans of 1..4 tokens
            if torch.rand((), generator=g) < 0.35 or pos + 4 >= length:
                break
            width = int(torch.randint(1, 5, (), generator=g))
            kind = int(torch.randint(0, kinds, (), generator=g))
            x[i, 1, pos : pos + width] = span_tag(span_no, kind)
            wrong = torch.rand((), generator=g) < 0.4
            if wrong:  # one token of the span wrong
                j = pos + int(torch.randint(0, width, (), generator=g))
                recon[i, 0, j] = x[i, 0, j] + 1
            total += 1
            tot_k[kind] += 1
            recovered += int(not wrong)
            rec_k[kind] += int(not wrong)
            pos += width + 1
            span_no += 1
    recon[:, 1] = 0
    values, per_kind = pii_recovery(recon, x, num_kinds=kinds)
    assert total > 100
    assert values.mean().item() == pytest.approx(recovered / total, rel=1e-5)
    n_spans, kind_counts = pii_spans(x, num_kinds=kinds)
    assert n_spans.sum().item() == total
    assert kind_counts.sum(0).tolist() == tot_k
    assert set(per_kind) == {k for k in range(kinds) if tot_k[k]}
    for k, v in per_kind.items():
        assert v.mean().item() == pytest.approx(rec_k[k] / tot_k[k], rel=1e-5), k
        assert v.shape == (n,)


def test_pii_recovery_no_spans_gives_zeros():
    r = X2.clone()
    values, per_kind = pii_recovery(r, X2, num_kinds=15)
    assert values.tolist() == [0.0, 0.0]
    assert per_kind == {}


def test_pii_recovery_ignores_non_pii_positions():
    x = batch([[1, 2, 3]], [[0, span_tag(1, 0), SPECIAL]])
    r = with_ids(x, [[9, 2, 9]])
    values, _ = pii_recovery(r, x, num_kinds=1)
    assert values.tolist() == [1.0]


def test_pii_malformed_tags_and_kinds_raise():
    with pytest.raises(ValueError, match="num_kinds"):
        pii_spans(batch([[1]], [[span_tag(1, 5)]]), num_kinds=3)
    with pytest.raises(ValueError, match="span_no"):
        pii_spans(batch([[1]], [[5]]), num_kinds=15)  # span_no 0
    with pytest.raises(ValueError, match="span_no"):
        pii_spans(batch([[1]], [[32]]), num_kinds=15)  # kind + 1 == 0
    with pytest.raises(ValueError, match="num_kinds"):
        pii_recovery(X2, X2, num_kinds=0)


# --------------------------------------------------------------------------------------------------
# Prior and bag of tokens


def test_most_frequent_prior_picks_mode_per_position_and_ignores_padding():
    # Position 0: special everywhere -> no scored sample: mode over all ids (101).
    # Position 1: 4 twice (scored), 9 three times but two of those are padding -> 4.
    # Position 2: 3 and 5 once each -> tie -> 3 (smallest).
    # Position 3: padding everywhere: ids 0, 0, 8 -> 0.
    ids = [
        [101, 4, 5, 0],
        [101, 4, 3, 0],
        [101, 9, 7, 8],
        [101, 9, 7, 0],
        [101, 9, 7, 0],
    ]
    tags = [
        [SPECIAL, 0, 0, PAD],
        [SPECIAL, span_tag(1, 0), 0, PAD],
        [SPECIAL, 0, PAD, PAD],
        [SPECIAL, PAD, PAD, PAD],
        [SPECIAL, PAD, PAD, PAD],
    ]
    prior = most_frequent_prior(batch(ids, tags))
    assert prior.shape == (1, 2, 4)
    assert prior.dtype == torch.int64
    assert prior[0, 0].tolist() == [101, 4, 3, 0]
    assert prior[0, 1].tolist() == [0, 0, 0, 0]


def test_most_frequent_prior_random_against_counter():
    from collections import Counter

    g = torch.Generator().manual_seed(3)
    m, length = 60, 10
    x = torch.zeros(m, 2, length, dtype=torch.int64)
    x[:, 0] = torch.randint(0, 6, (m, length), generator=g)
    x[:, 1] = torch.randint(-2, 1, (m, length), generator=g)
    x[:, 1, -1] = PAD  # one position with no scored sample
    prior = most_frequent_prior(x)
    for pos in range(length):
        col = [(int(t), int(k)) for t, k in zip(x[:, 0, pos], x[:, 1, pos])]
        pool = [t for t, k in col if k >= 0] or [t for t, _ in col]
        counts = Counter(pool)
        best = max(counts.values())
        assert prior[0, 0, pos].item() == min(t for t, c in counts.items() if c == best), pos


def test_prior_scores_against_eval_samples():
    x_aux = batch([[101, 4, 5, 102], [101, 4, 6, 102]], [[SPECIAL, 0, 0, SPECIAL]] * 2)
    prior = most_frequent_prior(x_aux)  # 101 4 5 102
    x_eval = batch([[101, 4, 6, 102], [101, 4, 5, 102]], [[SPECIAL, 0, 0, SPECIAL]] * 2)
    assert token_accuracy(prior, x_eval).tolist() == [0.5, 1.0]


def test_most_frequent_prior_empty_raises():
    with pytest.raises(ValueError, match="no samples"):
        most_frequent_prior(torch.zeros(0, 2, 4, dtype=torch.int64))


def test_bag_of_tokens_counts_normalizes_and_skips_padding():
    x = batch([[101, 3, 3, 5, 102, 7], [0, 0, 0, 0, 0, 0]], [[SPECIAL, 0, 0, 0, SPECIAL, PAD], [PAD] * 6])
    f = bag_of_tokens(x, dim=8)
    assert f.shape == (2, 8) and f.dtype == torch.float32
    # Sample 0: 101 % 8 = 5 (once), 3 twice, 5 once, 102 % 8 = 6 once; padding id 7 not counted.
    want = torch.zeros(8)
    want[5] = 2.0
    want[3] = 2.0
    want[6] = 1.0
    want = want / want.norm()
    assert torch.allclose(f[0], want)
    assert f[1].tolist() == [0.0] * 8  # nothing counted: stays zero, no NaN
    assert f[0].norm().item() == pytest.approx(1.0)


def test_bag_of_tokens_mask_from_true_batch():
    x = batch([[1, 2, 3, 0]], [[SPECIAL, 0, 0, PAD]])
    r = with_ids(x, [[1, 2, 3, 4]])  # its own tags (7) would count position 3
    own = bag_of_tokens(r, dim=16)
    masked = bag_of_tokens(r, dim=16, mask=x)
    assert own[0, 4].item() > 0
    assert masked[0, 4].item() == 0.0
    assert torch.equal(bag_of_tokens(r, dim=16, mask=x[:, 1]), masked)
    assert torch.allclose(masked, bag_of_tokens(x, dim=16))
