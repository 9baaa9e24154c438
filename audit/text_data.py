"""Text samples with marked personal data, and their encoding into token ids plus per-token tags.

The text modality audits what a split model's activations give away about the *personal data* in its
input: which tokens were a name, an e-mail address, a card number. So a text sample is not just a
string: it carries character spans that say where each piece of personal data (PII) sits, and an
optional class label. A *text data spec* names where the samples come from:

* ``builtin:pii-text`` - synthetic support tickets, payment messages, shipping notes and HR notes
  (Faker values planted into fixed templates, every span recorded while the string is built, never
  found by searching afterwards), plus about a quarter of plain English sentences with no PII from
  Python's own ``pydoc_data.topics``. Labelled by template family (:data:`BUILTIN_CLASSES`).
  Deterministic per seed; the exact strings depend on the installed Faker and Python versions, which
  the licence string names.
* ``path/to/file.txt``   - one sample per non-empty line; no labels, no spans.
* ``path/to/file.jsonl`` - one JSON object per non-empty line:
  ``{"text": str, "label": int (optional), "pii": [{"start": int, "end": int, "kind": str}, ...]}``
  with character offsets into ``text``, ``end`` exclusive.

:func:`encode` turns records into one int64 tensor ``x`` of shape (N, 2, L): row 0 the token ids, row
1 a tag per token (:data:`PAD`, :data:`SPECIAL`, :data:`PLAIN`, or a PII tag that packs the span's
number within its sample and its kind, see :data:`KIND_BITS`), so that attacks can score per token
and per span without re-tokenizing. Nothing is downloaded and nothing is cached on disk.
"""

from __future__ import annotations

import json
import numbers
import os
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from splitaudit.errors import DataError, ModelError

__all__ = [
    "BUILTIN_CLASSES",
    "KIND_BITS",
    "MAX_KINDS",
    "PAD",
    "PII_KINDS",
    "PLAIN",
    "SPECIAL",
    "TEXT_BUILTIN",
    "TextRecord",
    "builtin_pii_text",
    "claims",
    "encode",
    "load_records",
    "read_jsonl",
    "read_txt",
]

# Token tags (row 1 of encode's x). A PII token's tag is KIND_BITS * span_no + kind_index + 1, where
# span_no is the span's place in its record's (sorted) pii from 1, so record.pii[span_no - 1] is the
# span, and kind_index indexes the kinds encode returns: tag // KIND_BITS is the span number and
# tag % KIND_BITS - 1 the kind index. A span with no token left after truncation has no tag.
PAD, SPECIAL, PLAIN = -2, -1, 0
KIND_BITS = 16
MAX_KINDS = KIND_BITS - 1  # kind_index + 1 must stay below KIND_BITS
PII_KINDS = ("name", "email", "phone", "address", "card", "account")

TEXT_BUILTIN = "builtin:pii-text"
BUILTIN_CLASSES = ("prose", "contact", "payment", "shipping", "account")  # label -> family

