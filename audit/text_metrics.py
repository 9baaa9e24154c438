"""Text reconstruction metrics: how much of a private text can be read back from a rebuilt input?

A batch of texts is an int64 tensor ``x`` of shape ``(N, 2, L)``: ``x[:, 0]`` are token ids and
``x[:, 1]`` tags, one per position:

* ``-2``: padding, ``-1``: a special token ([CLS], [SEP]);
* ``0``: an ordinary token;
* ``16 * span_no + kind + 1``: a token of a planted PII span (``span_no >= 1`` numbers the spans of
  one sample, ``kind`` in ``0..14`` is the PII kind).

A reconstruction ``recon`` has the same shape, but only ``recon[:, 0]`` (the predicted ids) means
anything: every position that is scored, and what it is scored against, comes from ``x``'s tags.
The *scored positions* of a sample are those with a tag ``>= 0``: padding and special tokens say
nothing about the private text (the attacker knows [CLS] is first), so they are never counted.

Why these are pure functions of tensors, one value per sample:

* The audit summarizes every metric with a bootstrap over samples (:func:`splitaudit.metrics.summarize`)
  and reports the worst sample, so each metric returns a float32 vector of shape ``(N,)``, higher
  meaning more leakage, as :mod:`splitaudit.metrics` does for images.
* No state and no device choice: results follow the input's device.
* Audits score thousands of reconstructions at every cut point, so nothing loops over samples in
  Python. ROUGE-L's longest common subsequence is a dynamic program, run for the whole batch at
  once, one row of the table per step (see :func:`rouge_l`).
* Values are never NaN: a sample with nothing to score gets 0 (no evidence of leakage), so that
  summaries never have to drop samples. Such samples are rare (a text made only of special tokens).
* Recovering a planted PII span is the event that matters most for privacy, and its natural
  headline, the share of *all* planted spans recovered, is a ratio over the batch, not a mean over
  samples. :func:`pii_recovery` returns it in a per-sample form whose mean is exactly that share, so
  it goes through the same bootstrap as the other metrics (see there for the approximation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from splitaudit.text_data import PAD as PAD_TAG  # the tags are defined once, with the layout
from splitaudit.text_data import KIND_BITS
from splitaudit.text_data import SPECIAL as SPECIAL_TAG

__all__ = [
    "HIGHER_IS_BETTER",
    "PAD_TAG",
    "SPECIAL_TAG",
    "bag_of_tokens",
    "exact_match",
    "most_frequent_prior",
    "pii_recovery",
    "pii_spans",
    "rouge_l",
    "token_accuracy",
]

#: For each metric, whether a higher value means more leakage (all of them do).
HIGHER_IS_BETTER: dict[str, bool] = {
    "token_accuracy": True,
    "exact_match": True,
    "rouge_l": True,
    "pii_recovery": True,
}

_SPAN_STRIDE = KIND_BITS  # tag = 16 * span_no + kind + 1


# --------------------------------------------------------------------------------------------------
# Checks


def _check_batch(x: Tensor, name: str, what: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: {what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3 or x.shape[1] != 2:
        raise ValueError(f"{name}: {what} must have shape (N, 2, L) (ids, tags), got {tuple(x.shape)}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: {what} must hold integer token ids and tags, got dtype {x.dtype}")


def _check_tags(tags: Tensor, name: str) -> None:
    if tags.numel() and int(tags.min()) < PAD_TAG:
        raise ValueError(f"{name}: tags must be >= {PAD_TAG}, got {int(tags.min())}")


def _predicted_ids(recon: Tensor, x: Tensor, name: str) -> Tensor:
    """``recon[:, 0]``, broadcast to ``x``'s batch if ``recon`` holds a single sample."""
    _check_batch(x, name)
    _check_batch(recon, name, "recon")
    if recon.shape[2] != x.shape[2] or recon.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{name}: recon must have the shape of x, {tuple(x.shape)}, or batch size 1, "
            f"got {tuple(recon.shape)}"
        )
    if recon.device != x.device:
        raise ValueError(f"{name}: recon and x are on different devices: {recon.device} vs {x.device}")
    _check_tags(x[:, 1], name)
    return recon[:, 0].expand(x.shape[0], -1)


def _scored(x: Tensor) -> Tensor:
    return x[:, 1] >= 0


