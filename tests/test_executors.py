"""Executors: the same rows wherever jobs run, failures retried or reported, interrupts keep what finished."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from splitaudit.defenses import make_defense
from splitaudit.jobs import Activations, JobInputs, JobSpec, run_job
from splitaudit.progress import Reporter, Task
from splitaudit.runner import NOT_RUN, AuditConfig, AuditInterrupted, run_audit
from splitaudit.writer import write
from tests.conftest import write_tiny_npz

# A model whose forward fails while something differentiates through it with respect to the input:
# only the white-box attack does, so capture, utility and latency run, and the rmle job fails.
FLAKY = '''
import torch
from torch import nn

COUNTER = {counter!r}
FAIL_TIMES = {fail_times}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 12 * 12, 4)

    def forward(self, x):
        if x.requires_grad:
            with open(COUNTER) as f:
                failed = len(f.read().splitlines())
            if failed < FAIL_TIMES:
                with open(COUNTER, "a") as f:
                    f.write("failed\\n")
                raise RuntimeError("injected failure")
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build():
    torch.manual_seed(0)
    return Net()
'''


def _flaky(tmp_path, fail_times):
    counter = tmp_path / "attempts.txt"
    counter.write_text("")
    path = tmp_path / f"flaky{fail_times}.py"
    path.write_text(FLAKY.format(counter=str(counter), fail_times=fail_times))
    return path, counter


def _config(npz, **kw):
    # On the CPU: the equalities below are about threads and processes; CUDA kernels are not bitwise
    # reproducible (seen on an H200: a PSNR differed in its third decimal between two identical runs).
    base = dict(model="tests/tiny.py:build", data=str(npz), profile="quick", seed=0, use_cache=False,
                defenses=("none", "noise:sigma=1"), cuts=("stem", "block"), device="cpu")
    return AuditConfig(**(base | kw))


def _values(result):
    return [(r.key, r.ssim, r.ssim_ci, r.psnr, r.status, r.accuracy) for r in result.results]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return write_tiny_npz(tmp_path_factory.mktemp("ex") / "d.npz", n=240)


def test_a_job_is_pure_same_inputs_same_output():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 1, 12, 12, generator=g)
    z = torch.nn.functional.avg_pool2d(x, 2).repeat(1, 3, 1, 1)
    inputs = JobInputs(x_aux=x[:60], x_eval=x[60:], acts={"none": Activations(aux=z[:60], eval=z[60:])})
    spec = JobSpec(cut="c", attack="decoder", defense="none", kind="fit", profile="quick", seed=3, score=("none",))
    a, b = run_job(spec, inputs), run_job(spec, inputs)
    assert torch.equal(a.scores["none"].ssim, b.scores["none"].ssim)
    other = run_job(JobSpec(**{**spec.__dict__, "seed": 4}), inputs)
    assert not torch.equal(a.scores["none"].ssim, other.scores["none"].ssim)


def test_parallel_local_rows_equal_one_worker_rows_at_one_thread(npz):
    # With one intra-op thread per job either way, how many jobs run at once changes nothing.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run_audit(_config(npz, workers=1))
        torch.set_num_threads(2)  # two workers of one thread each
        parallel = run_audit(_config(npz, workers=2))
    finally:
        torch.set_num_threads(threads)
    assert serial.config["threads_per_job"] == parallel.config["threads_per_job"] == 1
    assert parallel.config["workers"] == 2
    assert _values(serial) == _values(parallel)


def test_a_failed_base_fit_fails_its_rows_and_the_audit_goes_on(npz, monkeypatch):
    from splitaudit.attacks.decoder import DecoderAttack

    fit, calls = DecoderAttack.fit, []

    def failing(self, z, x, ctx):
        calls.append(1)
        if len(calls) == 1:  # the first job with one worker: the base fit at the first cut
            raise RuntimeError("diverged everywhere")
        return fit(self, z, x, ctx)

    monkeypatch.setattr(DecoderAttack, "fit", failing)
    result = run_audit(_config(npz, workers=1))
    stem = result.rows(cut="stem")
    assert stem and all(r.status == "failed" and "diverged everywhere" in r.error for r in stem)
    assert all(r.status != "failed" for r in result.rows(cut="block"))


def test_a_cut_named_twice_is_audited_once(npz):
    result = run_audit(_config(npz, cuts=("stem", "stem"), defenses=("none",)))
    assert [c.name for c in result.cuts] == ["stem"] and len(result.results) == 1


def test_a_failing_local_job_is_a_failed_row_with_its_error(npz, tmp_path):
    path, counter = _flaky(tmp_path, fail_times=99)
    result = run_audit(_config(npz, model=f"{path}:build", attacks=("rmle",), cuts=("conv",), defenses=("none",)))
    (row,) = result.results
    assert row.status == "failed" and "injected failure" in row.error and math.isnan(row.ssim)
    assert counter.read_text().count("failed") == 1  # the local executor does not retry


class _InterruptAfter(Reporter):
    """Ctrl-C while the n-th job is being started."""

    def __init__(self, n):
        self.n, self.opened = n, 0

    def open(self, description, total=None):  # written before `keep`: still accepted
        if "clean activations" in description or "adapted" in description or "refined" in description:
            self.opened += 1
            if self.opened == self.n:
                raise KeyboardInterrupt
        return Task()


def test_an_interrupt_keeps_finished_rows_and_writes_a_whole_file(npz, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AuditInterrupted) as info:
        run_audit(_config(npz, out=str(out), workers=1), reporter=_InterruptAfter(5))
    result = info.value.result
    write(result, out)  # what the CLI does with an interrupted audit
    assert result.config["interrupted"] is True
    done = [r for r in result.results if r.status != "failed"]
    not_run = [r for r in result.results if r.error == NOT_RUN]
    assert done and not_run and len(done) + len(not_run) == len(result.results)
    saved = json.loads((out / "results.json").read_text())  # whole, parseable
    assert saved["config"]["interrupted"] is True and "interrupted" in saved["notes"][0]
    assert not list(out.glob("*.tmp*"))


@pytest.fixture(scope="module")
def ray_runtime():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra splitaudit[ray]")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_rows_equal_local_rows(npz, ray_runtime):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray tasks get one thread each; so does every local job here
    try:
        local = run_audit(_config(npz, workers=1))
    finally:
        torch.set_num_threads(threads)
    on_ray = run_audit(_config(npz, executor="ray"))
    assert on_ray.config["executor"] == "ray" and on_ray.config["workers"] >= 1
    assert _values(local) == _values(on_ray)


def test_a_ray_task_that_fails_once_is_retried(npz, ray_runtime, tmp_path):
    path, counter = _flaky(tmp_path, fail_times=1)
    result = run_audit(_config(npz, model=f"{path}:build", attacks=("rmle",), cuts=("conv",), defenses=("none",), executor="ray"))
    (row,) = result.results
    assert counter.read_text().count("failed") == 1  # it did fail once ...
    assert row.status != "failed" and math.isfinite(row.ssim)  # ... and the retry produced the row


def test_a_ray_task_that_keeps_failing_is_reported_not_dropped(npz, ray_runtime, tmp_path):
    from splitaudit.ray_executor import MAX_RETRIES

    path, counter = _flaky(tmp_path, fail_times=99)
    result = run_audit(_config(npz, model=f"{path}:build", attacks=("rmle",), cuts=("conv",), defenses=("none",), executor="ray"))
    (row,) = result.results
    assert counter.read_text().count("failed") == 1 + MAX_RETRIES
    assert row.status == "failed" and "injected failure" in row.error


def test_executor_ray_without_ray_is_exit_2(monkeypatch, npz, capsys):
    from splitaudit.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["audit", "--model", "tests/tiny.py:build", "--data", str(npz), "--executor", "ray", "--profile", "quick", "--no-cache"])
    assert code == 2
    assert "pip install 'splitaudit[ray]'" in capsys.readouterr().err


def _job_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(120, 1, 12, 12, generator=g)
    z = torch.nn.functional.avg_pool2d(x, 2).repeat(1, 3, 1, 1)
    return JobInputs(x_aux=x[:90], x_eval=x[90:], acts={"none": Activations(aux=z[:90], eval=z[90:]),
                                                         "noise:sigma=1,kind=gaussian": Activations(aux=z[:90], eval=z[90:])},
                     fitted={"noise:sigma=1,kind=gaussian": make_defense("noise:sigma=1").fit(z[:90])})


def test_a_refinement_trains_exactly_its_budget_from_the_base():
    inputs = _job_data()
    base = run_job(JobSpec(cut="c", attack="decoder", defense="none", kind="fit", profile="standard", seed=0), inputs)
    spec = JobSpec(cut="c", attack="decoder", defense="none", kind="refine", profile="standard", seed=0, epochs=2, score=("none",))
    refined = run_job(spec, JobInputs(**{**inputs.__dict__, "base_state": base.state}))
    assert refined.report["epochs"] == 2 and refined.report["restarts"] == 0  # no extension, no restart
    assert not any("resumed" in n for n in refined.report["notes"])


def test_the_adaptive_attacker_keeps_the_undefended_one_when_it_rebuilds_defended_aux_data_better():
    inputs = _job_data()
    fit = dict(cut="c", attack="decoder", kind="fit", profile="quick", seed=0)
    good = run_job(JobSpec(defense="none", **fit), inputs)
    noise = torch.rand(inputs.x_aux.shape, generator=torch.Generator().manual_seed(1))
    bad = run_job(JobSpec(defense="none", **fit), JobInputs(**{**inputs.__dict__, "x_aux": noise}))
    # Refining the useless decoder for one epoch on defended data cannot beat the good one: it is kept.
    spec = JobSpec(cut="c", attack="decoder", defense="noise:sigma=1,kind=gaussian", kind="refine", profile="quick", seed=0, epochs=1,
                   score=("noise:sigma=1,kind=gaussian",))
    out = run_job(spec, JobInputs(**{**inputs.__dict__, "base_state": bad.state, "candidate_state": good.state, "candidate_converged": False}))
    sel = out.report["selection"]
    assert sel["undefended_holdout_ssim"] > sel["refined_holdout_ssim"]
    assert any("kept the undefended attacker" in n for n in out.report["notes"])
    assert out.report["converged"] is False  # the kept attacker's own status travels with it
    assert torch.equal(out.state["net"]["head.3.weight"], good.state["net"]["head.3.weight"])


def test_full_resolution_decoding_for_an_activation_at_the_inputs_resolution():
    from splitaudit.attacks.image import InverseNet

    z = torch.randn(4, 6, 28, 28)
    half, full = InverseNet((6, 28, 28), (1, 28, 28), 32), InverseNet((6, 28, 28), (1, 28, 28), 32, full_res=True)
    assert (half.r, full.r) == (2, 1)
    assert half(z).shape == full(z).shape == (4, 1, 28, 28)
    assert InverseNet((16, 10, 10), (1, 28, 28), 32, full_res=True).r == 2  # coarser activations keep the cheap path


def test_an_interrupt_during_a_ray_run_cancels_its_tasks_and_keeps_finished_rows(npz, ray_runtime, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AuditInterrupted) as info:
        run_audit(_config(npz, out=str(out), executor="ray"), reporter=_InterruptAfter(4))
    result = info.value.result
    write(result, out)
    assert result.config["interrupted"] is True and result.config["executor"] == "ray"
    assert any(r.error == NOT_RUN for r in result.results)
    assert json.loads((out / "results.json").read_text())["config"]["interrupted"] is True


def test_white_box_jobs_in_parallel_do_not_disturb_the_driver_or_each_other(npz):
    # rmle runs the head in the jobs while the driver captures the next cut: each needs its own model.
    kw = dict(attacks=("rmle",), cuts=("stem", "block.conv", "block"), defenses=("none",))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = run_audit(_config(npz, workers=1, **kw))
        torch.set_num_threads(2)
        parallel = run_audit(_config(npz, workers=2, **kw))
    finally:
        torch.set_num_threads(threads)
    assert all(r.status != "failed" for r in parallel.results)
    assert _values(serial) == _values(parallel)


def test_a_running_white_box_job_stops_on_cancel():
    from splitaudit.cuts import capture
    from splitaudit.executors import JobCancelled, LocalExecutor
    from tests.tiny import build

    model = build().eval()
    x = torch.rand(64, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    z = capture(model, "stem", x)
    inputs = JobInputs(x_aux=x[:48], x_eval=x[48:], acts={"none": Activations(aux=z[:48], eval=z[48:])}, head=model)
    spec = JobSpec(cut="stem", attack="rmle", defense="none", kind="fit", profile="thorough", seed=0, score=("none",))
    with LocalExecutor(1) as ex:
        ex.cancel()  # Ctrl-C before the job's first progress callback: it must stop there, not run its budget
        handle = ex.submit(spec, inputs)
        with pytest.raises(JobCancelled):
            ex.outcome(handle)


def test_the_adaptive_selection_works_on_images_too_small_for_ssim():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 8, 8, generator=g)
    z = torch.nn.functional.avg_pool2d(x, 2).repeat(1, 3, 1, 1)
    acts = {"none": Activations(aux=z[:80], eval=z[80:]), "noise:sigma=1,kind=gaussian": Activations(aux=z[:80], eval=z[80:])}
    inputs = JobInputs(x_aux=x[:80], x_eval=x[80:], acts=acts, fitted={"noise:sigma=1,kind=gaussian": make_defense("noise:sigma=1").fit(z[:80])})
    base = run_job(JobSpec(cut="c", attack="decoder", defense="none", kind="fit", profile="quick", seed=0), inputs)
    spec = JobSpec(cut="c", attack="decoder", defense="noise:sigma=1,kind=gaussian", kind="refine", profile="quick", seed=0, epochs=1)
    out = run_job(spec, JobInputs(**{**inputs.__dict__, "base_state": base.state, "candidate_state": base.state}))
    assert set(out.report["selection"]) == {"refined_holdout_neg_mse", "undefended_holdout_neg_mse"}


def test_a_reporter_written_before_keep_still_works(npz):
    opened = []

    class Old(Reporter):
        def open(self, description, total=None):  # no `keep`
            opened.append(description)
            return Task()

    result = run_audit(_config(npz, cuts=("stem",), defenses=("none",), workers=1), reporter=Old())
    assert result.results and any(d.startswith("attack jobs") for d in opened)


def test_a_job_refuses_to_train_on_a_defense_it_was_given_no_transform_for():
    """A defended job without its fitted transform would silently train on clean activations."""
    inputs = _job_data()
    spec = JobSpec(cut="c", attack="decoder", defense="noise:sigma=1,kind=gaussian", kind="fit", profile="quick", seed=0)
    with pytest.raises(RuntimeError, match="no fitted transform"):
        run_job(spec, JobInputs(**{**inputs.__dict__, "fitted": {}}))