_ACCEPTED = (
    f"{TEXT_BUILTIN}, a .txt file (one sample per line) or a .jsonl file "
    '(one {"text": ..., "label": ..., "pii": [{"start", "end", "kind"}]} object per line)'
)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class TextRecord:
    """One text sample: the string, an optional class label, and its PII character spans.

    ``pii`` holds ``(start, end, kind)`` with ``0 <= start < end <= len(text)`` (end exclusive) and a
    non-empty ``kind``; spans may touch but not overlap. They are checked here and stored sorted by
    position, so span ``i`` (from 1) of a sample is the ``i``-th span in text order.
    """

    text: str
    label: int | None = None
    pii: tuple[tuple[int, int, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"text must be a string, got {type(self.text).__name__}")
        if self.label is not None:
            if not _is_int(self.label) or self.label < 0:
                raise DataError(f"label must be a non-negative integer or None, got {self.label!r}")
            object.__setattr__(self, "label", int(self.label))
        spans = []
        n = len(self.text)
        for i, s in enumerate(self.pii):
            if not isinstance(s, Sequence) or isinstance(s, str) or len(s) != 3:
                raise DataError(f"pii[{i}]: expected a (start, end, kind) triple, got {s!r}")
            start, end, kind = s
            if not _is_int(start) or not _is_int(end):
                raise DataError(f"pii[{i}] {tuple(s)!r}: start and end must be integers")
            if not isinstance(kind, str) or not kind.strip():
                raise DataError(f"pii[{i}] {tuple(s)!r}: kind must be a non-empty string")
            if not 0 <= start < end <= n:
                raise DataError(
                    f"pii[{i}] {tuple(s)!r}: out of range; expected 0 <= start < end <= {n} (the text's length)"
                )
            spans.append((int(start), int(end), kind))
        spans.sort()
        for a, b in zip(spans, spans[1:]):
            if b[0] < a[1]:
                raise DataError(f"pii spans {a!r} and {b!r} overlap; spans in one sample must not overlap")
        object.__setattr__(self, "pii", tuple(spans))


# --------------------------------------------------------------------------------------------------
# builtin:pii-text
# --------------------------------------------------------------------------------------------------

# Templates by family (label = index + 1; 0 is plain prose). {kind} with a kind from PII_KINDS plants
# a Faker value and records its span; the other fields are filled with non-personal values.
_FAMILIES: tuple[tuple[str, ...], ...] = (
    (  # 1 contact / support tickets
        "Ticket {ticket}: {name} says the app logs out every few minutes, reply to {email}.",
        "Please call {name} back on {phone} about the refund for order {order}.",
        "New support request from {email}: the password reset link expired twice.",
        "Customer {name} ({phone}) reports that the {item} arrived with a cracked screen.",
        "Voicemail from {phone} at {time}; the caller wants an answer sent to {email}.",
    ),
    (  # 2 payment messages
        "Payment of {amount} declined for card {card}; {name} has been notified.",
        "Refund of {amount} issued to card {card} for order {order}.",
        "{name} asked us to replace the card on file with {card} before {day}.",
        "Invoice {invoice} paid by bank transfer from {account}, amount {amount}.",
        "Chargeback opened on card {card}: the customer disputes {amount} from {day}.",
    ),
    (  # 3 shipping notes
        "Ship order {order} to {name}, {address}.",
        "Delivery for {name} failed at {address}; next attempt on {day}.",
        "Order {order} now goes to {address}, contact phone {phone}.",
        "{carrier} picked up {count} boxes for {address} this morning.",
        "Return label sent to {email} for the {item} shipped to {address}.",
    ),
    (  # 4 account / HR notes
        "Payroll: salary for {name} goes to account {account} from {month}.",
        "HR note: {name} moved to {dept}, new emergency contact number {phone}.",
        "Direct debit for account {account} was signed by {name} on {day}.",
        "New hire {name} starts in {dept} on {day}; send the laptop to {address}.",
        "Account {account} was closed at the request of {email}.",
        "Expense claim from {name}: reimburse {amount} to {account}.",
    ),
)
_FIELD = re.compile(r"\{(\w+)\}")

_ITEMS = ("laptop", "phone", "tablet", "monitor", "headset", "keyboard", "router", "camera", "printer")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_DEPTS = ("Finance", "Sales", "Marketing", "Engineering", "Support", "Logistics", "Legal", "Facilities")
_CARRIERS = ("UPS", "DHL", "FedEx", "The courier", "Our driver")


def _filler(field: str, rng: random.Random) -> str:
    if field == "ticket":
        return f"#{rng.randint(10000, 99999)}"
    if field == "order":
        return f"SO-{rng.randint(100000, 999999)}"
    if field == "invoice":
        return f"INV-{rng.randint(1000, 9999)}"
    if field == "amount":
        return f"{rng.choice('$$€£')}{rng.randint(5, 2500)}.{rng.randint(0, 99):02d}"
    if field == "time":
        return f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(('am', 'pm'))}"
    if field == "count":
        return str(rng.randint(2, 9))
    if field == "item":
        return rng.choice(_ITEMS)
    if field == "day":
        return rng.choice(_DAYS)
    if field == "month":
        return rng.choice(_MONTHS)
    if field == "dept":
        return rng.choice(_DEPTS)
    if field == "carrier":
        return rng.choice(_CARRIERS)
    raise AssertionError(f"template field {field!r} has no filler")  # pragma: no cover


def _pii_value(kind: str, fake, rng: random.Random) -> str:
    if kind == "name":
        return fake.name()
    if kind == "email":
        return fake.email()
    if kind == "phone":
        return fake.phone_number()
    if kind == "address":
        return fake.address().replace("\n", ", ")
    if kind == "card":
        return fake.credit_card_number()
    if kind == "account":
        return fake.iban() if rng.random() < 0.5 else fake.bban()
    raise AssertionError(f"no Faker value for kind {kind!r}")  # pragma: no cover


