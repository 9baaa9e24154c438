"""Cut points: discovery, head-only capture, and running the model with the cut's output replaced.

A cut names a module; the activation that crosses the wire is that module's output. Discovery runs
one forward pass with a hook on every module, so it sees modules inside residual blocks and models
whose ``forward`` mixes modules with functional ops, in the order their outputs are produced.

The head is never materialized as a separate module (that is impossible for a general ``forward``).
Instead, a hook on the cut module raises :class:`_StopForward` carrying the output, so the forward
pass stops right there and no layer after the cut runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from splitaudit.errors import ModelError, SpecError, UserError
from splitaudit.outputs import flatten, nbytes_per_sample, pick, put, split_cut
from splitaudit.text_data import PAD


class _StopForward(BaseException):
    """Raised by the capture hook. A BaseException so a user's ``except Exception`` cannot swallow it."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


@dataclass(frozen=True)
class CutPoint:
    name: str
    shape: tuple[int, ...]  # per sample, without the batch dimension
    index: int  # position in execution order
    module_type: str
    aliases: tuple[str, ...] = ()  # modules whose output is this very tensor (a Sequential ending here)
    sent_bytes: int | None = None  # float32 bytes per sample of everything the module returns, when it returns a nest

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_spatial(self) -> bool:
        return len(self.shape) == 3


@dataclass(frozen=True)
class Discovery:
    cuts: tuple[CutPoint, ...]
    skipped: tuple[tuple[str, str], ...]  # (module name, why it is not a candidate)

    def names(self) -> list[str]:
        return [c.name for c in self.cuts]

    def get(self, name: str) -> CutPoint:
        for c in self.cuts:
            if c.name == name or name in c.aliases:
                return c
        module, path = split_cut(name)
        for c in self.cuts:  # a tensor of a module's nest other than its first: ``block:1``
            if path is not None and split_cut(c.name)[0] == module:
                return CutPoint(name, c.shape, c.index, c.module_type, sent_bytes=c.sent_bytes)
        valid = ", ".join(self.names())
        raise SpecError(f"unknown cut {name!r}; valid cuts: {valid}")


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Call the model, turning an exception from the user's code into a one-line ModelError."""
    try:
        return model(x)
    except (_StopForward, UserError):  # our own stop, or a bad --output: as they are
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"the model rejected input of shape {tuple(x.shape)}: {type(exc).__name__}: {msg[:300]}"
        ) from exc