# --------------------------------------------------------------------------------------------------
# Token-level metrics


def token_accuracy(recon: Tensor, x: Tensor) -> Tensor:
    """Share of each sample's scored positions whose id is predicted exactly, shape ``(N,)``.

    Scored positions are those whose tag in ``x`` is ``>= 0`` (not padding, not special tokens).
    A sample with no scored position gets 0.

    Args:
        recon: ``(N, 2, L)`` reconstruction; only ``recon[:, 0]`` is read. A batch of one (such as
            :func:`most_frequent_prior`'s output) is used for every sample.
        x: ``(N, 2, L)`` true ids and tags.

    Returns:
        float32, on ``x``'s device.
    """
    pred = _predicted_ids(recon, x, "token_accuracy")
    scored = _scored(x)
    hits = ((pred == x[:, 0]) & scored).sum(dim=1)
    n = scored.sum(dim=1)
    return torch.where(n > 0, hits / n.clamp(min=1), 0.0).to(torch.float32)


def exact_match(recon: Tensor, x: Tensor) -> Tensor:
    """1.0 where every scored position of a sample is predicted exactly, else 0.0, shape ``(N,)``.

    The strictest text metric: the whole private text, not just most of it, was read back. A sample
    with no scored position gets 0, as in :func:`token_accuracy`. Arguments as there.
    """
    pred = _predicted_ids(recon, x, "exact_match")
    scored = _scored(x)
    wrong = ((pred != x[:, 0]) & scored).any(dim=1)
    return (~wrong & scored.any(dim=1)).to(torch.float32)


def _compact(values: Tensor, keep: Tensor) -> Tensor:
    """Each row's kept values moved to the front, in order; the rest of the row is arbitrary."""
    # A stable sort on "not kept" moves kept positions first without reordering them.
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
    return values.gather(1, order)


def _lcs_lengths(a: Tensor, b: Tensor, len_a: Tensor, len_b: Tensor) -> Tensor:
    """Length of the longest common subsequence of ``a[i, :len_a[i]]`` and ``b[i, :len_b[i]]``.

    The usual table ``T[i][j] = max(T[i-1][j], T[i][j-1], T[i-1][j-1] + match(i, j))`` is filled one
    row per step for the whole batch. Within a row, unrolling ``T[i][j-1]`` gives
    ``T[i][j] = max_{k <= j} max(T[i-1][k], T[i-1][k-1] + match(i, k))``: a cumulative maximum,
    one tensor operation. So ``L`` steps of ``O(N * L)`` work each, instead of ``L * L`` steps.
    Positions past a sequence's length never match, so the last cell of the padded table is the
    LCS of the true sequences.
    """
    n, la = a.shape
    lb = b.shape[1]
    valid_a = torch.arange(la, device=a.device) < len_a[:, None]
    valid_b = torch.arange(lb, device=b.device) < len_b[:, None]
    # match[:, i, j]: a[i] == b[j], both inside their sequence; (N, La, Lb) booleans, 4 MB at
    # N=1000, L=64.
    match = (a[:, :, None] == b[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]
    match = match.to(torch.int32)
    prev = torch.zeros(n, lb + 1, dtype=torch.int32, device=a.device)  # T[i-1][0..Lb]
    for i in range(la):
        cand = torch.maximum(prev[:, 1:], prev[:, :-1] + match[:, i])
        row = torch.cummax(cand, dim=1).values
        prev = torch.cat([prev[:, :1], row], dim=1)
    return prev[:, -1]


def rouge_l(recon: Tensor, x: Tensor) -> Tensor:
    """ROUGE-L F1 (beta = 1) of each sample's predicted and true token sequences, shape ``(N,)``.

    Both sequences are taken over the scored positions of ``x`` (tags ``>= 0``), in order: the true
    ids there, and the predicted ids at the same positions. ROUGE-L is the length of their longest
    common subsequence (LCS) relative to their lengths: precision ``LCS / len(pred)``, recall
    ``LCS / len(true)``, F1 their harmonic mean. Because both sequences are read at the same
    positions, their lengths are equal and F1 = precision = recall = ``LCS / n``.

    Unlike :func:`token_accuracy`, ROUGE-L credits a reconstruction whose tokens are right but
    shifted by a position or two, which an inversion attack often produces and which a reader
    still understands. Ids are compared as ids (no stemming or detokenization), so the value is
    ROUGE-L over tokenizer tokens, not over words.

    A sample with no scored position gets 0. Arguments as for :func:`token_accuracy`.
    """
    pred = _predicted_ids(recon, x, "rouge_l")
    scored = _scored(x)
    n = scored.sum(dim=1)
    true_seq = _compact(x[:, 0], scored)
    pred_seq = _compact(pred, scored)
    lcs = _lcs_lengths(pred_seq, true_seq, n, n)
    precision = lcs / n.clamp(min=1)
    recall = lcs / n.clamp(min=1)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), 0.0)
    return f1.to(torch.float32)