# (label, parts) per template; parts alternate literal text and field names: [lit, field, lit, ...]
_TEMPLATES: tuple[tuple[int, tuple[str, ...]], ...] = tuple(
    (label, tuple(_FIELD.split(t))) for label, fam in enumerate(_FAMILIES, start=1) for t in fam
)


def _prose_sentences() -> list[str]:
    """English sentences of 40-200 characters from Python's bundled pydoc topics, in a fixed order."""
    from pydoc_data import topics

    out: dict[str, None] = {}
    for key in sorted(topics.topics):
        for para in re.split(r"\n\s*\n", topics.topics[key]):
            lines = [ln.strip() for ln in para.split("\n") if ln.strip()]
            if not lines or any(set(ln) <= set("*=-~^+|") for ln in lines):  # headings, tables
                continue
            if any(ln.startswith((">>>", "...")) for ln in lines):  # interactive examples
                continue
            txt = re.sub(r"^(\* |\d+\. |-+ )", "", " ".join(lines))
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", txt):
                s = s.strip()
                if not 40 <= len(s) <= 200 or not s[0].isupper() or not s.endswith("."):
                    continue
                if sum(c.isalpha() or c == " " for c in s) < 0.88 * len(s):  # code, grammar, numbers
                    continue
                out[s] = None
    return list(out)


def _builtin_license(seed: int) -> str:
    import faker

    v = sys.version_info
    return (
        f"synthetic (Faker {getattr(faker, 'VERSION', '?')}, locale en_US, seed {seed}); plain sentences from "
        f"Python {v.major}.{v.minor}'s pydoc_data.topics (PSF License)"
    )


def builtin_pii_text(n: int = 6000, *, seed: int = 0) -> list[TextRecord]:
    """``n`` labelled records of ``builtin:pii-text``, deterministic per ``seed``.

    About a quarter are plain prose (label 0, no PII); the rest fill one of the templates of
    :data:`_FAMILIES` (label = family). The output for ``n`` is the first ``n`` records of any larger
    ``n`` with the same seed. Prose sentences repeat only once all of them have been used.
    """
    if not _is_int(n) or n < 0:
        raise DataError(f"builtin_pii_text: n must be a non-negative integer, got {n!r}")
    if not _is_int(seed):
        raise DataError(f"builtin_pii_text: seed must be an integer, got {seed!r}")
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    prose = _prose_sentences()
    order: list[str] = []
    out: list[TextRecord] = []
    for _ in range(n):
        if rng.random() < 0.25:
            if not order:
                order = prose[:]
                rng.shuffle(order)
            out.append(TextRecord(order.pop(), label=0))
            continue
        label, parts = _TEMPLATES[rng.randrange(len(_TEMPLATES))]
        buf: list[str] = []
        pos = 0
        spans: list[tuple[int, int, str]] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                value = part
            elif part in PII_KINDS:
                value = _pii_value(part, fake, rng)
                spans.append((pos, pos + len(value), part))
            else:
                value = _filler(part, rng)
            buf.append(value)
            pos += len(value)
        out.append(TextRecord("".join(buf), label=label, pii=tuple(spans)))
    return out


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number from 1, line without its line ending) of every non-blank line of a UTF-8 file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e}); expected {what}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}); expected {what} in UTF-8") from None
    # split on "\n" only, so that line numbers match an editor's (str.splitlines also splits on \x0c, \u2028 ...)
    lines = [(i, ln.rstrip("\r")) for i, ln in enumerate(text.split("\n"), start=1)]
    lines = [(i, ln) for i, ln in lines if ln.strip()]
    if not lines:
        raise DataError(f"{path}: no samples (the file has no non-empty line); expected {what}")
    return lines


def read_txt(path: Path) -> list[TextRecord]:
    """One unlabelled record without spans per non-empty line of a UTF-8 text file (whitespace stripped)."""
    return [TextRecord(ln.strip()) for _, ln in _read_lines(Path(path), "one sample per line")]


_JSONL_WHAT = 'one JSON object {"text": str, "label": int, "pii": [{"start", "end", "kind"}]} per line'


def _jsonl_span(item, j: int, where: str) -> tuple[int, int, str]:
    if not isinstance(item, dict) or not {"start", "end", "kind"} <= item.keys():
        raise DataError(
            f'{where}: pii[{j}] is {json.dumps(item)[:80]}; expected an object with integer "start" and "end" '
            f'and string "kind"'
        )
    start, end, kind = item["start"], item["end"], item["kind"]
    if not _is_int(start) or not _is_int(end):
        raise DataError(f'{where}: pii[{j}]: "start" and "end" must be integers, got {start!r} and {end!r}')
    return start, end, kind


