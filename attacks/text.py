"""The text modality: token-level leakage from a split transformer's hidden states.

What the attacker rebuilds is the token sequence. Scores are per sample and higher means more leakage
(:mod:`splitaudit.text_metrics`): ``token_accuracy`` (the headline), ``rouge_l``, ``exact_match`` and
``pii_recovery`` (planted spans whose every token came back, also by kind). The no-information guess
is the most frequent aux token at each position.

The learned inverter (the ``decoder`` attack on text) follows the inverters of split-LLM attacks
(BiSR, Chen et al., CCS'24, arXiv 2409.00960; and Song and Raghunathan, CCS'20, for embeddings): a
position-wise projection of the hidden state, a convolution over neighbouring positions (a token's
hidden state at a deep block is spread over its neighbours), and a classifier over the attacker's
vocabulary, the tokens that occur in its own aux texts (a token it never saw it cannot name). It
trains in bfloat16 where the hardware has it (AMX here: the classifier's matmuls 2-5x faster). For
the pooled sentence embedding, a dense stem first unfolds the vector into one feature per position:
a non-autoregressive sequence decoder (vec2text, Morris et al. 2023, refines such a guess iteratively
with the encoder; that is not done here).
"""

from __future__ import annotations

import html

import torch
import torch.nn.functional as F
from torch import nn

from splitaudit.attacks.base import ZeroLinear, fast_autocast
from splitaudit.attacks.modality import MetricInfo, Modality, register_modality
from splitaudit.errors import DataError
from splitaudit.text_data import MAX_KINDS, PAD

CHUNK = 64  # sequences per inference step (logits of 64 x L x vocabulary floats at a time)