# --------------------------------------------------------------------------------------------------
# Planted PII spans


def _check_num_kinds(num_kinds: int, name: str) -> int:
    if isinstance(num_kinds, bool) or not isinstance(num_kinds, int) or not 1 <= num_kinds <= _SPAN_STRIDE - 1:
        raise ValueError(f"{name}: num_kinds must be an integer in 1..{_SPAN_STRIDE - 1}, got {num_kinds!r}")
    return num_kinds


def _span_table(x: Tensor, num_kinds: int, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The planted spans of a batch.

    Returns ``(sample, kind, span_of_token, token_pos)``: for each span (one per distinct
    (sample, tag) pair), the sample it is in and its kind; for each PII token (flattened, row-major),
    the index of its span and its flat position in ``x[:, 0]``. Tokens are grouped by their tag, so
    a span need not be contiguous.
    """
    tags = x[:, 1]
    _check_tags(tags, name)
    is_pii = tags > 0
    pii_tags = tags[is_pii]
    if pii_tags.numel():
        bad = (pii_tags < _SPAN_STRIDE) | (pii_tags % _SPAN_STRIDE == 0)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: PII tags must be 16 * span_no + kind + 1 with span_no >= 1 and kind in 0..14, "
                f"got {int(pii_tags[bad][0])}"
            )
        top_kind = int((pii_tags % _SPAN_STRIDE).max()) - 1
        if top_kind >= num_kinds:
            raise ValueError(f"{name}: a span has kind {top_kind}, but num_kinds is {num_kinds}")
    token_pos = is_pii.reshape(-1).nonzero().squeeze(1)
    length = tags.shape[1]
    sample_of_token = token_pos // length
    stride = int(pii_tags.max()) + 1 if pii_tags.numel() else 1
    keys = sample_of_token * stride + pii_tags
    span_keys, span_of_token = torch.unique(keys, sorted=True, return_inverse=True)
    sample = span_keys // stride
    kind = span_keys % stride % _SPAN_STRIDE - 1
    return sample, kind, span_of_token, token_pos


def pii_spans(x: Tensor, *, num_kinds: int) -> tuple[Tensor, Tensor]:
    """Number of planted PII spans in each sample, in all and per kind.

    A span is the set of a sample's positions that share one PII tag (``16 * span_no + kind + 1``).

    Args:
        x: ``(N, 2, L)`` ids and tags.
        num_kinds: number of PII kinds ``K``; every kind in ``x`` must be below it.

    Returns:
        ``(n_spans, kind_counts)``: int64 tensors of shapes ``(N,)`` and ``(N, K)``, with
        ``kind_counts.sum(1) == n_spans``.

    Raises:
        ValueError: on a malformed tag, or a kind ``>= num_kinds``.
    """
    _check_batch(x, "pii_spans")
    num_kinds = _check_num_kinds(num_kinds, "pii_spans")
    n = x.shape[0]
    sample, kind, _, _ = _span_table(x, num_kinds, "pii_spans")
    kind_counts = torch.bincount(sample * num_kinds + kind, minlength=n * num_kinds).reshape(n, num_kinds)
    return kind_counts.sum(dim=1), kind_counts


def pii_recovery(recon: Tensor, x: Tensor, *, num_kinds: int) -> tuple[Tensor, dict[int, Tensor]]:
    """Recovered planted PII spans, as per-sample values whose mean is the share recovered.

    A span counts as recovered when every one of its tokens is predicted exactly: a name with one
    wrong sub-word is, for this metric, not leaked (:func:`token_accuracy` still sees the rest).

    The headline is the share of all planted spans, over the batch, that were recovered:
    ``R = sum_i r_i / sum_i s_i`` with ``r_i`` spans recovered and ``s_i`` planted in sample ``i``.
    That is a ratio of sums, not a mean of per-sample shares (which would weigh a sample with one
    span like one with five, and be undefined for samples without spans). To let it go through the
    same per-sample bootstrap as the other metrics, each sample gets the value ``r_i / s_bar``, with
    ``s_bar`` the mean number of spans per sample over the batch; the mean of these values is
    exactly ``R``.

    The approximation: the bootstrap resamples the values with ``s_bar`` held at the full batch's
    value, so the interval reflects the variation of ``r_i`` only, not that of the denominator (a
    resample with more spans would also have a larger ``s_bar``). When recovery is roughly
    proportional to the number of spans the interval is then wider than the exact ratio bootstrap's,
    i.e. conservative. Single values can exceed 1 (a sample with more spans than average, all
    recovered), so the per-sample maximum is not a share.

    Args:
        recon: ``(N, 2, L)`` reconstruction (or a batch of one); only ``recon[:, 0]`` is read.
        x: ``(N, 2, L)`` true ids and tags.
        num_kinds: number of PII kinds; every kind in ``x`` must be below it.

    Returns:
        ``(values, per_kind)``: float32 ``(N,)`` values as above, and for each kind present in the
        batch (at least one span), the same for that kind alone (``r_ik / s_bar_k``), keyed by kind
        index. If the batch has no span at all, the values are zeros (nothing was planted, so nothing
        leaked) and ``per_kind`` is empty.

    Raises:
        ValueError: on a malformed tag, or a kind ``>= num_kinds``.
    """
    pred = _predicted_ids(recon, x, "pii_recovery")
    num_kinds = _check_num_kinds(num_kinds, "pii_recovery")
    n = x.shape[0]
    sample, kind, span_of_token, token_pos = _span_table(x, num_kinds, "pii_recovery")
    n_span = sample.numel()
    if n_span == 0:
        return torch.zeros(n, dtype=torch.float32, device=x.device), {}
    wrong = pred.reshape(-1)[token_pos] != x[:, 0].reshape(-1)[token_pos]
    wrong_per_span = torch.zeros(n_span, dtype=torch.int64, device=x.device).index_add_(
        0, span_of_token, wrong.to(torch.int64)
    )
    recovered = (wrong_per_span == 0).to(torch.float64)
    cell = sample * num_kinds + kind
    rec = torch.bincount(cell, weights=recovered, minlength=n * num_kinds).reshape(n, num_kinds)
    planted = torch.bincount(cell, minlength=n * num_kinds).reshape(n, num_kinds).sum(dim=0)  # (K,)
    # r_i / s_bar = r_i * N / S, in float64 so that the mean is the ratio to float32 precision.
    values = (rec.sum(dim=1) * (n / n_span)).to(torch.float32)
    per_kind: dict[int, Tensor] = {}
    for k in planted.nonzero().squeeze(1).tolist():
        per_kind[int(k)] = (rec[:, k] * (n / int(planted[k]))).to(torch.float32)
    return values, per_kind


# --------------------------------------------------------------------------------------------------
# Baselines and features


def _modes(ids: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``ids`` (M, L): the most frequent id counting rows where ``weight`` is True
    (ties: the smallest id), and whether the column had any such row."""
    m, length = ids.shape
    lo = int(ids.min())
    span = int(ids.max()) - lo + 1
    pos = torch.arange(length, device=ids.device).expand(m, length)
    keys = (pos * span + (ids - lo))[weight]
    out = torch.zeros(length, dtype=ids.dtype, device=ids.device)
    present = torch.zeros(length, dtype=torch.bool, device=ids.device)
    if keys.numel() == 0:
        return out, present
    uniq, counts = torch.unique(keys, sorted=True, return_counts=True)
    # uniq is sorted by (position, id). Stable sorts by count (descending), then by position, put
    # each position's most frequent id first, the smallest id first among equal counts.
    order = torch.sort(counts, descending=True, stable=True).indices
    uniq = uniq[order]
    uniq = uniq[torch.sort(uniq // span, stable=True).indices]
    col = uniq // span
    first = torch.ones_like(col, dtype=torch.bool)
    first[1:] = col[1:] != col[:-1]
    out[col[first]] = (uniq[first] % span + lo).to(ids.dtype)
    present[col[first]] = True
    return out, present


def most_frequent_prior(x_aux: Tensor) -> Tensor:
    """The no-information guess, a reconstruction that ignores the activations; shape ``(1, 2, L)``.

    At each position, the id most frequent over the auxiliary samples whose tag there is ``>= 0``
    (a scored token); where no auxiliary sample has a scored token at a position, the id most
    frequent there over all of them. Ties go to the smallest id. Channel 1 (tags) is zeros.

    An attack's score means little by itself: a text metric rewards guessing frequent tokens
    ("the", a common first word) even with no information from the wire. Scoring this prior with
    the same metrics, on the same evaluation samples, gives the floor that leakage is measured
    from. The metrics accept a reconstruction of batch size one, so it can be passed as is.

    Args:
        x_aux: ``(M, 2, L)`` auxiliary samples (the attacker's public data), ``M >= 1``; ``L`` must
            be that of the samples it is scored against.

    Returns:
        The prior, dtype and device of ``x_aux``.
    """
    _check_batch(x_aux, "most_frequent_prior", "x_aux")
    if x_aux.shape[0] == 0:
        raise ValueError("most_frequent_prior: x_aux has no samples")
    _check_tags(x_aux[:, 1], "most_frequent_prior")
    ids = x_aux[:, 0]
    out = torch.zeros(1, 2, ids.shape[1], dtype=x_aux.dtype, device=x_aux.device)
    if ids.shape[1] == 0:
        return out
    scored_mode, present = _modes(ids, x_aux[:, 1] >= 0)
    if bool(present.all()):
        out[0, 0] = scored_mode
    else:
        any_mode, _ = _modes(ids, torch.ones_like(ids, dtype=torch.bool))
        out[0, 0] = torch.where(present, scored_mode, any_mode)
    return out


def bag_of_tokens(x: Tensor, dim: int = 4096, mask: Tensor | None = None) -> Tensor:
    """Hashed bag-of-tokens features of each sample, L2-normalized, shape ``(N, dim)``.

    For re-identification: matching a reconstruction to its source among candidate texts by the
    cosine similarity (a dot product, since rows are normalized) of these features. Order is
    ignored on purpose, so a reconstruction with the right tokens in shuffled places still matches.

    Each non-padding position (tag ``>= -1``, so special tokens count too) adds one to bucket
    ``id % dim``: a plain modulo, not a hash, which is enough because ids are arbitrary labels; with
    ``dim`` at least the vocabulary size there are no collisions. A row with no counted position
    stays all zeros.

    Args:
        x: ``(N, 2, L)``; ids are read from ``x[:, 0]``.
        dim: number of buckets.
        mask: the tags that decide which positions count: ``(N, L)`` tags, or an ``(N, 2, L)``
            batch whose channel 1 is used. By default ``x``'s own tags; pass the true batch when
            ``x`` is a reconstruction (whose tags mean nothing), so that both are counted over the
            same positions.

    Returns:
        float32, on ``x``'s device.
    """
    _check_batch(x, "bag_of_tokens")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"bag_of_tokens: dim must be a positive integer, got {dim!r}")
    if mask is None:
        tags = x[:, 1]
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"bag_of_tokens: mask must be a torch.Tensor, got {type(mask).__name__}")
        tags = mask[:, 1] if mask.ndim == 3 else mask
        if tags.shape != x[:, 0].shape and not (tags.ndim == 2 and tags.shape[0] == 1):
            raise ValueError(
                f"bag_of_tokens: mask must be tags of shape {tuple(x[:, 0].shape)} or a batch of shape "
                f"{tuple(x.shape)}, got {tuple(mask.shape)}"
            )
        if tags.device != x.device:
            raise ValueError(f"bag_of_tokens: mask and x are on different devices: {tags.device} vs {x.device}")
    counted = (tags >= SPECIAL_TAG).expand_as(x[:, 0]).to(torch.float32)
    buckets = torch.remainder(x[:, 0], dim)
    feats = torch.zeros(x.shape[0], dim, dtype=torch.float32, device=x.device).scatter_add_(1, buckets, counted)
    norm = feats.norm(dim=1, keepdim=True)
    return feats / norm.clamp(min=1e-12)  # rows of zeros stay zeros
