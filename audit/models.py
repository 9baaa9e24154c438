"""Built-in victim models and loading of user models.

The built-in victims are trained on first use on the built-in data's victim split and cached by a
content hash of (architecture, training config, data, package version), so the cache can never hand
back weights trained on other data or by other code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from splitaudit.errors import ModelError, SpecError
from splitaudit.specs import parse_model_spec


class LeNet(nn.Module):
    """LeNet-5 style network for 28x28 digits (the kind of model He et al. 2019 attack on MNIST).

    ``builtin:lenet`` pads conv1 (6 channels), so conv1 keeps 28x28 and relu2 is 10x10.
    ``builtin:lenet-he`` is He, Zhang and Lee's own MNIST LeNet (ACSAC 2019): unpadded 5x5 convolutions
    and 8 channels at conv1, so 28x28 becomes 24x24 at ``conv1`` and 8x8 at ``relu2`` (4x4 after
    ``pool2``): activations whose size does not divide the input's. Both have the same layer names, so
    a cut names the same layer in both.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, conv1_channels: int = 6, padding: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, conv1_channels, 5, padding=padding)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(conv1_channels, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        side = ((28 + 2 * padding - 4) // 2 - 4) // 2  # after conv1, pool1, conv2 and pool2
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class CifarNet(nn.Module):
    """The 6-conv CNN of He et al. 2019 (three blocks of two 3x3 convs, then two dense layers).

    Widths are halved from the paper's (64/128/256 -> 32/64/128) so that it trains in about a minute on
    two CPU cores; the layer structure, and therefore the kinds of cut, are the paper's.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 32):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width

        def block(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(block(in_channels, w1), block(w1, w2), block(w2, w3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(w3 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class BuiltinModel:
    build: Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> module
    data: str  # the builtin data it is trained on
    epochs: int
    lr: float
    batch_size: int = 64


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    # Batch 128 at a higher rate: 10 epochs reach the accuracy 12 at batch 64 did (0.96 on the eval
    # split), in 3.5 s instead of 5 on one thread.
    "lenet": BuiltinModel(lambda c, k: LeNet(c, k), data="builtin:mnist", epochs=10, lr=3e-3, batch_size=128),
    # He et al.'s shapes (unpadded convolutions); the same recipe as lenet.
    "lenet-he": BuiltinModel(lambda c, k: LeNet(c, k, conv1_channels=8, padding=0), data="builtin:mnist", epochs=10, lr=3e-3, batch_size=128),
    "cifarnet": BuiltinModel(lambda c, k: CifarNet(c, k), data="builtin:photos32", epochs=8, lr=1e-3),
}


def state_hash(model: nn.Module) -> str:
    """sha256 of a model's state dict (names, shapes, dtypes and bytes), for content-addressed caching."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def build_user_model(spec: str) -> nn.Module:
    """Import ``file.py:callable`` or ``module:callable`` and call it with no arguments."""
    parsed = parse_model_spec(spec)
    if parsed.kind == "builtin":
        raise SpecError("build_user_model() got a builtin spec; use load_model()")
    if parsed.kind == "file":
        path = Path(parsed.target)
        if not path.is_file():
            raise ModelError(f"model file {parsed.target!r} not found")
        mod_name = "splitaudit_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        try:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # user code: report, do not crash
            raise ModelError(f"importing {parsed.target!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(parsed.target)
        except Exception as exc:
            raise ModelError(f"importing module {parsed.target!r} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, parsed.attr, None)
    if fn is None:
        raise ModelError(f"{parsed.target!r} has no attribute {parsed.attr!r}")
    if not callable(fn):
        raise ModelError(f"{parsed.target}:{parsed.attr} is not callable")
    try:
        model = fn()
    except Exception as exc:
        raise ModelError(f"calling {parsed.target}:{parsed.attr}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{parsed.target}:{parsed.attr}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state dict with ``weights_only=True``: a pickle in the file can never run code."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"weights file {str(path)!r} is not a loadable state dict ({first[:200]})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"weights file {str(path)!r} does not hold a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else lines[0]
        raise ModelError(f"weights file {str(path)!r} does not match the model: {detail[:300]}") from exc


def builtin_cache_key(name: str, data_hash: str, in_channels: int, num_classes: int) -> str:
    """The cache key of a trained builtin victim (built in :mod:`splitaudit.cache_keys`)."""
    from splitaudit import cache_keys

    b = BUILTIN_MODELS[name]
    with torch.device("meta"):  # its class, without drawing an initialization
        model = b.build(in_channels, num_classes)
    return cache_keys.builtin_victim(name=name, data_hash=data_hash, in_channels=in_channels, num_classes=num_classes,
                                     recipe=(b.epochs, b.lr, b.batch_size),
                                     # its class's source and the layers built from it (lenet and lenet-he share the class)
                                     source=inspect.getsource(type(model)) + repr(model),
                                     trainer=cache_keys.code_of(train_builtin))


# ------------------------------------------------------------------------------------------------
# Loading the model an audit attacks
# ------------------------------------------------------------------------------------------------
def _classify_loss(model, batch):
    import torch.nn.functional as F

    x, y = batch
    return F.cross_entropy(model(x), y)


def train_builtin(name: str, victim, *, device: torch.device, reporter) -> nn.Module:
    """A builtin victim trained on ``victim`` (the data's victim split), on every intra-op thread (nothing
    else runs yet; LeNet on 2 cores: 2.2 s against 3.1-3.4 s on one thread)."""
    from splitaudit.attacks.training import TrainConfig, train
    from splitaudit.errors import DataError
    from splitaudit.seeding import job_generator

    b = BUILTIN_MODELS[name]
    if victim.y is None:
        raise DataError(f"builtin:{name} is trained on first use and needs labelled data; {victim.spec!r} has no labels")
    num_classes = int(victim.y.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = b.build(victim.shape[0], num_classes).to(device)
    check_model_accepts(model, victim.x[:2].to(device))
    x = victim.x.to(device)
    with reporter.task(f"training builtin:{name} on {victim.n} victim images", total=b.epochs, keep=True) as task:
        # Channels-last trains these small convolutions about a third faster; the model is handed back
        # in the default layout, the one a user's model has, so latency is timed as deployed.
        train(
            model.to(memory_format=torch.channels_last),
            _classify_loss,
            (x.contiguous(memory_format=torch.channels_last), victim.y.to(device)),
            config=TrainConfig(epochs=b.epochs, lr=b.lr, batch_size=b.batch_size, patience=None),
            generator=job_generator(0, "victim", name),
            on_epoch=lambda ep, tr, va: task.update(ep),
        )
    return model.to(memory_format=torch.contiguous_format).eval()


def check_model_accepts(model: nn.Module, x: torch.Tensor) -> None:
    from splitaudit.cuts import run_model

    with torch.no_grad():
        model.eval()
        out = run_model(model, x)  # an adapted model's forward picks its output tensor (or says there is none)
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"the model returned {type(out).__name__}, not a tensor")


def build_model(spec: str, *, in_channels: int, num_classes: int) -> nn.Module:
    """The model ``spec`` names, untrained (a builtin's architecture, or what the user's callable returns)."""
    parsed = parse_model_spec(spec)
    if parsed.kind != "builtin":
        return build_user_model(spec)
    if parsed.target not in BUILTIN_MODELS:
        raise SpecError(f"unknown builtin model {parsed.target!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    with torch.random.fork_rng(devices=[]):
        return BUILTIN_MODELS[parsed.target].build(in_channels, num_classes)


def load_model(spec: str, *, weights: str | None, splits, num_classes: int, device: torch.device, cache, reporter,
               output: str | None = None, input_norm=None) -> tuple[nn.Module, dict]:
    """The model to audit and what the report says of it: a user's model (with ``weights``), or a
    builtin victim with ``weights``, from the cache, or trained on the victim split on first use;
    adapted (:func:`splitaudit.outputs.adapt_model`) to ``output`` and ``input_norm``."""
    from splitaudit.data import data_hash
    from splitaudit.outputs import adapt_model

    parsed = parse_model_spec(spec)
    info: dict = {"spec": spec, "output": output or "the first tensor", "input_norm": None if input_norm is None else
                  {"mean": list(input_norm[0]), "std": list(input_norm[1])}}
    from splitaudit.text_models import is_text_model, load_text_model

    text = is_text_model(spec)
    base = load_text_model(spec) if text else build_model(spec, in_channels=splits.eval.shape[0], num_classes=num_classes)
    model = adapt_model(base, output=output, input_norm=input_norm, channels=splits.eval.shape[0])
    if text and not weights:
        info["trained"] = "pretrained"
    if weights:
        load_weights(model, weights)
        info["weights"] = str(weights)
    elif parsed.kind == "builtin" and not text:
        key = builtin_cache_key(parsed.target, data_hash(splits.victim), splits.victim.shape[0], num_classes)
        state = cache.get("models", key)
        if state is not None:
            model.load_state_dict(state)
            info["trained"] = "cached"
        else:
            import time

            t0 = time.perf_counter()
            model = adapt_model(train_builtin(parsed.target, splits.victim, device=device, reporter=reporter), output=output,
                                input_norm=input_norm, channels=splits.eval.shape[0])
            info["trained"] = f"on first use, {time.perf_counter() - t0:.1f} s"
            cache.put("models", key, {k: v.cpu() for k, v in model.state_dict().items()})
        info["trained_on"] = f"{splits.victim.spec} victim split ({splits.victim.n} images)"
    model = model.to(device).eval()
    check_model_accepts(model, splits.eval.x[:2].to(device))
    from splitaudit import cache_keys

    info["class"] = type(model).__name__
    info["parameters"] = sum(p.numel() for p in model.parameters())
    info["weights_hash"] = state_hash(model)
    info["code_hash"] = code_hash(model, spec)
    info["hash"] = cache_keys.model_hash(info["weights_hash"], info["code_hash"])
    return model, info


def code_hash(model: nn.Module, spec: str) -> str:
    """A hash of a model's code: the source of the file or module that defines it, and of the class of
    every module in it (so an edited ``forward`` anywhere, or a swapped submodule class, is a new model)."""
    h = hashlib.sha256()
    parsed = parse_model_spec(spec)
    if parsed.kind == "file":
        h.update(Path(parsed.target).read_bytes())
    elif parsed.kind == "module":
        mod = sys.modules.get(parsed.target) or importlib.import_module(parsed.target)
        try:
            h.update(inspect.getsource(mod).encode())
        except (OSError, TypeError):
            h.update(parsed.target.encode())
    for cls in sorted({type(m) for m in model.modules()}, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
        if not cls.__module__.startswith("torch."):  # torch's own layers are fixed by the torch version
            try:
                h.update(inspect.getsource(cls).encode())
            except (OSError, TypeError):
                pass
    return h.hexdigest()[:32]
