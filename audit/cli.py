"""The ``splitaudit`` command. Each command turns flags into a config, calls one function, renders.

Errors the user can fix exit 2 with one ``error:`` line on stderr and no traceback; a breached gate
exits 1. Progress goes to stderr; tables to stdout; data to files.
"""

from __future__ import annotations

import json
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

try:  # typer >= 0.25 vendors click
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on top of click
    import click.exceptions as _cx
from splitaudit.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Privacy leakage auditor for split inference.")
out_console = Console()
err_console = Console(stderr=True)


class Profile(str, Enum):
    quick = "quick"
    standard = "standard"
    thorough = "thorough"


class AuxQueries(str, Enum):
    data = "data"
    noise = "noise"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


DEMO_DEFENSES = ("none", "noise:sigma=0.5", "noise:sigma=2", "dropout:p=0.5", "dpsgd:epsilon=8")
# The text demo: a real pretrained sentence encoder on synthetic records with planted PII, every cut.
TEXT_DEMO = dict(model="builtin:minilm", data="builtin:pii-text", defenses=("none", "noise:sigma=0.5", "noise:sigma=2"))


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["splitaudit", *sys.argv[1:]])


class Objective(str, Enum):
    latency = "latency"
    cost = "cost"
    leakage = "leakage"


PLAN_PROFILE_HELP = "deployment profile for the planning section: a preset (phone-4g, camera-wifi, iot-nbiot) or a TOML file"


def _load_plan_profile(ref: str | None):
    """Load (and so validate) a plan profile before any long work; None when not asked for."""
    if ref is None:
        return None
    from splitaudit.plan import load_profile

    return load_profile(ref)


def _with_plan(result, profile):
    """``result`` with the plan for ``profile`` under its extra top-level key ``plan``."""
    from dataclasses import replace

    from splitaudit.plan import make_plan

    return replace(result, plan=make_plan(result, profile).to_dict())


# Options `demo` and `audit` share.
ProfileOpt = Annotated[Profile, typer.Option(help="attack budget")]
DeviceOpt = Annotated[Device, typer.Option(help="where tensors live")]
SeedOpt = Annotated[int, typer.Option()]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="recompute everything")]
CacheDirOpt = Annotated[Optional[Path], typer.Option(help="cache location (default ~/.cache/splitaudit)")]
ExecutorOpt = Annotated[ExecutorName, typer.Option(help="where attack jobs run: threads here, or a Ray cluster")]
WorkersOpt = Annotated[int, typer.Option(help="parallel attack jobs (local), or CPUs of a Ray runtime started here; 0: auto")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="an existing Ray cluster (ray://host:10001 or auto); default: start one here")]
PlanProfileOpt = Annotated[Optional[str], typer.Option(help=PLAN_PROFILE_HELP)]
OutputOpt = Annotated[Optional[str], typer.Option("--output", help="the tensor of the model's output that accuracy uses: an index or "
                                                  "key path (2, logits, 0.pred); default: the first tensor")]
InputNormOpt = Annotated[Optional[str], typer.Option("--input-norm", help="MEAN,STD between the data and the model, each a number or one "
                                                     "per channel joined by '/'; reconstructions stay in the data's space")]


def _run_options(profile, device, seed, out, no_cache, cache_dir, executor, workers, ray_address) -> dict:
    """The AuditConfig fields that `demo` and `audit` fill from the same options."""
    return dict(
        profile=profile.value, device=device.value, seed=seed, out=str(out), use_cache=not no_cache,
        cache_dir=str(cache_dir) if cache_dir else None, command=_command_line(), executor=executor.value, workers=workers,
        ray_address=ray_address,
    )


def _run(config):
    """The audit of ``config`` with progress bars on stderr; on Ctrl-C, what finished is written and the
    command exits 130."""
    from splitaudit.progress import RichReporter
    from splitaudit.report.console import print_audit
    from splitaudit.runner import AuditInterrupted, run_audit
    from splitaudit.writer import write

    try:
        with RichReporter(err_console) as reporter:
            return run_audit(config, reporter=reporter)
    except AuditInterrupted as exc:
        where = ""
        if config.out:
            write(exc.result, config.out)
            where = f": the finished rows are in {Path(config.out) / 'results.json'}"
        print_audit(exc.result, out_console)
        err_console.print(f"error: interrupted{where}; rerun to finish (finished attacks are cached)", markup=False)
        raise typer.Exit(130) from None


