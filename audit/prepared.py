"""Prepared models: the models the defenses change (DP-SGD, NoPeek), fine-tuned from a copy of the victim.

They are fine-tuned one after another on a thread of their own while the workers start on the
undefended attacks, which need only the victim. ``get`` waits for one; a fine-tuning's failure is
raised where its model is needed, and its rows carry it.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import threading
from dataclasses import replace

import torch
from torch import nn

from splitaudit import cache_keys as keys
from splitaudit.cache import Cache
from splitaudit.costs import training_thread_count
from splitaudit.defenses.base import Defense, PrepareContext
from splitaudit.errors import UserError
from splitaudit.models import state_hash
from splitaudit.seeding import job_generator


def error_text(exc) -> str:
    return f"{type(exc).__name__}: {exc}"


class PreparedModels:
    def __init__(self, scenario, cache: Cache, reporter, phase):
        self.s, self.cache, self.reporter, self.phase = scenario, cache, reporter, phase
        self._futures: dict[tuple[str, str | None], cf.Future] = {}
        self._stop = threading.Event()

    @staticmethod
    def _key(defense: Defense, cut: str | None) -> tuple[str, str | None]:
        return (defense.spec, cut if defense.per_cut_model else None)

    def start(self) -> None:
        s = self.s
        todo = [(d, c.name if d.per_cut_model else None) for d in s.defenses if d.changes_model
                for c in (s.cuts if d.per_cut_model else s.cuts[:1])]
        if not todo:
            return
        # Copied here, while no hook is on it: the driver stops forward passes at cuts with hooks.
        victim = copy.deepcopy(s.model)
        pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitaudit-prepare")
        # A thread keeps the intra-op thread count it first ran with. Fixed here, before an executor
        # changes the process's count, so the fine-tuned weights never depend on --workers.
        before = torch.get_num_threads()
        torch.set_num_threads(training_thread_count(victim, s.x_eval))
        try:
            pool.submit(torch.get_num_threads).result()
        finally:
            torch.set_num_threads(before)
        for d, cut in todo:
            self._futures[(d.spec, cut)] = pool.submit(self._prepare, d, cut, victim)
        pool.shutdown(wait=False)

    def _prepare(self, defense: Defense, cut: str | None, victim: nn.Module):
        if self._stop.is_set():
            raise KeyboardInterrupt
        with self.phase("defense fine-tuning"):
            return self._fine_tune(defense, cut, victim)

    def _fine_tune(self, defense: Defense, cut: str | None, model: nn.Module):
        """``defense``'s change to ``model`` (a private copy of the victim), from the cache or fine-tuned."""
        s = self.s
        seed = s.config.seed
        ctx = PrepareContext(
            x_train=s.splits.victim.x.to(s.device), y_train=None if s.splits.victim.y is None else s.splits.victim.y.to(s.device),
            x_eval=s.x_eval, y_eval=s.y_eval, profile=s.config.profile, generator=job_generator(seed, defense.spec, cut, "prepare"),
        )
        key = keys.prepared_model(victim=s.model_hash, data_hash=s.data_hash, defense=defense.spec, cut=cut,
                                  profile=s.config.profile, seed=seed, code=keys.code_of(type(defense)))
        hit = self.cache.get("models", key)
        if hit is not None:
            change = defense.prepare_model(copy.deepcopy(model), cut=cut, ctx=ctx, state=hit["state"])
            info = hit["info"] | {"cached": True}
        else:
            def on_epoch(ep, tot, loss):
                if self._stop.is_set():
                    raise KeyboardInterrupt
                task.update(ep, total=tot)

            # Dropout in a user's model draws from torch's global generator: seeded here, so the fine-tuning
            # is the same in every run (no other thread draws from it: attacks build their modules with
            # generators of their own).
            cuda = [s.device] if s.device.type == "cuda" else []
            with self.reporter.task(f"{defense.spec}: fine-tuning the model", keep=True) as task, torch.random.fork_rng(devices=cuda):
                rng = int(torch.randint(0, 2**62, (1,), generator=job_generator(seed, defense.spec, cut, "rng")))
                torch.default_generator.manual_seed(rng)
                if cuda:
                    torch.cuda.manual_seed(rng)  # dropout on the GPU draws from that device's generator
                change = defense.prepare_model(copy.deepcopy(model), cut=cut, ctx=replace(ctx, on_epoch=on_epoch))
            info = change.info
            self.cache.put("models", key, {"state": {k: v.cpu() for k, v in change.model.state_dict().items()}, "info": info})
        model_d = change.model.to(s.device).eval()
        return model_d, keys.model_hash(state_hash(model_d), s.model_info["code_hash"] + keys.code_of(type(defense))), info

    def get(self, defense: Defense, cut: str) -> tuple[nn.Module, str, dict]:
        """The model ``defense`` runs at ``cut``, its hash and what the change did (waits for the fine-tuning)."""
        if not defense.changes_model:
            return self.s.model, self.s.model_hash, {}
        fut = self._futures[self._key(defense, cut)]
        if not fut.done():
            with self.phase("waiting for fine-tuning"):
                fut.result()
        return fut.result()

    def done(self, defense: Defense, cut: str) -> bool:
        """Whether ``get`` would return (or raise) without waiting."""
        if not defense.changes_model:
            return True
        fut = self._futures.get(self._key(defense, cut))
        return fut is None or fut.done()

    def ready(self, defense: Defense, cut: str) -> bool:
        """Whether the model is there (a change that failed or never ran is not)."""
        if not defense.changes_model:
            return True
        fut = self._futures.get(self._key(defense, cut))
        return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def info(self, defense: Defense, cut: str) -> dict:
        return self.get(defense, cut)[2] if self.ready(defense, cut) else {}

    def error(self, defense: Defense, cut: str) -> str | None:
        """Why a changed model is missing: its fine-tuning's error, or None."""
        fut = self._futures.get(self._key(defense, cut)) if defense.changes_model else None
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is None:
            return None
        return f"fine-tuning for {defense.spec} failed: {error_text(fut.exception())}"

    def raise_user_error(self) -> None:
        """A fine-tuning that failed on bad input (say, a layer Opacus refuses) ends the audit at once: exit 2."""
        for fut in self._futures.values():
            if fut.done() and not fut.cancelled() and isinstance(fut.exception(), UserError):
                raise fut.exception()

    def wait(self) -> None:
        """Until every fine-tuning has ended (a failure is not raised here: its rows carry it)."""
        cf.wait(list(self._futures.values()))

    def cancel(self) -> None:
        self._stop.set()
        for fut in self._futures.values():
            fut.cancel()
