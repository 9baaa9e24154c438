"""Where the attack jobs run: threads of this process (``local``) or tasks on a Ray cluster (``ray``).

An executor takes pure jobs (:func:`splitaudit.jobs.run_job`) and hands back their outputs; the driver in
``splitaudit.runner`` decides what to submit, caches outputs and builds rows. The protocol is small:

- ``put(key, value)``: a shared input, stored once (Ray: the object store) and referenced by jobs;
- ``release(cut)``: the shared inputs put for that cut (keys ``(kind, cut, ...)``) are no longer needed;
- ``submit(spec, inputs)``: start a job, return a handle;
- ``wait(handles, timeout)``: the handles that have finished;
- ``outcome(handle)``: the job's output, or the exception that ended it (after retries);
- ``progress()``: (job id, epoch, total) events since the last call, drawn by the driver;
- ``cancel()``: stop everything still running (Ctrl-C).

Local jobs run in a thread pool. PyTorch releases the GIL inside its kernels, and the small
convolutions of an attack use a second intra-op thread poorly (measured on 2 cores: two jobs on one
thread each finish about twice as fast as the same jobs one after the other on two threads), so each
worker gets ``threads // workers`` intra-op threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import os
import queue
import threading
from typing import Any

import torch

from splitaudit.errors import UserError
from splitaudit.jobs import JobInputs, JobOutput, JobSpec, run_job


class JobCancelled(Exception):
    """Raised inside a running job when the audit is interrupted."""


def default_workers(device: torch.device) -> int:
    if device.type == "cuda":
        return 1  # one accelerator: jobs would only queue on it
    return max(1, min(4, os.cpu_count() or 1))


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._pool: cf.ThreadPoolExecutor | None = None
        self._threads: int | None = None
        self._models: dict[Any, torch.nn.Module] = {}

    def __enter__(self):
        self._pool = cf.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="splitaudit-job")
        if self.workers > 1:
            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self._threads // self.workers))
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self.cancel()
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            self._models.clear()
            if self._threads is not None:
                torch.set_num_threads(self._threads)
        return False

    @property
    def threads_per_job(self) -> int:
        return torch.get_num_threads()

    def put(self, key: Any, value: Any) -> Any:
        # A model gets a copy per key: the hooks that stop a forward at a cut live on the module, so a
        # job running the head must not share it with the driver (capturing the next cut) or another job.
        if isinstance(value, torch.nn.Module):
            if key not in self._models:
                self._models[key] = copy.deepcopy(value)
            return self._models[key]
        return value

    def release(self, cut: str) -> None:
        for key in [k for k in self._models if isinstance(k, tuple) and len(k) > 1 and k[1] == cut]:
            del self._models[key]

    def submit(self, spec: JobSpec, inputs: JobInputs) -> cf.Future:
        def on_epoch(ep, total, _val, _id=spec.id):
            if self._stop.is_set():
                raise JobCancelled(spec.id)
            self._events.put((_id, ep, total))

        return self._pool.submit(run_job, spec, inputs, on_epoch=on_epoch)

    def wait(self, handles: list, timeout: float) -> list:
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def outcome(self, handle: cf.Future) -> JobOutput:
        return handle.result()

    def progress(self) -> list[tuple[str, int, int]]:
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def cancel(self) -> None:
        self._stop.set()


def make_executor(name: str, *, workers: int, device: torch.device, ray_address: str | None = None):
    """``workers``: parallel jobs (local), or the CPUs of a Ray runtime this call starts (0: all)."""
    if name == "local":
        return LocalExecutor(workers or default_workers(device))
    if name == "ray":
        from splitaudit.ray_executor import RayExecutor

        return RayExecutor(address=ray_address, workers=workers, gpus_per_job=1.0 if device.type == "cuda" else 0.0)
    raise UserError(f"unknown executor {name!r}; choose local or ray")