def _run_and_render(config, plan_profile: str | None = None) -> None:
    from splitaudit.report.console import print_audit
    from splitaudit.writer import write

    profile = _load_plan_profile(plan_profile)  # validated before the long work
    result = _run(config)
    if profile is not None:
        result = _with_plan(result, profile)
    if config.out:
        write(result, config.out)
    print_audit(result, out_console)
    if profile is not None:
        rec = result.plan["recommendation"]
        out_console.print(f"where to cut ({profile.name}): {rec['text']}", markup=False, highlight=False, soft_wrap=True)
    if config.out:
        out_console.print(f"wrote {Path(config.out) / 'results.json'} and {Path(config.out) / 'report.html'}")


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option(help="output folder [default: splitaudit-demo, splitaudit-demo-text with --text]")] = None,
    text: Annotated[bool, typer.Option("--text", help="the text audit: builtin:minilm on builtin:pii-text (needs splitaudit[text])")] = False,
    profile: ProfileOpt = Profile.standard,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = 0,
    no_cache: NoCacheOpt = False,
    cache_dir: CacheDirOpt = None,
    executor: ExecutorOpt = ExecutorName.local,
    workers: WorkersOpt = 0,
    ray_address: RayAddressOpt = None,
    plan_profile: PlanProfileOpt = None,
) -> None:
    """Audit builtin:lenet on builtin:mnist (with --text: builtin:minilm on builtin:pii-text) at every cut
    with the default defenses."""
    from splitaudit.runner import AuditConfig

    job = TEXT_DEMO if text else dict(model="builtin:lenet", data="builtin:mnist", defenses=DEMO_DEFENSES)
    out = out or Path("splitaudit-demo-text" if text else "splitaudit-demo")
    _run_and_render(
        AuditConfig(
            **job,
            **_run_options(profile, device, seed, out, no_cache, cache_dir, executor, workers, ray_address),
        ),
        plan_profile,
    )


@app.command()
def audit(
    model: Annotated[str, typer.Option(help="builtin:NAME, file.py:callable or module:callable")],
    data: Annotated[str, typer.Option(help="builtin:NAME, a .npz file or a folder of images")],
    weights: Annotated[Optional[Path], typer.Option(help="state dict, loaded with weights_only=True")] = None,
    cut: Annotated[Optional[list[str]], typer.Option("--cut", help="module name; repeat; default every candidate")] = None,
    defense: Annotated[Optional[list[str]], typer.Option("--defense", help="NAME[:key=value,...]; repeat; default none")] = None,
    attack: Annotated[Optional[list[str]], typer.Option("--attack", help="attack name: decoder; white-box: rmle, hybrid (images), whitebox (text); repeat; default decoder")] = None,
    profile: ProfileOpt = Profile.standard,
    device: DeviceOpt = Device.auto,
    seed: SeedOpt = 0,
    threshold: Annotated[float, typer.Option(help="headline metric (SSIM; token accuracy for text) at or below which inputs count as not recognizable")] = 0.3,
    reid_threshold: Annotated[float, typer.Option(help="re-identified share above which a pair is recognizable, whatever its SSIM")] = 0.05,
    output: OutputOpt = None,
    input_norm: InputNormOpt = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("splitaudit-out"),
    no_cache: NoCacheOpt = False,
    cache_dir: CacheDirOpt = None,
    aux_data: Annotated[Optional[str], typer.Option(help="the attacker's own data (another distribution), a data spec")] = None,
    aux_queries: Annotated[AuxQueries, typer.Option(help="query the head with aux images, or with random noise only")] = AuxQueries.data,
    executor: ExecutorOpt = ExecutorName.local,
    workers: WorkersOpt = 0,
    ray_address: RayAddressOpt = None,
    plan_profile: PlanProfileOpt = None,
) -> None:
    """Audit a model at every (or the given) cut: leakage, costs, defenses."""
    from splitaudit.runner import AuditConfig

    _run_and_render(
        AuditConfig(
            model=model, data=data, weights=str(weights) if weights else None, cuts=tuple(cut or ()), defenses=tuple(defense or ("none",)),
            attacks=tuple(attack or ("decoder",)), threshold=threshold, reid_threshold=reid_threshold, output=output, input_norm=input_norm,
            aux_data=aux_data, aux_queries=aux_queries.value,
            **_run_options(profile, device, seed, out, no_cache, cache_dir, executor, workers, ray_address),
        ),
        plan_profile,
    )