@torch.no_grad()
def discover_cuts(model: nn.Module, sample: torch.Tensor) -> Discovery:
    """Every module whose output is a tensor, in execution order (one forward pass on ``sample``)."""
    model.eval()
    calls: dict[str, int] = {}
    order: list[tuple[str, torch.Tensor, int, str]] = []
    skipped: list[tuple[str, str]] = []
    handles = []

    def make_hook(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                if isinstance(output, torch.Tensor) and output.is_floating_point():
                    order.append((name, output, output._version, type(module).__name__, None))
                elif (found := [t for _, t in flatten(output) if t.is_floating_point() and t.dim() >= 1]):
                    # A nest (a tuple, a dict, a ModelOutput): a cut on its first float tensor; ``name:path`` picks another.
                    order.append((name, found[0], found[0]._version, type(module).__name__, nbytes_per_sample(output)))
                else:
                    skipped.append((name, f"output is {type(output).__name__} and holds no float tensor"))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        run_model(model, sample)
    finally:
        for h in handles:
            h.remove()

    cuts: list[CutPoint] = []
    seen: list[tuple[tuple, int]] = []
    for name, out, version, mtype, sent in order:
        if calls[name] > 1:
            skipped.append((name, f"called {calls[name]} times in one forward pass, so its output is ambiguous"))
            continue
        if out.shape[0] != sample.shape[0]:
            skipped.append((name, "output has no batch dimension"))
            continue
        # The same bytes, not modified in place since: an alias (a container ending in this module, an
        # identity such as Dropout in eval mode, or a view such as Flatten). It carries exactly the
        # same information, so it is attacked once under the first name.
        ident = (out.untyped_storage().data_ptr(), out.storage_offset(), out.numel(), out.dtype)
        alias_of = next((i for i, (t, v) in enumerate(seen) if t == ident and v == version), None)
        if alias_of is not None:
            prev = cuts[alias_of]
            cuts[alias_of] = CutPoint(prev.name, prev.shape, prev.index, prev.module_type, prev.aliases + (name,), prev.sent_bytes)
            continue
        seen.append((ident, version))
        cuts.append(CutPoint(name, tuple(_padded(model, sample, out).shape[1:]), len(cuts), mtype, sent_bytes=sent))
    # A model that declares its split points (``split_points``, a tuple of module names: the text models'
    # embeddings, blocks and pooled output) offers only those, under the names it declares.
    declared = getattr(model, "split_points", None)
    if declared:
        kept = []
        for c in cuts:
            names = (c.name, *c.aliases)
            mine = [n for n in names if n in declared]
            if mine:
                kept.append(CutPoint(mine[0], c.shape, len(kept), c.module_type, tuple(n for n in names if n != mine[0]), c.sent_bytes))
            else:
                skipped.append((c.name, "not one of the split points the model declares"))
        cuts = kept
    # The input itself is not a candidate here; the planner adds "all on the server" separately.
    return Discovery(tuple(cuts), tuple(skipped))


def _module(model: nn.Module, name: str) -> nn.Module:
    module = split_cut(name)[0]
    try:
        return model.get_submodule(module)
    except AttributeError:
        raise SpecError(f"model has no module {module!r}") from None


def _at(cut: str, output) -> torch.Tensor:
    """The activation at ``cut`` in its module's ``output`` (the output, or a tensor of its nest)."""
    if isinstance(output, torch.Tensor) and split_cut(cut)[1] is None:
        return output
    return pick(output, split_cut(cut)[1], what=f"output of {split_cut(cut)[0]!r}")


def _with(cut: str, output, value: torch.Tensor):
    """``output`` with the activation at ``cut`` replaced by ``value``."""
    if isinstance(output, torch.Tensor) and split_cut(cut)[1] is None:
        return value
    return put(output, split_cut(cut)[1], value)


def head_forward(model: nn.Module, cut: str, x: torch.Tensor) -> torch.Tensor:
    """Run only the head: the forward pass stops at the cut module's output."""

    def hook(module, inputs, output):
        raise _StopForward(_at(cut, output))

    handle = _module(model, cut).register_forward_hook(hook)
    try:
        run_model(model, x)
    except _StopForward as stop:
        return stop.value
    finally:
        handle.remove()
    raise ModelError(f"cut {cut!r} was not reached in the forward pass")


@torch.no_grad()
def capture(model: nn.Module, cut: str, x: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """The activations at ``cut`` for all of ``x``, batch by batch, on ``x``'s device."""
    return capture_many(model, [cut], x, batch_size=batch_size)[cut]


def _padded(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For a model that declares ``variable_length`` (the text models, which run each batch at its own
    longest text): ``t`` (B, L_batch, d) zeroed at the padding positions of ``x`` (the tag PAD) and
    zero-padded to the data's length. Padding is never sent, so the attacker sees zeros there."""
    if not getattr(model, "variable_length", False) or t.dim() != 3 or t.shape[0] != x.shape[0]:
        return t
    if t.shape[1] < x.shape[-1]:
        t = torch.nn.functional.pad(t, (0, 0, 0, x.shape[-1] - t.shape[1]))
    return t * (x[:, 1] != PAD).unsqueeze(-1).to(t.dtype)


def _by_length(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` in the order a model runs it best, and the function that puts per-sample results back in the
    data's order. A ``variable_length`` model gets its texts longest first: batches of texts of similar
    length then run at their own length, not the data's longest (half the time on the builtin PII texts).
    Any other model gets ``x`` as it is."""
    order = _length_order(model, x)
    if order is None:
        return x, lambda t: t
    inverse = torch.argsort(order)
    return x[order], lambda t: t[inverse.to(t.device)]


def _length_order(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The longest-first order of a ``variable_length`` model's texts (None: any other model, the data's order)."""
    if not getattr(model, "variable_length", False) or x.dim() != 3:
        return None
    return torch.argsort((x[:, 1] != PAD).sum(dim=1), descending=True, stable=True)


def _batch(model: nn.Module, batch_size: int | None) -> int:
    """The batch a forward pass runs: ``batch_size`` if given, else the model's own ``forward_batch``, else 256."""
    return batch_size or getattr(model, "forward_batch", 256)


@torch.no_grad()
def capture_many(model: nn.Module, cuts: list[str], x: torch.Tensor, *, batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The activations at each of ``cuts`` for all of ``x``, from one pass per batch that stops at the
    last of them to run. Each is copied when its module returns, so an in-place op after the cut (a
    ``ReLU(inplace=True)``) does not change what was captured. :func:`capture` is this for one cut."""
    model.eval()
    x, restore = _by_length(model, x)
    return {c: restore(v) for c, v in _capture_in_order(model, cuts, x, _batch(model, batch_size)).items()}


def _capture_in_order(model: nn.Module, cuts: list[str], x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    outs: dict[str, list[torch.Tensor]] = {c: [] for c in cuts}
    left: set[str] = set()
    batch: list[torch.Tensor] = []

    def make_hook(cut):
        def hook(module, inputs, output):
            if cut in left:
                outs[cut].append(_padded(model, batch[0], _at(cut, output).detach().clone()))
                left.discard(cut)
                if not left:
                    raise _StopForward(output)
        return hook

    handles = [_module(model, c).register_forward_hook(make_hook(c)) for c in cuts]
    try:
        for i in range(0, x.shape[0], batch_size):
            left.update(cuts)
            batch[:] = [x[i : i + batch_size]]
            try:
                run_model(model, batch[0])
            except _StopForward:
                pass
            if left:
                raise ModelError(f"cut {sorted(left)[0]!r} was not reached in the forward pass")
    finally:
        for h in handles:
            h.remove()
    return {c: torch.cat(v) for c, v in outs.items()}


def forward_with(model: nn.Module, cut: str, x: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The full model's output with the cut's activation replaced by ``transform(activation)``.

    This is what the server computes when the device applies a defense before sending.
    """

    def hook(module, inputs, output):
        return _with(cut, output, transform(_at(cut, output)))

    handle = _module(model, cut).register_forward_hook(hook)
    try:
        return run_model(model, x)
    finally:
        handle.remove()


def _top1(out, model: nn.Module | None = None) -> torch.Tensor:
    """A model's prediction: the top-1 class of its logits, or for a model that declares
    ``output_kind = "embedding"`` (the text models) its L2-normalized output vector."""
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        raise ModelError("the model's output is not a (batch, classes) tensor, so accuracy cannot be measured")
    if getattr(model, "output_kind", "logits") == "embedding":
        return torch.nn.functional.normalize(out.flatten(1).float(), dim=1)
    return out.argmax(dim=1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, cut: str | None = None, transform=None, batch_size: int | None = None) -> torch.Tensor:
    """Top-1 predictions, optionally with a defense applied at ``cut``."""
    if cut is not None and transform is not None:
        return predict_each(model, x, cut, [transform], batch_size=batch_size)[0]
    model.eval()
    batch_size = _batch(model, batch_size)
    x, restore = _by_length(model, x)
    return restore(torch.cat([_top1(run_model(model, x[i : i + batch_size]), model) for i in range(0, x.shape[0], batch_size)]))


def _stacked(model: nn.Module, cut: str, x: torch.Tensor, transforms) -> list[torch.Tensor] | None:
    """The model's outputs for each of ``transforms`` applied at ``cut``, from one pass: the cut's
    output is replaced by the transforms' outputs stacked along the batch, so the head runs once and
    the tail once on all of them. None when the model fails that way or its output does not have one
    row per stacked sample."""
    n, k = x.shape[0], len(transforms)

    def hook(module, inputs, output):
        # Each transform gets an activation of its own, as in one pass per transform: one that works
        # in place must not change what the next one sees.
        z = _at(cut, output)
        return _with(cut, output, torch.cat([t(z if i == k - 1 else z.clone()) for i, t in enumerate(transforms)]))

    handle = _module(model, cut).register_forward_hook(hook)
    try:
        out = run_model(model, x)
    except ModelError:
        return None
    finally:
        handle.remove()
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != n * k:
        return None
    return list(out.split(n))


@torch.no_grad()
def _stacks(model: nn.Module, cut: str, x: torch.Tensor, k: int) -> bool:
    """Whether ``k`` activations stacked at ``cut`` come out of the tail as each would alone, tried on
    two samples with k different made-up changes to the activation, before any transform draws noise.
    A tail that combines the cut's output with a tensor from before the cut (a skip connection across
    it), reshapes to the input's batch size or calls the cut module again fails or changes the
    output's size (with two samples nothing can broadcast against the stack); one that mixes samples
    (batch statistics) gives other outputs than one pass per change."""
    if k < 2 or x.shape[0] < 2:
        return False
    xb = x[:2]
    probes = [lambda z, j=j: z * (1 + j) + j for j in range(k)]
    outs = _stacked(model, cut, xb, probes)
    if outs is None:
        return False
    for probe, out in zip(probes, outs):
        alone = forward_with(model, cut, xb, probe)
        if not isinstance(alone, torch.Tensor) or not alone.is_floating_point() or out.shape != alone.shape:
            return False
        if not torch.allclose(out, alone, rtol=1e-4, atol=1e-5 * (float(alone.abs().max()) + 1.0)):
            return False
    return True


@torch.no_grad()
def predict_each(model: nn.Module, x: torch.Tensor, cut: str, transforms, *, batch_size: int | None = None) -> list[torch.Tensor]:
    """Top-1 predictions with each of ``transforms`` applied at ``cut``, one tensor per transform.

    Where the model allows it (see :func:`_stacks`), the transforms share each batch's head and the
    tail runs on them stacked; otherwise the model runs once per transform. Each transform is applied
    to the same batches in the same order either way, so one that draws noise from a generator of its
    own draws the same noise, and the predictions are those of one pass per transform. One exception:
    a stacked pass that passed the check and still fails on a full batch (out of memory, say) is not
    tried again, and that batch's transforms run again one by one, drawing their noise a second time.
    """
    model.eval()
    transforms, batch_size = list(transforms), _batch(model, batch_size)
    x, restore = _by_length(model, x)
    stack = _stacks(model, cut, x, len(transforms))
    preds: list[list[torch.Tensor]] = [[] for _ in transforms]
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size]
        outs = _stacked(model, cut, xb, transforms) if stack and xb.shape[0] >= 2 else None
        if outs is None:
            stack = stack and xb.shape[0] < 2  # a full batch that failed stacked: the rest run one by one
            outs = [forward_with(model, cut, xb, t) for t in transforms]
        for p, out in zip(preds, outs):
            p.append(_top1(out, model))
    return [restore(torch.cat(p)) for p in preds]


def runs_from(model: nn.Module, cut: str) -> bool:
    """Whether ``model`` can run its tail alone from an activation at ``cut`` (a ``forward_from`` that takes it)."""
    check = getattr(model, "runs_from", None)
    return callable(check) and callable(getattr(model, "forward_from", None)) and bool(check(cut))


@torch.no_grad()
def predict_from(model: nn.Module, x: torch.Tensor, cut: str, z: torch.Tensor, transforms, *,
                 batch_size: int | None = None) -> list[torch.Tensor]:
    """Top-1 predictions with each of ``transforms`` applied to ``z``, the activations at ``cut`` captured for
    ``x``, running only the tail (the model's ``forward_from``; see :func:`runs_from`): what
    :func:`predict_each` gives without running the head again. Each transform is applied to all of ``z`` at
    once, as the attack jobs apply a defense to the evaluation activations they score.
    """
    model.eval()
    if x.shape[0] == 0:
        return [predict(model, x, batch_size=batch_size) for _ in transforms]
    batch_size = _batch(model, batch_size)
    xo, restore = _by_length(model, x)
    order = _length_order(model, x)  # the same order for the activations, after each transform has drawn its noise
    out = []
    for t in transforms:
        zt = t(z) if order is None else t(z)[order.to(z.device)]
        preds = [_top1(model.forward_from(cut, zt[i : i + batch_size], xo[i : i + batch_size]), model)
                 for i in range(0, x.shape[0], batch_size)]
        out.append(restore(torch.cat(preds)))
    return out
