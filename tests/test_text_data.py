"""The text data layer: builtin:pii-text, .txt / .jsonl reading, and encode's ids and tags."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from splitaudit import text_data as td
from splitaudit.errors import DataError, ModelError
from splitaudit.text_data import KIND_BITS, PAD, PII_KINDS, PLAIN, SPECIAL, TextRecord

# --------------------------------------------------------------------------------------------------
# builtin:pii-text
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin6000():
    records, licence = td.load_records("builtin:pii-text")
    return records, licence


def test_builtin_default_is_large_labelled_and_a_quarter_plain(builtin6000):
    records, licence = builtin6000
    assert len(records) >= 5000
    assert "Faker" in licence and "seed 0" in licence and "pydoc_data" in licence and "PSF" in licence
    labels = [r.label for r in records]
    assert set(labels) == set(range(len(td.BUILTIN_CLASSES)))
    plain = [r for r in records if not r.pii]
    assert 0.2 < len(plain) / len(records) < 0.3
    assert all(r.label == 0 for r in plain) and all(r.label != 0 for r in records if r.pii)
    # plain prose does not repeat before the sentences run out
    assert len({r.text for r in plain}) == len(plain)
    assert all(40 <= len(r.text) <= 200 and r.text.endswith(".") for r in plain)
    # every kind is planted, and records stay short
    assert {k for r in records for _, _, k in r.pii} == set(PII_KINDS)
    assert max(len(r.text) for r in records) <= 200


_PLAUSIBLE = {
    "name": re.compile(r"[A-Z][A-Za-z'.\-]*( [A-Za-z'.\-]+)+"),
    "email": re.compile(r"[\w.+\-]+@[\w\-]+(\.[\w\-]+)+"),
    "phone": re.compile(r"[0-9+()\-. x]{7,}"),
    "address": re.compile(r".+, .*[A-Z]{2} \d{5}"),  # street, town, ST 12345 (or USNS ..., FPO AP 12345)
    "card": re.compile(r"[0-9 \-]{12,19}"),
    "account": re.compile(r"[A-Z]{2}\d{2}[A-Z0-9]{10,30}|[A-Z0-9]{10,30}"),
}


def test_builtin_spans_look_like_their_kind(builtin6000):
    records, _ = builtin6000
    n_spans = 0
    for r in records:
        for a, b, kind in r.pii:
            value = r.text[a:b]
            assert _PLAUSIBLE[kind].fullmatch(value), (kind, value, r.text)
            assert value == value.strip()
            # the span is the whole value: it is not cut inside a word on either side
            assert a == 0 or not r.text[a - 1].isalnum(), (kind, r.text)
            assert b == len(r.text) or not r.text[b].isalnum(), (kind, r.text)
            n_spans += 1
    assert n_spans > len(records)  # about two spans per non-prose record


class _StubFaker:
    """Stands in for faker.Faker: distinct, recognisable values, and a log of what it handed out."""

    log: list[tuple[str, str]] = []

    def __init__(self, locale):
        assert locale == "en_US"
        self.i = 0

    def seed_instance(self, seed):
        self.seed = seed

    def _v(self, kind, value):
        self.i += 1
        self.log.append((kind, value))
        return value

    def name(self):
        return self._v("name", f"Name{self.i} Stub")

    def email(self):
        return self._v("email", f"stub{self.i}@example.org")

    def phone_number(self):
        return self._v("phone", f"555-01{self.i:04d}")

    def address(self):
        return self._v("address", f"{self.i} Stub Road\nStubtown, ST {self.i:05d}")

    def credit_card_number(self):
        return self._v("card", f"4{self.i:015d}")

    def iban(self):
        return self._v("account", f"GB00STUB{self.i:014d}")

    def bban(self):
        return self._v("account", f"STUB{self.i:014d}")


def test_builtin_span_text_is_exactly_the_faker_value(monkeypatch):
    import faker

    monkeypatch.setattr(faker, "Faker", _StubFaker)
    monkeypatch.setattr(_StubFaker, "log", [])
    records = td.builtin_pii_text(300, seed=5)
    got = [(k, r.text[a:b]) for r in records for a, b, k in r.pii]
    want = [(k, v.replace("\n", ", ")) for k, v in _StubFaker.log]
    assert got == want and len(got) > 300


def test_builtin_is_deterministic_per_seed_and_independent_of_global_state():
    import faker

    random.seed(1)
    faker.Faker.seed(1)
    a = td.builtin_pii_text(200, seed=3)
    random.seed(2)
    faker.Faker.seed(2)
    b = td.builtin_pii_text(200, seed=3)
    assert a == b
    c = td.builtin_pii_text(200, seed=4)
    assert [r.text for r in c] != [r.text for r in a]
    # n controls how many are made; a smaller n is a prefix of a larger one
    assert td.builtin_pii_text(50, seed=3) == a[:50]
    assert td.builtin_pii_text(0) == []
    with pytest.raises(DataError, match="n must be"):
        td.builtin_pii_text(-1)


# --------------------------------------------------------------------------------------------------
# Records and files
# --------------------------------------------------------------------------------------------------


def test_record_sorts_spans_and_rejects_bad_ones():
    r = TextRecord("ab cd ef", label=2, pii=[(6, 8, "name"), (0, 2, "email"), (2, 3, "x")])  # touching is fine
    assert r.pii == ((0, 2, "email"), (2, 3, "x"), (6, 8, "name"))
    with pytest.raises(DataError, match="overlap"):
        TextRecord("ab cd ef", pii=((0, 4, "name"), (3, 5, "email")))
    with pytest.raises(DataError, match="out of range"):
        TextRecord("abc", pii=((1, 4, "name"),))
    with pytest.raises(DataError, match="out of range"):
        TextRecord("abc", pii=((2, 2, "name"),))
    with pytest.raises(DataError, match="kind"):
        TextRecord("abc", pii=((0, 1, ""),))
    with pytest.raises(DataError, match="label"):
        TextRecord("abc", label=-1)
    with pytest.raises(DataError, match="label"):
        TextRecord("abc", label=True)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_round_trip_and_load_records(tmp_path):
    records = td.builtin_pii_text(30, seed=1)
    rows = [{"text": r.text, "label": r.label, "pii": [{"start": a, "end": b, "kind": k} for a, b, k in r.pii]}
            for r in records]
    rows.append({"text": "ticket T-9 for Ann", "label": 7, "pii": [{"start": 7, "end": 10, "kind": "ticket"}],
                 "id": "ignored"})
    path = _write_jsonl(tmp_path / "d.jsonl", rows[:15] + ["", "   "] + rows[15:])  # blank lines are skipped
    back = td.read_jsonl(path)
    assert back == records + [TextRecord("ticket T-9 for Ann", 7, ((7, 10, "ticket"),))]
    got, licence = td.load_records(str(path))
    assert got == back and str(path) in licence
    # no label anywhere, no pii key: fine
    path2 = _write_jsonl(tmp_path / "u.jsonl", [{"text": "one"}, {"text": "two", "label": None, "pii": None}])
    assert td.read_jsonl(path2) == [TextRecord("one"), TextRecord("two")]


def test_txt_round_trip(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("\ufefffirst line\r\n\n   \n  second  line \nthird", encoding="utf-8")
    assert td.read_txt(path) == [TextRecord("first line"), TextRecord("second  line"), TextRecord("third")]
    assert td.load_records(str(path))[0] == td.read_txt(path)
    (tmp_path / "e.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="no samples"):
        td.read_txt(tmp_path / "e.txt")
    (tmp_path / "b.txt").write_bytes(b"ok\nfine\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"b\.txt:3: not valid UTF-8"):
        td.read_txt(tmp_path / "b.txt")


_GOOD = {"text": "call Ann Lee", "label": 1, "pii": [{"start": 5, "end": 12, "kind": "name"}]}


@pytest.mark.parametrize(
    "bad, line, match",
    [
        ('{"text": "x", "label": 1', 3, "not valid JSON"),
        ('["text"]', 3, "got a JSON list"),
        ({"label": 1}, 3, 'no "text"'),
        ({"text": "  ", "label": 1}, 3, "non-empty string"),
        ({"text": "abc", "label": 1.5}, 3, "non-negative integer"),
        ({"text": "abc", "label": 1, "pii": [{"start": 0, "end": 4, "kind": "name"}]}, 3, "out of range"),
        ({"text": "abc", "label": 1, "pii": [{"start": -1, "end": 2, "kind": "name"}]}, 3, "out of range"),
        ({"text": "abcdef", "label": 1, "pii": [{"start": 0, "end": 3, "kind": "name"},
                                                {"start": 2, "end": 5, "kind": "card"}]}, 3, "overlap"),
        ({"text": "abc", "label": 1, "pii": [{"start": 0, "end": 2}]}, 3, r"pii\[0\].*expected an object"),
        ({"text": "abc", "label": 1, "pii": [{"start": "0", "end": 2, "kind": "name"}]}, 3, "integers"),
        ({"text": "abc", "label": 1, "pii": [{"start": 0, "end": 2, "kind": ""}]}, 3, "non-empty string"),
        ({"text": "abc", "label": 1, "pii": {"start": 0}}, 3, "expected a list"),
        ({"text": "abc"}, 3, r'no "label" but line 1 has one'),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, bad, line, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", [_GOOD, "", bad, _GOOD])
    with pytest.raises(DataError, match=rf"bad\.jsonl:{line}: .*{match}"):
        td.read_jsonl(path)


def test_jsonl_partial_labels_the_other_way_round(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c", "label": 0}])
    with pytest.raises(DataError, match=r"p\.jsonl:3: has a \"label\" but line 1 has none"):
        td.read_jsonl(path)


def test_specs(tmp_path):
    assert td.claims("builtin:pii-text") and td.claims(" builtin:PII-text ")
    assert td.claims("data/x.txt") and td.claims("x.JSONL") and td.claims(tmp_path / "y.jsonl")
    assert not td.claims("builtin:mnist") and not td.claims("x.npz") and not td.claims("dir/") and not td.claims(3)
    with pytest.raises(DataError, match="unknown builtin text data"):
        td.load_records("builtin:nope")
    with pytest.raises(DataError, match="no such file"):
        td.load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="not a text data spec"):
        td.load_records("x.csv")


# --------------------------------------------------------------------------------------------------
# encode
# --------------------------------------------------------------------------------------------------

_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "please", "call", "ann", "lee", "at", "555",
          "hello", "ticket", "zz", "##9", "for"]


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    # from_pretrained on a folder with vocab.txt: works offline under transformers 4 and 5 (in 5,
    # BertTokenizerFast(vocab_file=...) silently ignores the file and leaves a 5-token vocabulary)
    tok = transformers.BertTokenizerFast.from_pretrained(str(d))
    assert tok.is_fast and tok.pad_token_id == 0
    assert tok("please call")["input_ids"] == [2, 5, 6, 3]  # the vocabulary really was loaded
    return tok


def _tag(span_no: int, kind: str, kinds=PII_KINDS) -> int:
    return KIND_BITS * span_no + kinds.index(kind) + 1


def test_encode_ids_tags_padding_and_kinds(tiny_tok):
    recs = [
        TextRecord("please call ann lee at 555", 1, ((12, 19, "name"), (23, 26, "phone"))),
        TextRecord("hello", 0),
        TextRecord("ticket zz9 for ann", 2, ((7, 10, "ticket"), (15, 18, "name"))),
    ]
    x, kinds, y = td.encode(recs, tiny_tok)
    assert kinds == PII_KINDS + ("ticket",)
    assert x.dtype == torch.int64 and x.shape == (3, 2, 8)  # L = the longest sample, not max_length
    assert y.tolist() == [1, 0, 2] and y.dtype == torch.int64
    assert x[0, 0].tolist() == [2, 5, 6, 7, 8, 9, 10, 3]
    assert x[0, 1].tolist() == [SPECIAL, PLAIN, PLAIN, _tag(1, "name"), _tag(1, "name"), PLAIN, _tag(2, "phone"),
                                SPECIAL]
    assert x[1, 0].tolist() == [2, 11, 3, 0, 0, 0, 0, 0]
    assert x[1, 1].tolist() == [SPECIAL, PLAIN, SPECIAL] + [PAD] * 5
    # a custom kind takes the next index; a span of two word pieces tags both
    assert x[2, 0, :7].tolist() == [2, 12, 13, 14, 15, 7, 3]
    assert x[2, 1].tolist() == [SPECIAL, PLAIN, _tag(1, "ticket", kinds), _tag(1, "ticket", kinds), PLAIN,
                                _tag(2, "name"), SPECIAL, PAD]
    # tags decode back to the record's span and kind
    t = int(x[2, 1, 2])
    assert recs[2].pii[t // KIND_BITS - 1][2] == kinds[t % KIND_BITS - 1] == "ticket"


def test_encode_truncation_keeps_part_of_a_span_and_drops_a_lost_one(tiny_tok):
    rec = TextRecord("please call ann lee at 555", None, ((12, 19, "name"), (23, 26, "phone")))
    x, _, y = td.encode([rec], tiny_tok, max_length=5)
    assert y is None and x.shape == (1, 2, 5)
    assert x[0, 1].tolist() == [SPECIAL, PLAIN, PLAIN, _tag(1, "name"), SPECIAL]  # "ann" survives, "lee" and 555 not
    x, _, _ = td.encode([rec], tiny_tok, max_length=4)
    assert x[0, 1].tolist() == [SPECIAL, PLAIN, PLAIN, SPECIAL]
    with pytest.raises(DataError, match="max_length"):
        td.encode([rec], tiny_tok, max_length=2)


def test_encode_token_over_two_spans_goes_to_the_larger_overlap(tiny_tok):
    rec = TextRecord("call 555", 0, ((5, 6, "phone"), (6, 8, "card")))
    x, _, _ = td.encode([rec], tiny_tok)
    assert x[0, 1].tolist() == [SPECIAL, PLAIN, _tag(2, "card"), SPECIAL]  # span 1 has no token left


def test_encode_builtin_records(tiny_tok):
    recs = td.builtin_pii_text(200)
    x, kinds, y = td.encode(recs, tiny_tok, max_length=128)
    assert kinds == PII_KINDS and y.tolist() == [r.label for r in recs]
    lengths = (x[:, 1] != PAD).sum(1)
    assert int(lengths.max()) == x.shape[2]
    for i, r in enumerate(recs):
        tags = x[i, 1, : int(lengths[i])]
        assert tags[0] == SPECIAL and tags[-1] == SPECIAL and (tags[1:-1] >= PLAIN).all()
        pii = tags[tags > 0]
        assert sorted(set((pii // KIND_BITS).tolist())) == list(range(1, len(r.pii) + 1))  # nothing truncated
        for t in pii.tolist():
            assert r.pii[t // KIND_BITS - 1][2] == kinds[t % KIND_BITS - 1]


class _NoPadTokenizer:
    """A fast tokenizer without a pad token (like GPT-2's): padding falls back to EOS."""

    is_fast = True
    pad_token_id = None
    eos_token_id = 9

    def __init__(self, inner):
        self.inner = inner

    def num_special_tokens_to_add(self, pair=False):
        return self.inner.num_special_tokens_to_add(pair=pair)

    def __call__(self, *a, **k):
        return self.inner(*a, **k)


def test_encode_errors_and_eos_padding(tiny_tok):
    x, _, _ = td.encode([TextRecord("hello"), TextRecord("please call ann")], _NoPadTokenizer(tiny_tok))
    assert x[0, 0].tolist() == [2, 11, 3, 9, 9]
    with pytest.raises(DataError, match="record 2 has no label but record 0 has one"):
        td.encode([TextRecord("a", 0), TextRecord("b", 1), TextRecord("c")], tiny_tok)
    with pytest.raises(DataError, match="record 1 has a label but record 0 has none"):
        td.encode([TextRecord("a"), TextRecord("b", 1)], tiny_tok)
    many = [TextRecord("abcdefghij", None, tuple((i, i + 1, f"k{i}") for i in range(10)))]
    with pytest.raises(DataError, match="at most 15 kinds"):
        td.encode(many, tiny_tok)
    x, kinds, _ = td.encode([TextRecord("abcdefghi", None, tuple((i, i + 1, f"k{i}") for i in range(9)))], tiny_tok)
    assert len(kinds) == 15
    with pytest.raises(DataError, match="no records"):
        td.encode([], tiny_tok)

    class Slow:
        is_fast = False

    with pytest.raises(ModelError, match="fast"):
        td.encode([TextRecord("a")], Slow())