@app.command()
def cuts(
    model: Annotated[str, typer.Option(help="builtin:NAME, file.py:callable or module:callable")],
    weights: Annotated[Optional[Path], typer.Option(help="state dict, loaded with weights_only=True")] = None,
    data: Annotated[Optional[str], typer.Option(help="data spec, for the input shape")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="C,H,W instead of --data")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    output: OutputOpt = None,
    input_norm: InputNormOpt = None,
) -> None:
    """List the candidate cut points: shape, bytes per sample, head FLOPs and latency."""
    from splitaudit.report.console import cuts_table
    from splitaudit.runner import list_cuts

    shape = None
    if input_shape is not None:
        try:
            shape = tuple(int(v) for v in input_shape.split(","))
        except ValueError:
            raise UserError(f"--input-shape must be C,H,W integers, got {input_shape!r}") from None
    rows = list_cuts(model, weights=str(weights) if weights else None, data=data, input_shape=shape, output=output, input_norm=input_norm)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        out_console.print(cuts_table(rows, title=f"candidate cuts of {model}", compact=out_console.width < 140))


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results.json of an audit")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="HTML file (default: report.html beside results)")] = None,
    plan_profile: Annotated[Optional[str], typer.Option(help=PLAN_PROFILE_HELP + "; results.json is not changed")] = None,
) -> None:
    """Render the HTML report again from saved results."""
    from splitaudit.report.html import write_report
    from splitaudit.results import AuditResult

    profile = _load_plan_profile(plan_profile)
    result = AuditResult.load(results)
    if profile is not None:
        result = _with_plan(result, profile)
    target = output or results.parent / "report.html"
    write_report(result, target, base=results.parent)
    out_console.print(f"wrote {target}")


@app.command()
def plan(
    results: Annotated[Path, typer.Argument(help="results.json of an audit")],
    profile: Annotated[Optional[str], typer.Option(help="a preset (phone-4g, camera-wifi, iot-nbiot) or a TOML file; default phone-4g")] = None,
    bandwidth: Annotated[Optional[float], typer.Option(help="uplink Mbit/s, instead of the profile's")] = None,
    rtt: Annotated[Optional[float], typer.Option(help="round-trip time in ms, instead of the profile's")] = None,
    max_ssim: Annotated[Optional[float], typer.Option(help="leakage limit (default: the audit's threshold)")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(help="end-to-end latency limit, ms")] = None,
    max_cost: Annotated[Optional[float], typer.Option(help="cost limit per million inferences, in the profile's currency")] = None,
    min_accuracy: Annotated[Optional[float], typer.Option(help="accuracy floor, 0-1")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="accuracy loss limit vs the undefended model, 0-1 (default 0.01)")] = None,
    objective: Annotated[Objective, typer.Option(help="what the recommendation minimizes among the placements that meet the limits")]
    = Objective.latency,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    show_all: Annotated[bool, typer.Option("--all", help="list every candidate, not only the Pareto front")] = False,
) -> None:
    """Where to cut: latency, cost, leakage and accuracy of every placement for a deployment; exit 1 when no placement meets the limits."""
    from splitaudit.plan import constraints_from_flags, load_profile, make_plan
    from splitaudit.report.console import print_plan
    from splitaudit.results import AuditResult, _jsonable

    prof = load_profile(profile).with_link(bandwidth=bandwidth, rtt=rtt)
    flags = constraints_from_flags(max_ssim=max_ssim, max_latency_ms=max_latency_ms, max_cost=max_cost, min_accuracy=min_accuracy,
                                   max_accuracy_drop=max_accuracy_drop)
    result = AuditResult.load(results)
    p = make_plan(result, prof, flags=flags, objective=objective.value)
    if as_json:
        print(json.dumps(_jsonable(p.to_dict()), indent=2, allow_nan=False))
    else:
        print_plan(p, out_console, show_all=show_all)
    if not p.met and p.explicit_limits:
        raise typer.Exit(1)