@register_modality
class TextModality(Modality):
    name = "text"
    metrics = (
        MetricInfo("token_accuracy", "token acc.", 3, 5, (0.0, 1.0)),
        MetricInfo("rouge_l", "ROUGE-L", 3, 5, (0.0, 1.0)),
        MetricInfo("exact_match", "exact", 3, 5, (0.0, 1.0)),
        MetricInfo("pii_recovery", "PII rec.", 3, 5, (0.0, 1.0), per="pii_spans"),
    )
    headline = "token_accuracy"
    examples_format = "html"
    utility_draws = 1
    # The defended sentence embeddings of 250 evaluation texts: a mean cosine similarity near 0.9 varied by about 0.005
    # (95%) between two draws of 500, so by about 0.007 at 250 (1/sqrt(n)); each (cut, defense) runs the blocks after
    # its cut on them, 42 s of the standard text demo's 185 s at 500.
    utility_samples = 250

    # -- data --
    def claims(self, data_spec: str) -> bool:
        from splitaudit.text_data import claims

        return claims(data_spec)

    def load_data(self, spec: str, *, model: str | None = None):
        from splitaudit.data import Dataset
        from splitaudit.text_data import encode, load_records
        from splitaudit.text_models import tokenizer_for

        from splitaudit.text_models import is_text_model

        if model is None or not is_text_model(model):
            raise DataError(f"{spec!r} is text data: it needs a text model (builtin:minilm or hf:DIR), whose tokenizer reads it, "
                            f"not {model!r}")
        tok = tokenizer_for(model)
        records, license = load_records(spec)
        x, kinds, y = encode(records, tok)
        classes = tuple(str(c) for c in range(int(y.max()) + 1)) if y is not None else None
        vocab = tuple(tok.convert_ids_to_tokens(list(range(len(tok)))))
        return Dataset(spec=spec, x=x, y=y, classes=classes, license=license, vocab=vocab, kinds=kinds)

    def check_data(self, dataset, spec: str) -> None:
        if int((dataset.x[:, 1] >= 0).sum()) == 0:
            raise DataError(f"{spec!r}: no sample has a token to recover (every position is padding or special)")

    # -- scoring --
    def score(self, recon, x):
        from splitaudit import text_metrics as tm

        pii, by_kind = tm.pii_recovery(recon, x, num_kinds=MAX_KINDS)
        # The spans each sample holds, scaled as pii_recovery scales what it recovered (s_i / s_bar): the denominators
        # of its ratios, which its interval resamples with the numerators (MetricInfo.per).
        spans, by_kind_spans = tm.pii_spans(x, num_kinds=MAX_KINDS)
        scaled = lambda c: (c.double() * (c.numel() / max(int(c.sum()), 1))).float()  # noqa: E731
        out = {"token_accuracy": tm.token_accuracy(recon, x), "rouge_l": tm.rouge_l(recon, x),
               "exact_match": tm.exact_match(recon, x), "pii_recovery": pii, "pii_spans": scaled(spans)}
        out.update({f"pii_recovery@{k}": v for k, v in by_kind.items()})
        out.update({f"pii_spans@{k}": scaled(by_kind_spans[:, k]) for k in by_kind})
        return out

    def prior(self, x_aux):
        from splitaudit.text_metrics import most_frequent_prior

        return most_frequent_prior(x_aux)

    def selection(self, recon, x):
        from splitaudit.text_metrics import token_accuracy

        return "token_accuracy", token_accuracy(recon, x)

    def features(self, x):
        from splitaudit.text_metrics import bag_of_tokens

        return bag_of_tokens(x)

    def reid_features(self, recon, x):
        """Bags of tokens; a reconstruction's over its original's positions (the length of what is sent is
        visible on the wire, so the attacker knows which positions are padding)."""
        from splitaudit.text_metrics import bag_of_tokens

        return bag_of_tokens(recon, mask=x), bag_of_tokens(x)

    def judge(self, input_shape, num_classes):
        return None  # no independent text classifier: attack accuracy is not measured on text

    def sent_bytes(self, shape: tuple[int, ...], x_eval: torch.Tensor) -> int | None:
        """A sequence of hidden states is sent at its actual length, not padded: mean tokens x width x 4 bytes."""
        if len(shape) == 2:
            length = float((x_eval[:, 1] != PAD).sum(dim=1).float().mean())
            return int(round(length * shape[1] * 4))
        return None

    # -- the decoder attack --
    def decoder_kwargs(self, x_train: torch.Tensor) -> dict:
        ids = x_train[:, 0][x_train[:, 1] != PAD]
        return {"vocab": torch.unique(ids).cpu()}

    def decoder(self, act_shape, input_shape, *, width, full_res, vocab=None):
        if vocab is None:
            raise ValueError("the text inverter needs the attacker's vocabulary")
        return TextInverter(tuple(act_shape), tuple(input_shape), width=width, vocab=vocab)

    def holdout(self, perm, x, n_val):
        """Held-out texts, in ``perm``'s order, among those whose every token also occurs in a text that
        trains: the inverter can only name tokens it trained on, so a text that alone holds a token would
        cost the attacker that token. The held-out texts are then a little easier than a random draw; they
        only check the fit against the prior and choose between candidates, which all see the same ones."""
        ids = x[:, 0].cpu()
        present = [torch.unique(ids[i][x[i, 1].cpu() != PAD]) for i in range(x.shape[0])]
        df = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.int64)
        for p in present:
            df[p] += 1
        val: list[int] = []
        for i in perm.tolist():
            if len(val) == n_val:
                break
            if bool((df[present[i]] >= 2).all()):
                df[present[i]] -= 1
                val.append(i)
        if len(val) < n_val:  # too few such texts: the rest at random
            chosen = set(val)
            val += [i for i in perm.tolist() if i not in chosen][: n_val - len(val)]
        chosen = set(val)
        val_idx = torch.tensor(val, dtype=perm.dtype, device=perm.device)
        return val_idx, perm[torch.tensor([i not in chosen for i in perm.tolist()], device=perm.device)]

    def on_wire(self, z, x):
        """A sequence is sent at its own length: a defense's noise at the padding positions never leaves the
        device, and the attacker sees zeros there, as without the defense."""
        if z.dim() == 3 and z.shape[1] == x.shape[-1]:
            return z.masked_fill((x[:, 1] == PAD).unsqueeze(-1).to(z.device), 0.0)
        return z

    def sent(self, z, x):
        """A sequence's hidden states at the positions that are sent, one row per token (N_tokens, d): the
        padding is never sent, so its zeros must not shrink a noise scale relative to the activation's std (a
        text of half the data's length would otherwise get noise ~1/sqrt(2) of what ``sigma`` says)."""
        if z.dim() == 3 and z.shape[1] == x.shape[-1]:
            return z[(x[:, 1] != PAD).to(z.device)]
        return z

    def standardized(self, z, mean, std):
        """Standardized where something was sent; positions never sent (padding, all zeros) stay zero, as
        on the wire, so the inverter's context sees nothing beyond a text's end."""
        out = (z - mean).div_(std)  # one new tensor, the rest in place (a refinement's aux set is 180 MB of hidden states)
        return out.masked_fill_(~z.ne(0).any(dim=-1, keepdim=True), 0.0) if z.dim() == 3 else out

    # The learning rate for a cut whose tokens the readout's start already names: a gentle 60% of the profile's peak.
    EASY_RATE = 0.6

    def initialize(self, model, u, x, u_val, x_val):
        """The classifier starts as a nearest-class-mean readout (:meth:`TextInverter.init_readout`). Its held-out
        token accuracy says how much the features must still learn, and so the peak learning rate: where it already
        names all held-out tokens (MiniLM's embeddings and first block) a high rate only distorts the rare tokens'
        features (blocks.0: 0.9695 of the evaluation tokens at a peak of 5e-3, 0.9703 at 3e-3; three seeds each,
        all below and all above the position-wise reference's 0.9701-0.9703); where it names under 90% (blocks.2
        on) the features must be learnt, and the full rate does it (blocks.5: 0.941 at 5e-3, 0.933 at 3e-3). Between
        the two, the rate is interpolated."""
        model.init_readout(u, x)
        from splitaudit.text_metrics import token_accuracy

        acc = float(token_accuracy(model.predict(u_val), x_val).mean()) if u_val.shape[0] else 0.0
        hard = min(1.0, max(0.0, (1.0 - acc) / 0.1))
        rate = self.EASY_RATE + (1 - self.EASY_RATE) * hard
        return rate, f"the classifier's nearest-class-mean start names {acc:.3f} of the held-out tokens; peak learning rate x{rate:.2f}"

    def training_loss(self, model, u, x):
        return model.loss(u, x)

    def prior_loss(self, x_train, x_val) -> float:
        """Cross-entropy of the no-information guess's distribution (each position's aux token frequencies,
        add-one smoothed over the attacker's vocabulary) on held-out aux texts."""
        vocab = torch.unique(x_train[:, 0][x_train[:, 1] != PAD])
        lookup = _lookup(vocab, max(int(x_train[:, 0].max()), int(x_val[:, 0].max())) + 1)
        L = x_train.shape[-1]
        counts = torch.ones(L, vocab.numel())
        valid = x_train[:, 1] != PAD
        pos = torch.arange(L).expand_as(valid)
        counts.index_put_((pos[valid], lookup[x_train[:, 0][valid]]), torch.ones(int(valid.sum())), accumulate=True)
        logp = (counts / counts.sum(dim=1, keepdim=True)).log()
        vv = (x_val[:, 1] != PAD) & (lookup[x_val[:, 0]] >= 0)
        pv = torch.arange(L).expand_as(vv)
        return float(-logp[pv[vv], lookup[x_val[:, 0][vv]]].mean()) if vv.any() else float("nan")

    def budget(self, profile: str):
        from splitaudit.attacks.decoder import Budget

        return TEXT_BUDGETS[profile](Budget)

    # -- views --
    def examples(self, x, recon, *, fixed, ranked, values, data=None) -> bytes:
        return examples_html(x, recon, fixed=fixed, ranked=ranked, values=values, data=data).encode()


