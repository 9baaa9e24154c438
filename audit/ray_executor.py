"""Run the attack jobs as Ray tasks (``--executor ray``); Ray is the optional extra ``splitaudit[ray]``.

What travels where:
- once per audit, into the object store: the attacker's aux images and the evaluation images;
- once per cut (and per model a defense changes): that cut's captured activations;
- once per model, only for white-box attacks: the model (a model defined in a file is pickled by value,
  so the workers need no copy of the file);
- per job: the job spec (a few strings), the references above, and a refinement's starting state
  (a decoder's weights, ~100 KB).

Each task asks for one CPU (and one GPU under ``--device cuda``) and runs with that many intra-op
threads, so a row does not depend on where or in which order it ran. A task whose worker dies, or
whose job raises, is retried ``max_retries`` times; a job that keeps failing comes back as its
exception and the driver records a failed row. Epoch progress flows back through a Ray queue and is
drawn by the driver.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

from splitaudit.errors import UserError
from splitaudit.jobs import Activations, JobInputs, JobOutput, JobSpec, Scores, run_job

MAX_RETRIES = 2


def _resolve(x):
    import ray

    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, Activations):
        return Activations(aux=x.aux.cpu(), eval=x.eval.cpu())
    return x


def _task(spec: JobSpec, inputs: JobInputs, events, threads: int) -> JobOutput:
    """The body of one Ray task: resolve the shared inputs, run the job, send CPU tensors back."""
    torch.set_num_threads(threads)
    device = torch.device(spec.device)
    acts = {}
    for k, ref in inputs.acts.items():
        a = _resolve(ref)
        acts[k] = Activations(aux=a.aux.to(device), eval=a.eval.to(device))
    head, judge, y_eval = _resolve(inputs.head), _resolve(inputs.judge), _resolve(inputs.y_eval)
    judge_features, prior_scores = _resolve(inputs.judge_features), _resolve(inputs.prior_scores)
    resolved = JobInputs(
        x_aux=_resolve(inputs.x_aux).to(device), x_eval=_resolve(inputs.x_eval).to(device), acts=acts, fitted=inputs.fitted,
        head=None if head is None else head.to(device), base_state=_resolve(inputs.base_state),
        candidate_state=_resolve(inputs.candidate_state), candidate_converged=inputs.candidate_converged, cached=inputs.cached,
        start_state=_resolve(inputs.start_state), start_converged=inputs.start_converged,
        judge=None if judge is None else judge.to(device), y_eval=None if y_eval is None else y_eval.to(device),
        judge_features=None if judge_features is None else judge_features.to(device),
        prior_scores=None if prior_scores is None else prior_scores.to(device),
    )

    def on_epoch(ep, total, _val):
        try:
            events.put_nowait((spec.id, ep, total))
        except Exception:  # noqa: BLE001 - progress is best effort; a full queue must not fail the job
            pass

    out = run_job(spec, resolved, on_epoch=on_epoch)
    return JobOutput(
        spec=out.spec, report=out.report, state=_cpu(out.state), seconds=out.seconds,
        scores={d: Scores(values=_cpu(s.values), recon_idx=s.recon_idx.cpu(), recon=s.recon.cpu()) for d, s in out.scores.items()},
    )


def require_ray() -> None:
    """A one-line UserError (exit 2) when the optional extra is not installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("--executor ray needs Ray; install it with: pip install 'splitaudit[ray]'") from None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, workers: int = 0, gpus_per_job: float = 0.0):
        require_ray()
        self.address = address
        self.workers = workers
        self.gpus_per_job = gpus_per_job
        self._refs: dict[Any, Any] = {}
        self._owns = False
        self._outstanding: set = set()

    def __enter__(self):
        import ray

        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=self.workers or None, **kw)
            self._owns = True
        self._register_user_modules()
        from ray.util.queue import Queue

        self._events = Queue(maxsize=10_000)
        self._remote = ray.remote(_task).options(
            num_cpus=1, num_gpus=self.gpus_per_job, max_retries=MAX_RETRIES, retry_exceptions=True,
        )
        self.workers = max(1, int(ray.available_resources().get("CPU", 1)))
        return self

    def __exit__(self, *exc):
        import ray

        if exc[0] is not None:
            self.cancel()
        try:
            self._events.shutdown()
        except Exception:  # noqa: BLE001
            pass
        self._refs.clear()
        if self._owns:
            ray.shutdown()
        return False

    @staticmethod
    def _register_user_modules() -> None:
        """Models loaded from a file path live in modules the workers cannot import: pickle them by value."""
        from ray import cloudpickle  # Ray's own copy: registering with the standalone package does nothing here

        for name, module in list(sys.modules.items()):
            if name.startswith("splitaudit_user_"):
                cloudpickle.register_pickle_by_value(module)

    @property
    def threads_per_job(self) -> int:
        return 1

    def put(self, key: Any, value: Any) -> Any:
        import ray

        if value is None:
            return None
        if key not in self._refs:
            if isinstance(value, torch.nn.Module):  # a copy: .cpu() would move the driver's own model
                value = copy.deepcopy(value).cpu()
            self._refs[key] = ray.put(_cpu(value))
        return self._refs[key]

    def release(self, cut: str) -> None:
        for key in [k for k in self._refs if isinstance(k, tuple) and len(k) > 1 and k[1] == cut]:
            del self._refs[key]

    def submit(self, spec: JobSpec, inputs: JobInputs):
        ref = self._remote.remote(spec, inputs, self._events, self.threads_per_job)
        self._outstanding.add(ref)
        return ref

    def wait(self, handles: list, timeout: float) -> list:
        import ray

        done, _ = ray.wait(handles, num_returns=len(handles), timeout=timeout)
        return done

    def outcome(self, handle) -> JobOutput:
        import ray

        self._outstanding.discard(handle)
        try:
            return ray.get(handle)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)  # the job's own exception, without Ray's wrapping
            raise (cause if isinstance(cause, BaseException) else exc.as_instanceof_cause()) from None

    def progress(self) -> list[tuple[str, int, int]]:
        out = []
        try:
            while not self._events.empty():
                out.append(self._events.get_nowait())
        except Exception:  # noqa: BLE001 - an empty or closed queue
            pass
        return out

    def cancel(self) -> None:
        import ray

        for ref in list(self._outstanding):
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished
                pass
        self._outstanding.clear()