@app.command()
def gate(
    config: Annotated[Optional[Path], typer.Option("--config", help="splitaudit.toml, or a pyproject.toml with a tool.splitaudit table "
                                                   "(default: ./splitaudit.toml, else ./pyproject.toml)")] = None,
    results: Annotated[Optional[Path], typer.Option("--results", help="judge this results.json instead of running the audit")] = None,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="results.json to compare against (regression limits)")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="write a JUnit XML file, one testcase per check")] = None,
    no_cache: NoCacheOpt = False,
    cache_dir: CacheDirOpt = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="where the audit writes its results and images (default ./splitaudit-gate)")] = None,
    summary: Annotated[Optional[Path], typer.Option("--summary", help="append a Markdown summary (verdicts, failed checks) to FILE, "
                                                    "e.g. $GITHUB_STEP_SUMMARY")] = None,
) -> None:
    """Check thresholds: exit 0 when every check passes, 1 when any fails, 2 on bad config or input."""
    from splitaudit.gate import DEFAULT_OUT, append_summary, evaluate, load_gate_config, print_report, write_junit
    from splitaudit.results import AuditResult
    from splitaudit.writer import write

    gc = load_gate_config(config)
    base_path = baseline or (Path(gc.baseline) if gc.baseline else None)
    base_result = AuditResult.load(base_path) if base_path else None  # fail fast, before a long audit
    if results is not None:
        result, images_base = AuditResult.load(results), results.parent
    else:
        images_base = out or (Path(gc.out) if gc.out else Path(DEFAULT_OUT))
        result = _run(gc.audit_config(use_cache=not no_cache, cache_dir=str(cache_dir) if cache_dir else None, out=str(images_base),
                                      command=_command_line()))
        write(result, images_base)
    report = evaluate(result, gc, base_result, base=images_base)
    print_report(report, out_console)
    if junit is not None:
        write_junit(report, junit)
    if summary is not None:
        append_summary(report, result, summary)
    if not report.passed:
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point: map our errors and click's usage errors to exit 2 with a single ``error:`` line."""
    try:
        return app(args=argv, standalone_mode=False) or 0  # non-standalone typer returns typer.Exit(code)'s code
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except _cx.UsageError as exc:
        err_console.print(f"error: {exc.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except typer.Abort:
        err_console.print("error: interrupted", markup=False)
        return 130
    except KeyboardInterrupt:
        err_console.print("error: interrupted", markup=False)
        return 130


def keep_freed_memory() -> None:
    """Tell glibc's allocator to keep what the process frees instead of handing it back to the kernel at once.

    A training step frees its activations and the next one allocates them again: by default glibc returns
    freed memory above 128 KiB at the top of its heap (and every block it got by mmap) to the kernel, and the
    next step faults it back in page by page. Measured here: a third of a full-resolution conv decoder's step
    (26 ms down to 13-15 ms), and the text inverter's system time halved (2.3 s to 1.0 s a fit). Process-wide,
    so it is set once, at the console script's entry; where glibc is not the C library, nothing changes."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_mmap_threshold, 1 << 30)


def entry() -> None:
    """The console script: exit with :func:`main`'s code through ``sys.exit``, so the interpreter's
    normal shutdown runs (exit handlers, flushing, joining threads). After an error or Ctrl-C a
    defense's fine-tuning thread has been told to stop and ends at its next epoch; the process waits
    for it."""
    keep_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    entry()