def read_jsonl(path: Path) -> list[TextRecord]:
    """Records from a JSON-lines file (see the module docstring); every error names the line.

    Unknown keys are ignored; ``"label": null`` and ``"pii": null`` count as absent. Either every line
    has a label or none has.
    """
    path = Path(path)
    out: list[TextRecord] = []
    first_labelled: int | None = None
    first_unlabelled: int | None = None
    for lineno, line in _read_lines(path, _JSONL_WHAT):
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); expected {_JSONL_WHAT}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: got a JSON {type(obj).__name__}; expected {_JSONL_WHAT}")
        text = obj.get("text")
        if not isinstance(text, str) or not text.strip():
            got = "no \"text\"" if "text" not in obj else f'"text": {json.dumps(text)[:40]}'
            raise DataError(f'{where}: {got}; expected "text" to be a non-empty string')
        label = obj.get("label")
        if label is not None and (not _is_int(label) or label < 0):
            raise DataError(f'{where}: "label": {json.dumps(label)[:40]}; expected a non-negative integer (or no label)')
        pii = obj.get("pii")
        if pii is None:
            pii = []
        if not isinstance(pii, list):
            raise DataError(f'{where}: "pii" is a JSON {type(pii).__name__}; expected a list of {{"start", "end", "kind"}}')
        spans = tuple(_jsonl_span(item, j, where) for j, item in enumerate(pii))
        try:
            rec = TextRecord(text, label=label, pii=spans)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if label is None and first_unlabelled is None:
            first_unlabelled = lineno
        elif label is not None and first_labelled is None:
            first_labelled = lineno
        if first_labelled is not None and first_unlabelled is not None:
            raise DataError(
                f"{where}: has {'a' if label is not None else 'no'} \"label\" but line "
                f"{first_unlabelled if label is not None else first_labelled} has "
                f"{'none' if label is not None else 'one'}; give every line a label or none"
            )
        out.append(rec)
    return out


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


def _norm_spec(spec) -> str | None:
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    return spec.strip() if isinstance(spec, str) else None


def claims(spec: str) -> bool:
    """Whether ``spec`` names text data: ``builtin:pii-text`` or a path ending in .txt / .jsonl."""
    s = _norm_spec(spec)
    if s is None:
        return False
    low = s.lower()
    return low == TEXT_BUILTIN or low.endswith((".txt", ".jsonl"))


def load_records(spec: str) -> tuple[list[TextRecord], str]:
    """The records named by ``spec`` and a licence / provenance line (see the module docstring)."""
    s = _norm_spec(spec)
    if s is None:
        raise DataError(f"text data spec must be a string, got {type(spec).__name__}; accepted: {_ACCEPTED}")
    low = s.lower()
    if low == TEXT_BUILTIN:
        return builtin_pii_text(), _builtin_license(0)
    if low.startswith("builtin:"):
        raise DataError(f"unknown builtin text data {s!r}; known: {TEXT_BUILTIN}")
    if not low.endswith((".txt", ".jsonl")):
        raise DataError(f"{s}: not a text data spec; accepted: {_ACCEPTED}")
    path = Path(os.path.expanduser(s))
    if not path.is_file():
        why = "not a file" if path.exists() else "no such file"
        raise DataError(f"{s}: text data not found ({why}); accepted: {_ACCEPTED}")
    records = read_jsonl(path) if low.endswith(".jsonl") else read_txt(path)
    return records, f"user-supplied file {s} (licence not stated)"


# --------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------


def _kinds(records: Sequence[TextRecord]) -> tuple[str, ...]:
    kinds = list(PII_KINDS)
    seen = set(kinds)
    for i, r in enumerate(records):
        for _, _, k in r.pii:
            if k not in seen:
                if len(kinds) == MAX_KINDS:
                    raise DataError(
                        f"record {i}: PII kind {k!r} would be kind number {len(kinds) + 1}; at most {MAX_KINDS} "
                        f"kinds fit (the {len(PII_KINDS)} builtin ones {', '.join(PII_KINDS)} and "
                        f"{MAX_KINDS - len(PII_KINDS)} more)"
                    )
                kinds.append(k)
                seen.add(k)
    return tuple(kinds)