# Every run follows a one-cycle learning rate over its whole budget, so patience never stops it early; a
# refinement (an adaptive attacker) continues the clean inverter for one epoch at a lower peak. Measured on
# MiniLM's last block (standard split): 4 epochs at a peak of 5e-3 recover 0.943 of the tokens, against 0.931
# for 6 epochs at a constant 1e-3. One refinement epoch at 1e-3 under noise sigma=2 recovers 0.618 (at 3e-3:
# 0.637, but on clean activations that peak undoes half a point of the start's accuracy).
TEXT_BUDGETS = {  # (width, epochs, patience, restarts, extensions, batch, lr), then at least min_steps steps per run
    "quick": lambda B: B(384, 3, 3, 0, 0, 36, 5e-3, min_steps=120, schedule="onecycle", val_fraction=0.02, refine_epochs=1,
                         refine_lr=1e-3),
    "standard": lambda B: B(512, 3, 3, 1, 0, 36, 5e-3, min_steps=150, schedule="onecycle", val_fraction=0.02, refine_epochs=1,
                            refine_lr=1e-3),
    "thorough": lambda B: B(512, 12, 12, 2, 0, 32, 3e-3, min_steps=600, schedule="onecycle", val_fraction=0.02, refine_epochs=3,
                            refine_lr=1e-3),
}



def _lookup(vocab: torch.Tensor, size: int) -> torch.Tensor:
    """id -> class index in ``vocab`` (-1 for an id outside it)."""
    table = torch.full((max(size, int(vocab.max()) + 1 if vocab.numel() else 1),), -1, dtype=torch.int64)
    table[vocab] = torch.arange(vocab.numel())
    return table


