"""The white-box attack on text: optimize input embeddings until the head reproduces the observed
hidden state, then read each position's token as the nearest row of the embedding table.

This is the optimization attack of split-LLM inversion (BiSR's "forward" optimization, Chen et al.,
CCS'24, arXiv 2409.00960, section 4.3; and embedding inversion by gradient descent, Song and
Raghunathan, CCS'20): an attacker that knows the head's weights solves, per text,

    e* = argmin_e  || head(e) - z ||^2 / s      (e: one d-vector per position, s: mean z^2 on aux data)

with Adam, starting from the embedding of the most frequent aux token at each position, and projects
``e*`` onto the vocabulary by cosine similarity. Unlike the learned inverter it can name a token that
never occurs in the attacker's aux texts (a rare surname, a card number's digits), since it searches
the whole embedding table.

Where it is weak: deep in the model many embeddings give nearly the same hidden state, and every step
runs the head forward and backward on every text, so its cost grows with the depth of the cut
(``--attack whitebox`` is run on request, like ``rmle`` for images). On a pooled sentence embedding the
length of the text is not sent; it assumes the median aux length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from splitaudit.attacks.base import Attack, AttackContext, FitReport, register_attack
from splitaudit.errors import SpecError
from splitaudit.specs import build_config, param
from splitaudit.text_data import PAD



@dataclass(frozen=True)
class WhiteBoxConfig:
    steps: int = param(0, lo=0, hi=5000, help="Adam steps per text; 0 picks by profile")
    lr: float = param(0.0, lo=0, hi=10.0, help="Adam step on the embeddings, relative to their RMS; 0 picks by profile")
    batch_size: int = param(64, lo=1, hi=4096, help="texts optimized at once")


STEPS = {"quick": 30, "standard": 80, "thorough": 300}
LR = 0.1  # relative to the embedding table's RMS entry


@register_attack("whitebox")
class TextWhiteBoxAttack(Attack):
    modalities = ("text",)
    white_box = True
    needs_fit = True  # it measures the activation's scale and its length prior on the (defended) aux data

    def __init__(self, *, profile: str = "standard", params: dict | None = None):
        self.config = build_config(WhiteBoxConfig, params or {}, what="attack whitebox")
        self.steps = self.config.steps or STEPS[profile]
        self.lr = self.config.lr or LR
        self.head = self.table = self.start = None
        self.scale = 1.0
        self.length = 0

    def fit(self, z_aux: torch.Tensor, x_aux: torch.Tensor, ctx: AttackContext) -> FitReport:
        t0 = time.perf_counter()
        if ctx.modality.name != "text" or ctx.embeddings is None:
            raise SpecError("attack whitebox inverts text models (builtin:minilm, hf:DIR); on images use rmle")
        self.head, self.table = ctx.head, ctx.embeddings.detach()
        sent = z_aux.abs().amax(dim=-1) > 0 if z_aux.dim() == 3 else torch.ones(z_aux.shape[0], dtype=torch.bool, device=z_aux.device)
        self.scale = float(z_aux[sent].square().mean()) or 1.0
        self.start = ctx.modality.prior(x_aux)[:, 0]  # (1, L): the most frequent aux token at each position
        self.length = int((x_aux[:, 1] != PAD).sum(dim=1).float().median())
        self.L = x_aux.shape[-1]
        self.prior_outcome = None  # it learns nothing from aux texts, so it has no guess to beat there
        return FitReport(converged=True, restarts=0, epochs=0, seconds=time.perf_counter() - t0, val_loss=math.nan,
                         baseline_loss=math.nan, notes=[f"{self.steps} Adam steps per text on its input embeddings"])

    def _mask(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 3:  # a sequence: padding is not sent, so the positions sent are known
            return (z.abs().amax(dim=-1) > 0).to(z.dtype)
        m = torch.zeros(z.shape[0], self.L, dtype=z.dtype, device=z.device)
        m[:, : self.length] = 1
        return m

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("fit() must be called before reconstruct()")
        out = [self._invert(z[i : i + self.config.batch_size]) for i in range(0, z.shape[0], self.config.batch_size)]
        return torch.cat(out)

    def _invert(self, z: torch.Tensor) -> torch.Tensor:
        table = self.table.to(z.device)
        mask = self._mask(z)
        rms = float(table.square().mean().sqrt())
        e = table[self.start.to(z.device)].expand(z.shape[0], -1, -1).clone().requires_grad_(True)
        opt = torch.optim.Adam([e], lr=self.lr * rms)
        weight = mask.unsqueeze(-1) if z.dim() == 3 else 1.0
        count = float(mask.sum() * z.shape[-1]) if z.dim() == 3 else float(z.numel())
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                h = self.head(torch.cat([e, mask.unsqueeze(-1)], dim=-1))
                loss = ((h - z).square() * weight).sum() / (self.scale * count)
                (grad,) = torch.autograd.grad(loss, e)
                e.grad = grad
                opt.step()
        with torch.no_grad():  # the nearest token by cosine, 1,024 positions at a time (a row of 30k similarities each)
            flat, unit = F.normalize(e.detach(), dim=-1).reshape(-1, e.shape[-1]), F.normalize(table, dim=-1)
            ids = torch.cat([(c @ unit.T).argmax(dim=-1) for c in flat.split(1024)]).view(e.shape[:2])
        return torch.stack([ids, torch.zeros_like(ids)], dim=1)
