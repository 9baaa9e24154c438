"""Every cache key of an audit, built here and nowhere else.

A key is a hash of everything the cached value depends on (:func:`splitaudit.cache.key_of` adds the
package version). Keeping them in one module makes it possible to check, in one place, that nothing a
value depends on is missing from its key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys

from splitaudit.cache import key_of


@functools.lru_cache(maxsize=256)
def _module_source_hash(name: str) -> str:
    mod = sys.modules.get(name)
    try:
        src = inspect.getsource(mod) if mod is not None else name
    except (OSError, TypeError):  # no source (a C extension, an interactive definition): its name stands for it
        src = name
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def code_of(*objs) -> str:
    """A hash of the source of the modules that define ``objs`` (classes or functions): an edited attack,
    defense or training loop gets new keys, with no version string to bump by hand."""
    return "-".join(_module_source_hash(getattr(o, "__module__", None) or o.__name__) for o in objs)


def flops(model_hash: str, input_shape: tuple[int, ...], cut: str | None) -> str:
    """The head's FLOPs at ``cut`` (None: the whole model) for one input of ``input_shape``."""
    return key_of("flops", model_hash, tuple(input_shape), cut)


def activations(model_hash: str, data_hash: str, seed: int, profile: str, cut: str, aux_key: tuple) -> str:
    """A model's activations at ``cut`` for the attacker's queries and the evaluation inputs (the split
    depends on the data, the seed and the profile's sizes; the queries on ``aux_key``)."""
    return key_of("act", model_hash, data_hash, seed, profile, cut, aux_key)


def attack_job(*, cut: str, attack: str, defense: str, kind: str, profile: str, seed: int, epochs: int | None,
               has_candidate: bool, trained_model: str, victim: str, data_hash: str, aux_key: tuple, code: str,
               start: str | None = None) -> str:
    """A fitted attack: what it was trained on (the model whose activations, the victim it refines from,
    the data and queries), how (spec fields: an extension's ``epochs`` is its grant) and by what code (the
    attack's, its modality's, the training loop's and the defense's source); not what it is scored on or
    how its progress bar reads. ``start``: the key of the fitted state it resumes or refines (an extension's
    base, a refinement's extended start), so a different grant anywhere upstream is a different key."""
    what = (cut, attack, defense, kind, profile, seed, epochs, has_candidate)
    return key_of("attack-job", what, trained_model, victim, data_hash, aux_key, code, *(() if start is None else (start,)))


def attack_flops(*, attack: str, profile: str, modality: str, act_shape: tuple[int, ...], inputs: tuple[int, ...], code: str) -> str:
    """An attack's training FLOPs per epoch at an activation of ``act_shape`` on aux inputs of shape ``inputs``
    (N, ...): its network follows from the shapes and the profile, its step from ``code``."""
    return key_of("attack-flops", attack, profile, modality, tuple(act_shape), tuple(inputs), code)


def dfil_trace(*, model_hash: str, inputs_hash: str, seed: int, cut: str, probes: int, method: str, code: str) -> str:
    """The dFIL reference's tr(JᵀJ) per input at ``cut``: the inputs by their content (whatever split chose them),
    the probes by the seed and the cut, estimated by ``code``."""
    return key_of("dfil", model_hash, inputs_hash, seed, cut, probes, method, code)


def utility(*, model_hash: str, victim: str, data_hash: str, cut: str, defense: str, seed: int, profile: str, code: str,
            state: dict | None = None) -> str:
    """Accuracy and agreement of ``defense`` (fitted at ``cut`` to ``state``: a noise scale, a range) on
    ``model_hash`` (agreement is with ``victim``), measured by ``code`` (the defense's and the utility path's source)."""
    return key_of("utility", model_hash, victim, data_hash, cut, defense, seed, profile, code, sorted((state or {}).items()))


def prepared_model(*, victim: str, data_hash: str, defense: str, cut: str | None, profile: str, seed: int, code: str) -> str:
    """The model a defense changes (DP-SGD, NoPeek) from ``victim``, fine-tuned on the victim split by ``code``."""
    return key_of("prepared", victim, data_hash, defense, cut, profile, seed, code)


def model_hash(weights: str, code: str) -> str:
    """A model's identity in every other key: its weights *and* its code (an edited ``forward`` with the
    same weights is another model)."""
    return hashlib.sha256(f"{weights}|{code}".encode()).hexdigest()


def judge(*, data_hash: str, seed: int, profile: str, n_aux: int, architecture: str, recipe: tuple) -> str:
    """The independent classifier trained on the aux split to label reconstructions (attack accuracy)."""
    return key_of("judge", data_hash, seed, profile, n_aux, architecture, recipe)


def builtin_victim(*, name: str, data_hash: str, in_channels: int, num_classes: int, recipe: tuple, source: str, trainer: str) -> str:
    """A builtin victim trained on the data's victim split: its architecture's source, its training recipe
    and the code that trains it."""
    return key_of("builtin-victim", name, data_hash, in_channels, num_classes, recipe, hashlib.sha256(source.encode()).hexdigest(), trainer)
