"""The one module where splitaudit uses torch internals; each use has a fallback to torch's public API.

- :func:`adam`: Adam stepping torch's fused kernel (``torch._fused_adam_``) directly on the CPU, instead
  of through ``torch.optim.Adam(fused=True)``. Measured, standard demo, back to back in one stretch
  (``python benchmarks/bench_demo.py --profiles standard --no-rerun``): 114.1 s with it, 127.1 s with
  ``torch.optim.Adam(fused=True)`` (the attack jobs 90.4 s against 100.6 s). A step costs 340 us against
  620 us through torch.optim's wrapper (a full-resolution decoder, one thread), Python time that the
  two worker threads serialize on. That is over the 5% of the demo's time that a trick must save to
  stay. Where the kernel is absent (another torch version) :func:`adam` returns torch's own optimizer;
  the tests run both.

Nothing else here: the FLOP counter's dynamo patch and ``os._exit`` saved under 5% and were removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FusedAdam:
    """Adam through torch's fused kernel, outside ``torch.optim``.

    The arithmetic of ``torch.optim.Adam(fused=True)``: the same state (zeroed moments and a float32
    step counter per parameter, on its device, made at its first gradient), the counter incremented,
    then the same kernel, ``torch._fused_adam_``, over the parameters that have a gradient. The
    updates are bitwise equal (tested). What it leaves out is the Python wrapper around every
    ``torch.optim`` step (about 0.3 ms a step here), which the attack jobs' threads serialize on.
    """

    def __init__(self, params: Sequence[nn.Parameter], *, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # index -> (exp_avg, exp_avg_sq, step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        groups: dict[tuple, list[list[torch.Tensor]]] = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            if i not in self.state:
                self.state[i] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros((), dtype=torch.float32, device=p.device))
            exp_avg, exp_avg_sq, step = self.state[i]
            g = groups.setdefault((p.device, p.dtype), [[], [], [], [], []])
            for acc, t in zip(g, (p, p.grad, exp_avg, exp_avg_sq, step)):
                acc.append(t)
        for ps, grads, exp_avgs, exp_avg_sqs, steps in groups.values():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(ps, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=self.lr, beta1=self.betas[0],
                               beta2=self.betas[1], weight_decay=self.weight_decay, eps=self.eps, maximize=False,
                               grad_scale=None, found_inf=None)


def has_fused_adam() -> bool:
    return callable(getattr(torch, "_fused_adam_", None))


def adam(params: Sequence[nn.Parameter], *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)):
    """An Adam optimizer for ``params``: :class:`FusedAdam` when every parameter is a float tensor on the
    CPU and torch has the kernel; ``torch.optim.Adam(fused=True)`` on CUDA (checked on a GPU); else
    torch's default Adam (its fused path needs the same kernel)."""
    params = list(params)
    floats = bool(params) and all(p.is_floating_point() for p in params)
    if floats and has_fused_adam() and all(p.device.type == "cpu" for p in params):
        return FusedAdam(params, lr=lr, weight_decay=weight_decay, betas=betas)
    fused = floats and has_fused_adam() and all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, betas=betas, **({"fused": True} if fused else {}))