def _labels(records: Sequence[TextRecord]) -> torch.Tensor | None:
    have = [r.label is not None for r in records]
    if not any(have):
        return None
    if not all(have):
        i = have.index(not have[0])  # the first record that differs from record 0
        raise DataError(
            f"record {i} has {'no' if have[0] else 'a'} label but record 0 has {'one' if have[0] else 'none'}; "
            f"give every record a label or none"
        )
    return torch.tensor([r.label for r in records], dtype=torch.int64)


def _tag_pii(tags: np.ndarray, offsets: np.ndarray, special: np.ndarray, spans, kind_index: dict[str, int]) -> None:
    """Write PII tags into ``tags`` (T,) for the tokens of one sample that overlap its spans.

    Span ``j`` of ``spans`` (sorted, as :class:`TextRecord` keeps them) is span number ``j + 1``. A
    token that overlaps two spans (possible when spans touch inside one word piece) goes to the one it
    overlaps most, the earlier on a tie. A span left without a token (cut off by truncation, or one
    that covers only characters the tokenizer drops) does not appear; the others keep their numbers.
    """
    sp = np.asarray([(a, b) for a, b, _ in spans], dtype=np.int64)  # (S, 2)
    ov = np.minimum(offsets[:, 1:2], sp[None, :, 1]) - np.maximum(offsets[:, 0:1], sp[None, :, 0])  # (T, S)
    ov[special] = 0
    hit = ov.max(axis=1) > 0
    if not hit.any():
        return
    owner = ov.argmax(axis=1)[hit]  # first maximum: the earlier span on a tie
    code = np.asarray(
        [KIND_BITS * (j + 1) + kind_index[k] + 1 for j, (_, _, k) in enumerate(spans)], dtype=np.int64
    )
    tags[hit] = code[owner]


def encode(records: Iterable[TextRecord], tokenizer, *, max_length: int = 64):
    """Token ids and tags of ``records`` as (x (N, 2, L) int64, kinds, y (N,) int64 or None).

    ``tokenizer`` is a Hugging Face *fast* tokenizer (offsets are needed to place the spans). Samples
    are truncated to ``max_length`` tokens and padded to the longest encoded sample L, not to
    ``max_length``. ``x[:, 0]`` holds the ids (padding: the pad token, else EOS, else 0); ``x[:, 1]`` the
    tags: :data:`PAD`, :data:`SPECIAL`, :data:`PLAIN`, or ``KIND_BITS * span_no + kind_index + 1`` for
    a token whose characters overlap a PII span, ``span_no`` being the span's place in ``record.pii``
    from 1 (a span cut off entirely by truncation has no token). ``kinds`` lists the kind names by index: the builtin
    :data:`PII_KINDS`, then others in order of first appearance. ``y`` is None when no record has a label.
    """
    records = list(records)
    if not records:
        raise DataError("encode: no records; expected at least one text sample")
    for i, r in enumerate(records):
        if not isinstance(r, TextRecord):
            raise DataError(f"encode: record {i} is a {type(r).__name__}; expected a TextRecord")
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"encode needs a fast (Rust-backed) Hugging Face tokenizer for character offsets, got "
            f"{type(tokenizer).__name__}; load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    n_special = int(tokenizer.num_special_tokens_to_add(pair=False))
    if not _is_int(max_length) or max_length <= n_special:
        raise DataError(
            f"encode: max_length must be an integer above the tokenizer's {n_special} special tokens, got {max_length!r}"
        )
    kinds = _kinds(records)
    y = _labels(records)
    kind_index = {k: i for i, k in enumerate(kinds)}

    enc = tokenizer(
        [r.text for r in records],
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    ids_all, offs_all, spec_all = enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"]
    length = max(len(ids) for ids in ids_all)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0
    x = np.full((len(records), 2, length), pad_id, dtype=np.int64)
    x[:, 1] = PAD
    for i, r in enumerate(records):
        ids = ids_all[i]
        t = len(ids)
        special = np.asarray(spec_all[i], dtype=bool)
        tags = np.where(special, SPECIAL, PLAIN).astype(np.int64)
        if r.pii and t:
            offsets = np.asarray(offs_all[i], dtype=np.int64).reshape(t, 2)
            _tag_pii(tags, offsets, special, r.pii, kind_index)
        x[i, 0, :t] = ids
        x[i, 1, :t] = tags
    return torch.from_numpy(x), kinds, y