def _top(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest logit, the first on a tie, as ``argmax``; ``max(...).indices`` because CPU
    ``argmax`` on bfloat16 logits (the classifier under autocast) takes 6x as long (0.27 s against 0.046 s for
    20,000 positions x 3,940 tokens, one thread): a tenth of an adaptive refinement job."""
    return logits.max(dim=-1).indices


class TextInverter(nn.Module):
    """Hidden states (N, L, d) or a pooled vector (N, d) -> per-position features -> token classes.

    A position-wise projection (ReLU), then a residual over neighbouring positions: each position's
    features are narrowed to ``CONTEXT`` channels, the three of a kernel-3 window are concatenated and
    projected back (one matmul on the neighbours side by side, a third of a full-width window's cost).
    Its output layer starts at zero, so the inverter begins as a position-wise MLP, the reference it is
    held to, and the context only adds. A classifier over the attacker's vocabulary follows, at the
    positions that are not padding only. For a pooled vector a dense stem first unfolds it into
    ``PER`` features a position.
    """

    PER = 64
    CONTEXT = 128

    def __init__(self, act_shape: tuple[int, ...], input_shape: tuple[int, ...], *, width: int, vocab: torch.Tensor):
        super().__init__()
        self.L = int(input_shape[-1])
        self.vocab = vocab.to(torch.int64).cpu()  # a plain attribute: saved with the attack's state, not the weights
        self._table: torch.Tensor | None = None
        self.sequence = len(act_shape) == 2
        if self.sequence:
            self.stem = nn.Sequential(nn.Linear(act_shape[-1], width), nn.ReLU())
        else:
            d, per = int(act_shape[0]), self.PER
            self.stem = nn.Sequential(nn.Linear(d, 1024), nn.GELU(), nn.Linear(1024, self.L * per), nn.Unflatten(1, (self.L, per)),
                                      nn.GELU(), nn.Linear(per, width), nn.ReLU())
        r = min(self.CONTEXT, width)
        self.narrow = nn.Linear(width, r)
        self.context = ZeroLinear(3 * r, width)
        self.classes = nn.Linear(width, int(self.vocab.numel()))

    def fold(self, z):
        return z

    def features(self, u: torch.Tensor) -> torch.Tensor:
        with fast_autocast(u):
            h = self.stem(u)  # (N, L, width)
            c = self.narrow(h)
            p = F.pad(c, (0, 0, 1, 1))
            return h + F.relu(self.context(torch.cat([p[:, :-2], c, p[:, 2:]], dim=-1)))

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        with fast_autocast(f):
            return self.classes(f)

    def decode(self, u):
        return self.features(u)

    READOUT_SHARPNESS = 4.0  # the nearest-class-mean start's logit scale, in units of 1 / (within-class variance)

    @torch.no_grad()
    def init_readout(self, u: torch.Tensor, x: torch.Tensor, *, batch: int = CHUNK) -> None:
        """Start the classifier as a nearest-class-mean classifier of the (randomly initialized) features: each
        token's weight row is the mean feature of its positions in the training texts, its bias what makes the
        logits those of Gaussians of one shared variance around the means (linear discriminant analysis with an
        isotropic covariance), plus the log of the token's frequency. A 3,940-way classifier trained from random
        weights needs passes to learn its rare tokens (MiniLM's last block: 0.891 of the tokens after 2 epochs);
        started here, 2 epochs reach 0.931 and 3 the 0.942 that 4 reached from random weights. One forward pass
        over the aux texts' features, under a tenth of an epoch."""
        feats, labels = [], []
        for i in range(0, u.shape[0], batch):
            xb = x[i : i + batch]
            n = max(int((xb[:, 1] != PAD).sum(dim=1).max()), 1)
            ub = u[i : i + batch]
            f = self.features(ub[:, :n] if self.sequence else ub)[:, :n].float()
            mask = xb[:, 1, :n] != PAD
            ids = xb[:, 0, :n][mask]
            y = self.classes_of(ids)
            feats.append(f[mask][y >= 0])
            labels.append(y[y >= 0])
        f, y = torch.cat(feats), torch.cat(labels)
        if not y.numel():
            return
        count = torch.bincount(y, minlength=self.classes.out_features).float()
        mean = torch.zeros(self.classes.out_features, f.shape[1], device=f.device).index_add_(0, y, f) / count.clamp_min(1)[:, None]
        var = float((f - mean[y]).square().sum(dim=1).mean())
        scale = self.READOUT_SHARPNESS / max(var, 1e-8)
        self.classes.weight.copy_(scale * mean)
        self.classes.bias.copy_(-0.5 * scale * mean.square().sum(dim=1) + (count.clamp_min(1) / count.sum()).log())

    def table(self, device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            self._table = _lookup(self.vocab, int(self.vocab.max()) + 1).to(device)
        return self._table

    def classes_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Each token id's class in the attacker's vocabulary (-1: an id it never saw)."""
        table = self.table(ids.device)
        return torch.where(ids < table.numel(), table[ids.clamp_max(table.numel() - 1)], torch.full_like(ids, -1))

    def loss(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Cross-entropy at the positions that are not padding, computed there only (the classifier is
        the costly layer, and padding is about half the positions)."""
        n = int((x[:, 1] != PAD).sum(dim=1).max())  # the batch's longest text: positions beyond it are all padding
        u, x = (u[:, :n], x[..., :n]) if self.sequence else (u, x[..., :n])
        f = self.features(u)[:, :n]
        mask = x[:, 1] != PAD
        ids = x[:, 0][mask]
        return F.cross_entropy(self.logits(f[mask]).float(), self.classes_of(ids), ignore_index=-1)

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Token ids at every position (N, 2, L). A sequence is classified only where something was sent: a
        position whose hidden state is all zeros is padding (never sent; half the positions of the PII texts),
        and gets id 0 without running the classifier, its whole cost."""
        out = []
        vocab = self.vocab.to(z.device)
        for i in range(0, z.shape[0], CHUNK):
            zb = z[i : i + CHUNK]
            f = self.features(zb)
            if self.sequence:
                sent = zb.ne(0).any(dim=-1)
                ids = torch.zeros(f.shape[:2], dtype=torch.int64, device=z.device)
                ids[sent] = vocab[_top(self.logits(f[sent]))]
                out.append(ids)
            else:
                out.append(vocab[_top(self.logits(f))])
        ids = torch.cat(out) if out else torch.zeros(0, self.L, dtype=torch.int64, device=z.device)
        return torch.stack([ids, torch.zeros_like(ids)], dim=1)  # the layout of the inputs: (N, 2, L)

    def for_inference(self):
        return _Predictor(self)


class _Predictor(nn.Module):
    def __init__(self, net: TextInverter):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net.predict(z)


def _tokens(ids, vocab) -> list[str]:
    return [vocab[i] if vocab is not None and 0 <= i < len(vocab) else f"#{i}" for i in ids]


def _render(ids: list[int], tags: list[int], vocab, right: list[bool] | None) -> str:
    """Word pieces joined back into words (``##`` continuation), each token escaped; PII tokens marked
    ``pii``, and in a reconstruction, tokens that match the original marked ``hit``."""
    parts = []
    for k, (tok, tag) in enumerate(zip(_tokens(ids, vocab), tags)):
        if tag < 0:  # padding and special tokens are not shown
            continue
        glue = tok.startswith("##")
        text = html.escape(tok[2:] if glue else tok)
        cls = []
        if tag > 0:
            cls.append("pii")
        if right is not None:
            cls.append("hit" if right[k] else "miss")
        span = f'<span class="{" ".join(cls)}">{text}</span>' if cls else text
        parts.append(span if glue or not parts else " " + span)
    return "".join(parts)


def examples_html(x, recon, *, fixed, ranked, values, data=None) -> str:
    """Originals over their reconstructions, as an escaped HTML table: the fixed samples, then those that
    gained most over the prior, each with its headline value."""
    vocab = getattr(data, "vocab", None)
    rows = []
    seen = set()
    for group, idx in (("fixed", fixed), ("most recovered", ranked)):
        for i in [int(v) for v in idx]:
            if i in seen:
                continue
            seen.add(i)
            ids, tags = x[i, 0].tolist(), x[i, 1].tolist()
            rids = recon[i, 0].tolist()
            right = [a == b for a, b in zip(ids, rids)]
            rows.append(
                f'<tr class="{html.escape(group)}"><td class="idx">{i}</td><td class="val">{float(values[i]):.2f}</td>'
                f'<td class="orig">{_render(ids, tags, vocab, None)}</td><td class="recon">{_render(rids, tags, vocab, right)}</td></tr>'
            )
    head = "<tr><th>#</th><th>token acc.</th><th>original (PII underlined)</th><th>reconstruction (recovered tokens marked)</th></tr>"
    return f'<table class="text-examples">{head}{"".join(rows)}</table>'
