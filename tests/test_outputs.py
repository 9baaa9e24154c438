"""Real users' models and data: outputs of any structure, input normalization, names as asked, a cache
keyed by code, and bad input that exits 2 with one line."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from splitaudit.cli import main
from splitaudit.errors import ModelError, SpecError
from splitaudit.outputs import adapt_model, flatten, nbytes_per_sample, parse_input_norm, pick, put
from tests.conftest import write_tiny_npz

MULTIHEAD = str(Path(__file__).parents[1] / "examples" / "multihead.py")


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: tuple


def test_paths_pick_and_put_in_any_nest():
    a, b, c = torch.zeros(2, 3), torch.ones(2, 4), torch.full((2, 1), 2.0)
    nest = (a, {"pred": b, "aux": [c]})
    assert [p for p, _ in flatten(nest)] == ["0", "1.pred", "1.aux.0"]
    assert pick(nest, "1.pred") is b and pick(nest) is a and pick(a) is a
    new = put(nest, "1.aux.0", c + 1)
    assert torch.equal(new[1]["aux"][0], c + 1) and new[1]["pred"] is b and nest[1]["aux"][0] is c  # a copy
    dc = Out(logits=a, extra=(b,))
    assert [p for p, _ in flatten(dc)] == ["logits", "extra.0"] and pick(dc, "extra.0") is b
    od = OrderedDict(last_hidden_state=b, pooler_output=a)  # a ModelOutput is an OrderedDict of its set fields
    assert pick(od) is b and pick(od, "pooler_output") is a
    with pytest.raises(SpecError, match=r"no tensor at 'logit'; its tensors are at: logits, extra.0"):
        pick(dc, "logit")
    with pytest.raises(ModelError, match="holds no tensor"):
        pick({"label": "cat"})
    assert nbytes_per_sample((a, a, b)) == 4 * 3 + 4 * 4  # a tensor sent twice is counted once


def test_input_norm_is_parsed_per_channel_and_checked():
    assert parse_input_norm("0.5,0.25") == ((0.5,), (0.25,))
    assert parse_input_norm("0.4/0.5/0.6,0.2/0.2/0.3") == ((0.4, 0.5, 0.6), (0.2, 0.2, 0.3))
    for bad in ("0.5", "a,b", "0.5,0", "0.5,-1", "1/2,3/4/5"):
        with pytest.raises(SpecError, match="input-norm"):
            parse_input_norm(bad)


def test_an_adapted_model_normalizes_its_input_and_picks_its_output():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"score": self.lin(x.flatten(1)), "raw": x}

    torch.manual_seed(0)
    m, ref = Two(), Two()
    ref.load_state_dict(m.state_dict())
    adapt_model(m, output="score", input_norm=((0.5,), (0.25,)), channels=1)
    x = torch.rand(2, 1, 2, 2)
    assert torch.allclose(m(x), ref((x - 0.5) / 0.25)["score"])
    assert set(m.state_dict()) == set(ref.state_dict())  # the normalization adds no weights, the names stay
    assert [n for n, _ in m.named_modules()] == [n for n, _ in ref.named_modules()]


def test_a_multi_head_model_is_audited_without_a_wrapper(tmp_path, capsys):
    npz = write_tiny_npz(tmp_path / "d.npz", n=180)
    assert main(["cuts", "--model", f"{MULTIHEAD}:build", "--data", str(npz), "--json"]) == 0
    cuts = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert {"block", "classes", "landmarks"} <= set(cuts)
    assert cuts["block"]["bytes_per_sample"] == 2 * cuts["block.conv"]["bytes_per_sample"]  # the dict's two tensors travel
    out = tmp_path / "out"
    code = main(["audit", "--model", f"{MULTIHEAD}:build", "--data", str(npz), "--cut", "stem", "--cut", "block", "--cut", "block:skip",
                 "--profile", "quick", "--out", str(out), "--no-cache"])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())
    assert r["model"]["output"] == "the first tensor"
    assert [c["name"] for c in r["cuts"]] == ["stem", "block", "block:skip"]  # the names asked for, not stem.2
    assert "stem.2" in r["cuts"][0]["aliases"]
    assert {row["cut"] for row in r["results"]} == {"stem", "block", "block:skip"}
    assert all(row["status"] == "ok" and row["accuracy"] is not None for row in r["results"])
    assert {a["cut"] for a in r["assessment"]} == {"stem", "block", "block:skip"}


@pytest.mark.parametrize("args, needle", [
    (["--output", "9"], "no tensor at '9'; its tensors are at: 0, 1"),
    (["--input-norm", "0.5"], "--input-norm '0.5' is not MEAN,STD"),
    (["--input-norm", "0.1/0.2,0.3/0.4"], "the data has 1 channel"),
])
def test_bad_output_and_input_norm_exit_2_with_one_line(tmp_path, capsys, args, needle):
    npz = write_tiny_npz(tmp_path / "d.npz", n=60)
    code = main(["audit", "--model", f"{MULTIHEAD}:build", "--data", str(npz), "--profile", "quick", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1 and err.startswith("error:") and "Traceback" not in err


def test_a_model_whose_output_holds_no_tensor_and_text_as_image_data_exit_2(tmp_path, capsys):
    (tmp_path / "words.py").write_text(
        "from torch import nn\n"
        "class Words(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = nn.Linear(144, 2)\n"
        "    def forward(self, x):\n"
        "        return {'label': 'cat'}\n"
        "def build():\n"
        "    return Words()\n")
    npz = write_tiny_npz(tmp_path / "d.npz", n=60)
    assert main(["audit", "--model", f"{tmp_path}/words.py:build", "--data", str(npz)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "holds no tensor" in err and err.count("\n") == 1
    (tmp_path / "notes.txt").write_text("these are words, not pixels\n")
    assert main(["audit", "--model", f"{MULTIHEAD}:build", "--data", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "notes.txt" in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_edited_forward_with_the_same_weights_is_another_model(tmp_path):
    """The cache keys a user model by its weights and its code: an edit to forward recomputes."""
    from splitaudit.config import AuditConfig
    from splitaudit.runner import run_audit

    npz = write_tiny_npz(tmp_path / "d.npz", n=120)
    src = (Path(__file__).parent / "tiny.py").read_text()
    model = tmp_path / "model.py"
    model.write_text(src)
    cfg = AuditConfig(model=f"{model}:build", data=str(npz), cuts=("stem",), profile="quick", cache_dir=str(tmp_path / "c"))
    first = run_audit(cfg)
    again = run_audit(cfg)
    assert again.config["cache"]["by_kind"]["attacks"]["hits"] > 0 and again.model["hash"] == first.model["hash"]
    model.write_text(src.replace("x = F.relu(self.stem(x))", "x = F.leaky_relu(self.stem(x), 0.5)"))  # the same weights
    edited = run_audit(cfg)
    assert edited.model["weights_hash"] == first.model["weights_hash"] and edited.model["hash"] != first.model["hash"]
    assert edited.config["cache"]["by_kind"]["attacks"].get("hits", 0) == 0  # nothing served from the other model
    assert set(edited.config["cache"]["keys"]["attacks"]).isdisjoint(first.config["cache"]["keys"]["attacks"])


def test_input_norm_keeps_reconstructions_in_the_datas_space(tmp_path):
    """With --input-norm the model sees normalized inputs; the attacker still rebuilds, and is scored on,
    images in [0, 1], and the normalized model audited agrees with a model that normalizes itself."""
    from splitaudit.config import AuditConfig
    from splitaudit.runner import run_audit

    npz = write_tiny_npz(tmp_path / "d.npz", n=120)
    r = run_audit(AuditConfig(model="tests/tiny.py:build", data=str(npz), cuts=("fc",), profile="quick", use_cache=False,
                              input_norm="0.3,0.2"))
    (row,) = r.results
    assert row.status == "ok" and 0 <= row.ssim <= 1 and row.accuracy is not None
    assert r.model["input_norm"] == {"mean": [0.3], "std": [0.2]}


def test_an_edited_attack_gets_new_cache_keys(tmp_path, monkeypatch):
    """Attack, defense and training code is keyed by its source: no version string to bump by hand."""
    import importlib
    import sys

    from splitaudit import cache_keys

    mod = tmp_path / "my_attack.py"
    mod.write_text("class MyAttack:\n    def fit(self):\n        return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = importlib.import_module("my_attack")
    before = cache_keys.code_of(m.MyAttack)
    mod.write_text("class MyAttack:\n    def fit(self):\n        return 2  # edited\n")
    cache_keys._module_source_hash.cache_clear()
    importlib.reload(sys.modules["my_attack"])
    assert cache_keys.code_of(sys.modules["my_attack"].MyAttack) != before
    assert cache_keys.code_of(m.MyAttack) == cache_keys.code_of(m.MyAttack)  # stable for the same source
