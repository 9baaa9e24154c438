"""Outputs of any structure: a tensor, or a nest of tuples, lists, dicts, dataclasses (Hugging Face's
``ModelOutput`` among them) holding tensors.

A path names one tensor in a nest: ``2``, ``logits`` or ``0.pred`` (indices for sequences, keys for
mappings, field names for dataclasses, joined by dots). The empty path is the output itself when it is
a tensor; :func:`pick` with no path takes the nest's first tensor, in order (a tuple's first item, a
dict's first key, a dataclass's first field: ``logits`` for a classification ``ModelOutput``, the
last hidden state for a base model). A cut may name a tensor of a module's nest as ``block:0``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from splitaudit.errors import ModelError, SpecError


def _children(obj) -> list[tuple[str, Any]] | None:
    if isinstance(obj, torch.Tensor):
        return None
    if isinstance(obj, Mapping):  # ModelOutput is an OrderedDict: its set fields, in order
        return [(str(k), v) for k, v in obj.items()]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    if isinstance(obj, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


def flatten(obj, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``obj`` with its path, in order."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    out = []
    for name, v in _children(obj) or []:
        out += flatten(v, f"{prefix}.{name}" if prefix else name)
    return out


def paths(obj) -> list[str]:
    return [p or "(the tensor itself)" for p, _ in flatten(obj)]


def pick(obj, path: str | None = None, *, what: str = "output") -> torch.Tensor:
    """The tensor at ``path`` in ``obj`` (None: ``obj`` itself if a tensor, else its first tensor)."""
    found = flatten(obj)
    if not found:
        raise ModelError(f"the {what} holds no tensor (it is {type(obj).__name__})")
    if path is None or path == "":
        return found[0][1]
    for p, t in found:
        if p == path:
            return t
    raise SpecError(f"the {what} has no tensor at {path!r}; its tensors are at: {', '.join(paths(obj))}")


def put(obj, path: str | None, value: torch.Tensor):
    """``obj`` with the tensor at ``path`` (None: its first tensor) replaced by ``value``, same structure."""
    if path is None or path == "":
        if isinstance(obj, torch.Tensor):
            return value
        path = flatten(obj)[0][0]
    head, _, rest = path.partition(".")
    if isinstance(obj, Mapping):
        new = type(obj)(obj) if not hasattr(obj, "to_tuple") else obj.__class__(**obj)
        new[head] = put(obj[head], rest, value) if rest else value
        return new
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{head: put(getattr(obj, head), rest, value) if rest else value})
    items = list(obj)
    i = int(head)
    items[i] = put(items[i], rest, value) if rest else value
    return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)


def nbytes_per_sample(obj) -> int:
    """What sending every tensor of ``obj`` costs per sample (a batch's bytes over its size), each storage once."""
    seen, total = set(), 0
    for _, t in flatten(obj):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key in seen or t.dim() == 0:
            continue
        seen.add(key)
        total += t.element_size() * (t.numel() // max(t.shape[0], 1))
    return total


def split_cut(name: str) -> tuple[str, str | None]:
    """``block:0`` -> (``block``, ``0``); ``layer2`` -> (``layer2``, None)."""
    module, sep, path = name.partition(":")
    return module, (path if sep else None)


def parse_input_norm(text: str | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``MEAN,STD``, each a number or a ``/``-separated list with one value per channel: ``0.1307,0.3081``
    or ``0.485/0.456/0.406,0.229/0.224/0.225``."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = (tuple(float(v) for v in p.split("/")) for p in parts)
    except ValueError:
        raise SpecError(f"--input-norm {text!r} is not MEAN,STD (each a number, or one per channel joined by '/', "
                        "e.g. 0.485/0.456/0.406,0.229/0.224/0.225)") from None
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise SpecError(f"--input-norm {text!r}: {len(mean)} means but {len(std)} standard deviations")
    if any(not (v > 0) or v != v or v == float("inf") for v in std) or any(v != v or abs(v) == float("inf") for v in mean):
        raise SpecError(f"--input-norm {text!r}: the standard deviations must be positive and every value finite")
    return mean, std


def adapt_model(model: nn.Module, *, output: str | None = None, input_norm=None, channels: int | None = None) -> nn.Module:
    """``model`` (changed in place) as the audit runs it: inputs normalized with ``input_norm`` (mean, std)
    between the data and the model, so the attacker still rebuilds, and is scored, in the data's own
    pixel space; and its forward returning the one tensor ``output`` names in its output (None: the
    output itself if a tensor, else its first tensor), which accuracy, agreement and the fine-tunings of
    DP-SGD and NoPeek use. Its modules, their names and its weights stay as they are."""
    if getattr(model, "_splitaudit_adapted", False):
        return model
    if input_norm is not None:
        mean, std = input_norm
        n = max(len(mean), len(std))
        if channels is not None and n not in (1, channels):
            raise SpecError(f"--input-norm has {n} values per statistic, but the data has {channels} channel(s)")
        mean = torch.tensor(mean if len(mean) == n else mean * n, dtype=torch.float32).view(1, n, 1, 1)
        std = torch.tensor(std if len(std) == n else std * n, dtype=torch.float32).view(1, n, 1, 1)
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        device = ref.device if ref is not None else None
        model.register_buffer("_splitaudit_mean", mean.to(device), persistent=False)
        model.register_buffer("_splitaudit_std", std.to(device), persistent=False)
    inner = type(model).forward

    def forward(self, x, *args, **kwargs):
        if input_norm is not None:
            x = (x - self._splitaudit_mean) / self._splitaudit_std
        return pick(inner(self, x, *args, **kwargs), output, what="model's output")

    model.forward = types.MethodType(forward, model)
    model._splitaudit_adapted = True
    return model
