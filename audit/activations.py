"""Activations: what each model sends at each cut, for the attacker's queries and the evaluation inputs.

:class:`ActivationStore` captures them (running only the head), reads and writes them in the cache, and
captures ahead: one pass over the data captures the cut asked for and the cuts after it that are
neither captured nor cached yet (up to ``PREFETCH_BYTES`` together), held until they are asked for.
LeNet's 11 cuts then take two passes per model instead of one head per cut. A model's first cut is
captured on its own, so its attack jobs can start after one head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from splitaudit import cache_keys as keys
from splitaudit.cache import Cache
from splitaudit.costs import bytes_per_sample
from splitaudit.cuts import capture_many
from splitaudit.errors import ModelError

# Activations one capture pass takes ahead of the cut asked for, at most: MiniLM's 8 cuts of 3,000 texts
# (280 MB each) then come from one pass over the model instead of eight heads of growing depth.
PREFETCH_BYTES = 2560 << 20
ACT_CACHE_ALWAYS_BYTES = 4 << 20  # activations this small are cached whatever their head costs
ACT_CACHE_FLOPS_PER_BYTE = 25  # larger ones only when their head costs at least this per byte


class ActivationStore:
    """``get(model, model_hash, cut)`` -> (aux activations, evaluation activations)."""

    def __init__(self, scenario, cache: Cache, flops: Callable[[str], int]):
        self.s, self.cache, self.flops = scenario, cache, flops
        self._held: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # model hash -> cut -> activations
        self._captured: dict[str, set[str]] = {}  # model hash -> cuts captured (held or handed out)

    def key(self, model_hash: str, cut: str) -> str:
        s = self.s
        return keys.activations(model_hash, s.data_hash, s.config.seed, s.config.profile, cut, s.aux_key)

    def get(self, model: nn.Module, model_hash: str, cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.key(model_hash, cut)
        hit = self.cache.get("activations", key)
        if hit is not None:
            return hit["aux"].to(self.s.device), hit["eval"].to(self.s.device)
        z_aux, z_eval = self._capture(model, model_hash, cut)
        # Kept only when reading them back beats computing them again: a large activation from a cheap
        # head (LeNet's conv1: 38 MB from 12 FLOPs a byte) is recaptured in 80 ms, where saving it took
        # 190 ms and loading it 100 ms (about 25 FLOPs of head per byte break even on a CPU).
        nbytes = z_aux.nbytes + z_eval.nbytes
        if nbytes < ACT_CACHE_ALWAYS_BYTES or self.flops(cut) >= ACT_CACHE_FLOPS_PER_BYTE * bytes_per_sample(tuple(z_eval.shape[1:])):
            self.cache.put("activations", key, {"aux": z_aux.cpu(), "eval": z_eval.cpu()})
        return z_aux, z_eval

    def _capture(self, model: nn.Module, model_hash: str, cut: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        held = self._held.setdefault(model_hash, {})
        if cut in held:
            return held.pop(cut)
        done = self._captured.setdefault(model_hash, set())
        names = [c.name for c in s.cuts]
        n = s.x_aux.shape[0] + s.x_eval.shape[0]
        group, total = [cut], 0
        for c in s.cuts[names.index(cut) + 1:] if cut in names and done else []:
            if c.name in done or self.cache.has("activations", self.key(model_hash, c.name)):
                continue
            total += 4 * n * c.numel  # float32
            if total > PREFETCH_BYTES:
                break
            group.append(c.name)
        try:
            z_aux, z_eval = capture_many(model, group, s.x_aux), capture_many(model, group, s.x_eval)
        except ModelError:
            if len(group) == 1:
                raise
            # A later cut this pass did not reach (control flow that depends on the data) must not fail
            # this one: it is captured alone, the later cuts when they are asked for.
            group = [cut]
            z_aux, z_eval = capture_many(model, group, s.x_aux), capture_many(model, group, s.x_eval)
        done.update(group)
        held.update({c: (z_aux[c], z_eval[c]) for c in group[1:]})
        return z_aux[cut], z_eval[cut]
