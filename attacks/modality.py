"""What is specific to a kind of data, behind one interface: a modality.

The audit's stages (scenario, jobs, rows, views) never look at pixels or tokens themselves. They ask
the modality of the audit to load its data, to score reconstructions, to make the no-information
guess, to draw example grids, and to build and train the decoder's network. Images are the first
modality (``attacks/image.py``). A second one (text) is a new module that subclasses
:class:`Modality` and registers itself with :func:`register_modality`; nothing in ``audit/`` changes.

Metrics are per sample, and higher always means a better reconstruction (more leakage), so every
view can rank, average and bootstrap them the same way (torchmetrics' ``higher_is_better``, fixed
to True here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from splitaudit.errors import SpecError


@dataclass(frozen=True)
class MetricInfo:
    name: str  # the row key: ssim, psnr, token_accuracy, ...
    label: str  # for tables and messages
    digits: int = 3  # shown in tables
    precision: int = 5  # kept in results.json
    range: tuple[float, float] | None = (0.0, 1.0)  # the metric's possible values; None: unbounded
    # A share of things that samples hold different numbers of (PII spans): the score key of each sample's count,
    # scaled as the metric's values are, so the metric is sum(values) / sum(counts) and its interval the ratio's.
    per: str | None = None


class Modality:
    """One kind of data. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[MetricInfo, ...]] = ()
    headline: ClassVar[str] = ""  # the metric verdicts, thresholds and rankings rest on

    # -- data --
    def claims(self, data_spec: str) -> bool:
        """Whether this modality loads ``data_spec`` (the image modality is the fallback)."""
        return False

    def load_data(self, spec: str, *, model: str | None = None):
        """The data ``spec`` names; ``model`` is the model spec, for data that depends on it (text is
        tokenized by its model's tokenizer)."""
        raise NotImplementedError

    def check_data(self, dataset, spec: str) -> None:
        """Refuse data this modality cannot score (say, images smaller than SSIM's window)."""

    # -- scoring --
    def score(self, recon: torch.Tensor, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample values of every metric in :attr:`metrics`, each of shape ``(N,)``."""
        raise NotImplementedError

    def prior(self, x_aux: torch.Tensor) -> torch.Tensor:
        """The attacker's best guess without the activation, for one sample (batch dimension 1)."""
        raise NotImplementedError

    def selection_score(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample score an attacker uses to compare two attacks on its own aux data (higher: better)."""
        return self.score(recon, x)[self.headline]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample vectors (N, d) in which re-identification looks for the nearest original: a fixed,
        documented distance that needs no labels (Euclidean distance between these vectors)."""
        raise NotImplementedError

    def reid_features(self, recon: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The vectors re-identification compares: a reconstruction's and the originals'."""
        return self.features(recon), self.features(x)

    def sent_bytes(self, shape: tuple[int, ...], x_eval: torch.Tensor) -> int | None:
        """Bytes per sample a cut of per-sample ``shape`` sends, where that is not its float32 size (None)."""
        return None

    def judge(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        """An independent classifier (an architecture unlike the usual victims) that the tool trains on the
        attacker's aux data to label reconstructions: the attack accuracy. It has ``features(x)`` (the input
        of its last layer, a second space for re-identification) and ``classify(features)`` (the logits)."""
        raise NotImplementedError

    def clip(self, recon: torch.Tensor) -> torch.Tensor:
        """A reconstruction brought into the data's own range."""
        return recon

    # -- the decoder attack --
    def decoder(self, act_shape: tuple[int, ...], input_shape: tuple[int, ...], *, width: int, full_res: bool) -> nn.Module:
        """The inverse network from an activation of ``act_shape`` to an input of ``input_shape``."""
        raise NotImplementedError

    reconstruction_loss: ClassVar[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None] = None

    def decoder_kwargs(self, x_train: torch.Tensor) -> dict:
        """What the decoder's network needs from the attacker's training inputs (text: its vocabulary);
        saved with the fitted attack, so a cached one is rebuilt the same."""
        return {}

    def initialize(self, model: nn.Module, u: torch.Tensor, x: torch.Tensor, u_val: torch.Tensor,
                   x_val: torch.Tensor) -> tuple[float, str]:
        """Start a freshly built decoder network from the attacker's training data (folded activations ``u``,
        inputs ``x``) before it trains, and say what that start calls for: a factor on the learning rate, and why
        (judged on the held-out ``u_val``, ``x_val`` only; '' when there is nothing to say). The default keeps the
        random initialization and the profile's rate."""
        return 1.0, ""

    def training_loss(self, model: nn.Module, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The decoder's loss on a batch of folded activations ``u`` and inputs ``x``."""
        return self.reconstruction_loss(model.decode(u), x)

    def prior_loss(self, x_train: torch.Tensor, x_val: torch.Tensor) -> float:
        """The loss of the no-information guess (made from ``x_train``) on ``x_val``: a decoder must beat it."""
        return float(self.reconstruction_loss(self.prior(x_train).expand_as(x_val), x_val))

    def budget(self, profile: str):
        """The decoder's budget for ``profile`` when this modality has its own (None: the decoder's profiles)."""
        return None

    def holdout(self, perm: torch.Tensor, x: torch.Tensor, n_val: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out and training indices of a decoder's aux data, from a random order ``perm``."""
        return perm[:n_val], perm[n_val:]

    def on_wire(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What of the (defended) activations ``z`` of inputs ``x`` crosses the wire: all of it."""
        return z

    def sent(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The values of the activations ``z`` of inputs ``x`` that cross the wire, which a defense's statistics
        (a noise scale relative to the activation's std, a quantization range) are fitted on: all of them."""
        return z

    def standardized(self, z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``z`` in the decoder's standardized scale (the aux statistics ``mean`` and ``std``)."""
        return (z - mean) / std

    def adaptive_epochs(self, profile: str, default: int) -> int:
        """Epochs of an adaptive refinement (0: a full budget): the profile's ``default`` unless the
        modality's own budget sets it."""
        b = self.budget(profile)
        return b.refine_epochs if b is not None and b.refine_epochs else default

    # Draws of a stochastic defense that utility averages, at most (the profile sets the number): one for
    # text, whose utility (a mean cosine similarity over 1,000 sentence embeddings) varies little between
    # draws, and whose tails are a transformer's blocks.
    utility_draws: ClassVar[int] = 1_000
    # Evaluation samples utility is measured on, at most (the first of the evaluation split, a random draw): all of
    # them unless a modality's tails are costly (a transformer's blocks, one tail per defense and cut).
    utility_samples: ClassVar[int | None] = None
    examples_format: ClassVar[str] = "png"  # what ``examples`` returns: png (image bytes) or html (a fragment)

    # -- views --
    def examples(self, x: torch.Tensor, recon: torch.Tensor, *, fixed: torch.Tensor, ranked: torch.Tensor,
                 values: torch.Tensor, data=None) -> bytes:
        """A picture of some originals next to their reconstructions (PNG bytes): ``fixed`` samples shown in
        every row, then ``ranked`` ones (the most recognizable), each labelled with its ``values``."""
        raise NotImplementedError

    def metric(self, name: str) -> MetricInfo:
        return next(m for m in self.metrics if m.name == name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "headline": self.headline, "metrics": [m.name for m in self.metrics]}


MODALITIES: dict[str, Modality] = {}
FALLBACK = "image"


def register_modality(cls: type[Modality]) -> type[Modality]:
    MODALITIES[cls.name] = cls()
    return cls


def get_modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise SpecError(f"unknown modality {name!r}; known modalities: {', '.join(sorted(MODALITIES))}")
    return MODALITIES[name]


def modality_for(data_spec: str) -> Modality:
    """The modality that claims ``data_spec``; the image modality for everything none claims."""
    for m in MODALITIES.values():
        if m.name != FALLBACK and m.claims(data_spec):
            return m
    return MODALITIES[FALLBACK]
