"""The loop that runs the job graph: each cut's jobs (:func:`splitaudit.jobs.plan_cut`) through an executor.

A few cuts are in flight at once (enough to keep every worker busy, few enough for memory): a cut's
activations are captured just before its jobs are submitted and released when its last job ends. A
job waits for the one it refines (and an adaptive job for the undefended one, its other candidate);
one that needs a model a defense is still fine-tuning is held back while the workers take the next
cut's base fits instead of idling. Between polls the driver does the work that need not wait for a
quiet machine: each cut's utility, measured while the jobs of other cuts train.

The training budget of an attack that can be extended (``budgeted``) is kept in a ledger per attack
(:mod:`splitaudit.ledger`): each base fit's outcome is recorded when it ends, and a cut's ``extend`` job
is submitted with the epochs granted to it, once the cuts before it have their outcomes (a grant depends
on those and on nothing else, so the order and timing of jobs change no number). A cut waiting for its
grant is, like one waiting for a fine-tuning, left out of the cuts in flight: the workers take the next
cut's base fit. An extension with nothing granted (the base had flattened) is not run: its base is passed
on as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from splitaudit import cache_keys as keys
from splitaudit.activations import ActivationStore
from splitaudit.attacks.base import ATTACKS
from splitaudit.attacks.training import train
from splitaudit.costs import UtilityMeter
from splitaudit.defenses.base import Defense, Fitted
from splitaudit.errors import UserError
from splitaudit.jobs import Activations, JobInputs, JobOutput, JobSpec, PlannedJob, plan_cut
from splitaudit.ledger import Ledger, Outcome
from splitaudit.prepared import PreparedModels, error_text
from splitaudit.progress import open_task

NOT_RUN = "not run: the audit was interrupted"
MAX_CUTS_IN_FLIGHT = 8


class Scheduler:
    """Runs every cut's jobs and keeps their outputs; ``on_cut_done(cut)`` is called when a cut's last
    job (and its utility) has ended, so its rows can be built while other cuts train."""

    def __init__(self, scenario, executor, prepared: PreparedModels, store: ActivationStore, utility: UtilityMeter, cache, reporter,
                 phase, on_cut_done: Callable[[str], None] | None = None, judge=None):
        self.s, self.ex, self.prepared, self.store, self.utility = scenario, executor, prepared, store, utility
        self.judge = judge
        self.cache, self.reporter, self.phase, self.on_cut_done = cache, reporter, phase, on_cut_done
        self.outputs: dict[str, JobOutput | BaseException] = {}
        self.jobs: dict[tuple[str, str, str], JobSpec] = {}  # (cut, attack, role) -> spec
        self.fitted: dict[tuple[str, str], Fitted] = {}  # (cut, defense spec) -> its transform there
        self.threads_per_job = executor.threads_per_job
        self._graph: dict[str, list[PlannedJob]] = {}
        self._keys: dict[str, str] = {}  # job id -> cache key
        self._handles: dict[Any, JobSpec] = {}
        self._tasks: dict[str, Any] = {}
        self._waiting: dict[str, list[JobSpec]] = {}  # job id -> the jobs waiting for it
        self._inputs: dict[str, dict] = {}  # cut -> shared inputs while its jobs run
        self._open: dict[str, int] = {}  # cut -> pieces (jobs and its utility) not finished
        self._deferred: list[tuple[JobSpec, Any]] = []  # (job, the output it waited for) held back for a fine-tuning
        self._todo: list[tuple[str, list[Defense]]] = []  # (cut, defenses) whose utility is still to measure
        self._overall: Any = None
        self.ledgers: dict[str, Ledger | None] = {}  # attack -> its budget across cuts (None: that attack has none)
        self._parked: dict[str, tuple[JobSpec, Any]] = {}  # extend job id -> (its spec, its base's output), awaiting a grant
        self._state_keys: dict[str, str] = {}  # job id -> the cache key of the fitted state it produced (or passed on)

    # -- the graph --
    def plan(self, cut: str) -> list[PlannedJob]:
        """The jobs of ``cut``, registered in ``jobs`` (not submitted)."""
        if cut not in self._graph:
            s = self.s
            self._graph[cut] = plan_cut(cut, attacks=s.config.attacks, defenses=s.defenses, profile=s.config.profile,
                                        seed=s.config.seed, device=str(s.device), modality=s.modality.name,
                                        adaptive_epochs=s.modality.adaptive_epochs(s.config.profile, s.settings["adaptive_epochs"]) or None)
            for job in self._graph[cut]:
                self.jobs.setdefault((cut, job.spec.attack, job.role), job.spec)
        return self._graph[cut]

    def _model(self, defense_spec: str, cut: str):
        return self.prepared.get(self.s.defense(defense_spec), cut)

    def _cache_key(self, spec: JobSpec, has_candidate: bool, start: str | None = None) -> str:
        s = self.s
        return keys.attack_job(cut=spec.cut, attack=spec.attack, defense=spec.defense, kind=spec.kind, profile=spec.profile,
                               seed=spec.seed, epochs=spec.epochs, has_candidate=has_candidate, start=start,
                               trained_model=self._model(spec.defense, spec.cut)[1], victim=s.model_hash, data_hash=s.data_hash,
                               aux_key=s.aux_key, code=keys.code_of(ATTACKS[spec.attack], type(s.modality), train, type(s.defense(spec.defense))))

    # -- the budget --
    def ledger(self, attack: str) -> Ledger | None:
        """The ledger of ``attack`` across the audit's cuts, made when first needed (None: its budget is fixed)."""
        if attack not in self.ledgers:
            s = self.s
            instance = ATTACKS[attack](profile=s.config.profile)
            terms = instance.allotment(s.modality) if ATTACKS[attack].budgeted else None
            ledger = None
            if terms is not None:
                cuts = [c.name for c in s.cuts]
                flops = {c.name: self._epoch_flops(instance, tuple(c.shape)) for c in s.cuts}
                unit = "training FLOPs"
                if any(f is None for f in flops.values()):  # not countable: every epoch costs the same
                    flops, unit = dict.fromkeys(cuts, 1.0), "epochs"
                ledger = Ledger(cuts, flops, nominal_epochs=terms[0], cap=terms[1], unit=unit)
            self.ledgers[attack] = ledger
        return self.ledgers[attack]

    def _epoch_flops(self, attack, act_shape: tuple[int, ...]) -> float | None:
        """``attack.epoch_flops`` at an activation of ``act_shape``, from the cache when an audit counted it."""
        s = self.s
        key = keys.attack_flops(attack=attack.name, profile=s.config.profile, modality=s.modality.name, act_shape=act_shape,
                                inputs=tuple(s.x_aux.shape), code=keys.code_of(type(attack), type(s.modality)))
        hit = self.cache.get("flops", key)
        if hit is not None:
            return hit["flops"]
        flops = attack.epoch_flops(act_shape, s.x_aux, s.modality)
        if flops is not None:
            self.cache.put("flops", key, {"flops": flops})
        return flops

    def budget_summary(self) -> dict[str, Any]:
        """Each ledgered attack's ledger (for the result's config)."""
        return {a: ledger.summary() for a, ledger in self.ledgers.items() if ledger is not None}

    def _record_base(self, spec: JobSpec, out) -> None:
        ledger = self.ledger(spec.attack)
        if ledger is None:
            return
        if isinstance(out, JobOutput):
            stop = out.report.get("stop") or "budget"
            outcome = Outcome(epochs=int(out.report.get("epochs", 0)), improving=stop == "budget", stop=stop)
        else:
            outcome = Outcome(epochs=0, improving=False, stop="failed")
        ledger.record(spec.cut, outcome)

    # -- running --
    def run(self) -> None:
        s = self.s
        window = max(2, min(self.ex.workers + 1, MAX_CUTS_IN_FLIGHT))
        n_jobs = sum(len(self.plan(c.name)) for c in s.cuts)
        self._overall = open_task(self.reporter, f"attack jobs ({len(s.cuts)} cuts)", n_jobs, keep=True)
        for cut in s.cuts:
            # A cut whose next jobs wait for a fine-tuned model or for its grant does not count: the workers
            # take the next cut's base fit meanwhile instead of idling.
            while len(self._open) - len(self._held_cuts()) >= window or len(self._open) >= MAX_CUTS_IN_FLIGHT:
                self._pump()
            self._start_cut(cut.name)
        while self._handles or self._deferred or self._todo or self._parked:
            self._pump()
        self._overall.close()

    def _held_cuts(self) -> set[str]:
        return {d.cut for d, _ in self._deferred} | {d.cut for d, _ in self._parked.values()}

    def _start_cut(self, cut: str) -> None:
        s = self.s
        self._inputs[cut] = {"x_aux": self.ex.put("x_aux", s.x_aux), "x_eval": self.ex.put("x_eval", s.x_eval), "acts": {},
                             "judge": None if self.judge is None else self.ex.put(("judge",), self.judge.model),
                             "judge_features": None if self.judge is None else self.ex.put("judge_features", self.judge.eval_features),
                             "y_eval": None if s.y_eval is None else self.ex.put("y_eval", s.y_eval),
                             "prior": self.ex.put("prior_scores", s.baseline[s.modality.headline])}
        # The activations of changed models are added when a job first needs them (after the base fit,
        # by when their fine-tuning has usually finished).
        early = [d for d in s.defenses if not d.changes_model]
        self._add_acts(cut, early)
        graph = self.plan(cut)
        self._open[cut] = len(graph) + 1  # and one for its utilities, measured in _pump
        for job in graph:
            if job.after is None:
                self._submit_dep(job.spec, None)
            else:
                after = self.jobs[(cut, job.after_attack or job.spec.attack, job.after)]
                self._waiting.setdefault(after.id, []).append(job.spec)
        self._todo.append((cut, early))  # measured in a pump of its own (the next cuts' first jobs go out first)

    def _add_acts(self, cut: str, defenses: list[Defense]) -> None:
        """Capture what each defense's model sends at ``cut`` (once per model), fit the defense there, and
        share both with the jobs."""
        inp = self._inputs[cut]
        by_model = inp.setdefault("by_model", {})  # model hash -> (its activations, their shared reference)
        for d in defenses:
            model_d, hash_d, _ = self.prepared.get(d, cut)
            if hash_d not in by_model:
                with self.phase("capture"):
                    z_aux, z_eval = self.store.get(model_d, hash_d, cut)
                acts = Activations(aux=z_aux, eval=z_eval)
                by_model[hash_d] = (acts, self.ex.put(("acts", cut, hash_d), acts))
            inp["acts"][d.spec] = by_model[hash_d][1]
            if d.transforms_activation:  # fitted once, on the activations of the model it runs with
                self.fitted[(cut, d.spec)] = d.fit(self.s.modality.sent(by_model[hash_d][0].aux, self.s.x_aux))

    def _measure_utility(self, cut: str, ds: list[Defense]) -> None:
        with self.phase("utility"):
            todo = []
            for d in ds:
                model_d, hash_d, _ = self.prepared.get(d, cut)
                todo.append((d, model_d, hash_d, self.fitted.get((cut, d.spec)), self._inputs[cut]["by_model"][hash_d][0].eval))
            self.utility.measure(cut, todo)

    def _submit(self, spec: JobSpec, base_state: dict | None = None, candidate: JobOutput | None = None,
                start: JobOutput | None = None, start_key: str | None = None) -> None:
        s = self.s
        inp = self._inputs[spec.cut]
        # A changed model whose fine-tuning failed is not scored on: its rows carry that error, and
        # the other rows of this job keep their numbers.
        score = tuple(d for d in spec.score if d == spec.defense or self.prepared.error(s.defense(d), spec.cut) is None)
        if score != spec.score:
            spec = replace(spec, score=score)
        missing = [s.defense(d) for d in dict.fromkeys((spec.defense, *spec.score)) if d not in inp["acts"]]
        if missing:  # a changed model's activations (not pumping: this may run inside _pump)
            self._add_acts(spec.cut, missing)
            self._measure_utility(spec.cut, missing)
        self._keys[spec.id] = key = self._cache_key(spec, candidate is not None, start_key)
        hit = self.cache.get("attacks", key)
        used = {spec.defense, *spec.score}
        head = None
        if ATTACKS[spec.attack].white_box:
            head = self.ex.put(("model", spec.cut, spec.defense, spec.attack), self._model(spec.defense, spec.cut)[0])
        inputs = JobInputs(
            x_aux=inp["x_aux"], x_eval=inp["x_eval"], acts={d: inp["acts"][d] for d in used},
            fitted={d: self.fitted[(spec.cut, d)] for d in used if (spec.cut, d) in self.fitted}, head=head,
            base_state=None if base_state is None else self.ex.put(("base", spec.cut, spec.attack), base_state),
            candidate_state=None if candidate is None else self.ex.put(("clean", spec.cut, spec.attack), candidate.state),
            candidate_converged=True if candidate is None else bool(candidate.report.get("converged", True)), cached=hit,
            start_state=None if start is None else self.ex.put(("start", spec.cut, spec.attack, spec.defense), start.state),
            start_converged=True if start is None else bool(start.report.get("converged", True)),
            judge=inp["judge"], judge_features=inp["judge_features"], y_eval=inp["y_eval"], prior_scores=inp["prior"],
        )
        self._tasks[spec.id] = self.reporter.open(spec.label + (" (cached)" if hit else ""))
        self._handles[self.ex.submit(spec, inputs)] = spec

    def _pump(self, timeout: float = 0.2) -> None:
        self.prepared.raise_user_error()
        if self._parked:
            self._grant_parked(final=not (self._handles or self._deferred or self._todo))
        if self._todo:
            cut, ds = self._todo.pop(0)
            self._measure_utility(cut, ds)
            self._closed_one(cut)  # the cut's utilities
            timeout = 0
        if self._deferred:
            # Submit what a fine-tuning held back, once it has ended (or now, if nothing else runs).
            waiting, self._deferred = self._deferred, []
            for dep, out in waiting:
                self._submit_dep(dep, out, wait=not self._handles)
        if not self._handles:
            return
        with self.phase("attacks"):
            done = self.ex.wait(list(self._handles), timeout=timeout)
        for job_id, ep, total in self.ex.progress():
            if job_id in self._tasks:
                self._tasks[job_id].update(ep, total=total)
        for h in done:
            spec = self._handles.pop(h)
            try:
                out: JobOutput | BaseException = self.ex.outcome(h)
            except Exception as exc:  # noqa: BLE001 - reported in the result, counted as failed by the gate
                # Even the user's model failing inside a job is that job's failure: its row shows the
                # error and the other cells of the grid still get their numbers.
                out = exc
            self._finish(spec, out)

    def _finish(self, spec: JobSpec, out) -> None:
        self.outputs[spec.id] = out
        task = self._tasks.pop(spec.id, None)  # a job failed before it was submitted has none
        if task is not None:
            task.close()
        if self._overall is not None:
            self._overall.advance()
        if isinstance(out, JobOutput) and out.state is not None and not out.report.get("cached") and not out.report.get("passed_on"):
            self.cache.put("attacks", self._keys[spec.id], {"state": out.state, "report": out.report})
        if spec.id in self._keys and spec.id not in self._state_keys:
            self._state_keys[spec.id] = self._keys[spec.id]
        if spec.ledgered:
            self._record_base(spec, out)
        elif spec.kind == "extend" and (ledger := self.ledger(spec.attack)) is not None and isinstance(out, JobOutput):
            ledger.record_extension(spec.cut, int(out.report.get("epochs", 0)), out.report.get("stop") or "budget")
        for dep in self._waiting.pop(spec.id, []):
            self._submit_dep(dep, out)
        if spec.ledgered and self._parked:
            self._grant_parked()
        self._closed_one(spec.cut)

    # -- extensions --
    def _extend(self, dep: JobSpec, base) -> None:
        """Submit the extension ``dep`` of the base fit ``base`` with the epochs granted to it, pass the base on
        as it is when nothing was granted, or park it until the cuts before it have their outcomes."""
        if not (isinstance(base, JobOutput) and base.state is not None):
            self._finish(dep, RuntimeError(f"its base attack failed: {error_text(base)}"))
            return
        ledger = self.ledger(dep.attack)
        asks = ledger is not None and (base.report.get("stop") or "budget") == "budget"  # still improving: it asks for more
        grant = ledger.grant(dep.cut) if asks else None
        if asks and grant is None:
            self._parked[dep.id] = (dep, base)
            return
        base_id = self.jobs[(dep.cut, dep.attack, "base")].id
        if grant is None or grant.epochs == 0:  # a base that flattened needs no grant, nor to wait for one
            reason = grant.reason if grant is not None else base.report.get("stop") or "not ledgered"
            report = {"converged": bool(base.report.get("converged", True)), "epochs": 0, "seconds": 0.0, "restarts": 0,
                      "stop": f"not extended: {reason}", "grant_epochs": 0, "passed_on": True, "notes": []}
            self._state_keys[dep.id] = self._state_keys.get(base_id) or self._keys.get(base_id, "")
            self._finish(dep, JobOutput(spec=dep, report=report, state=base.state))
            return
        spec = replace(dep, epochs=grant.epochs)
        self.jobs[(dep.cut, dep.attack, "extend")] = spec  # the same id: the grant is its budget, not its identity
        try:
            self._submit(spec, base_state=base.state, start_key=self._state_keys.get(base_id))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - that job's failure
            self._finish(spec, exc)

    def _grant_parked(self, final: bool = False) -> None:
        """Submit the parked extensions whose grants can now be decided (in cut order). ``final``: nothing else
        can record an outcome any more, so one still undecided is a failure, never a wait forever."""
        order = {c.name: i for i, c in enumerate(self.s.cuts)}
        for job_id, (dep, base) in sorted(self._parked.items(), key=lambda kv: order.get(kv[1][0].cut, 0)):
            ledger = self.ledger(dep.attack)
            if ledger.grant(dep.cut) is not None:
                del self._parked[job_id]
                self._extend(dep, base)
            elif final:
                del self._parked[job_id]
                self._finish(dep, RuntimeError("no grant: a cut before it never finished its base fit"))

    def _submit_dep(self, dep: JobSpec, out, wait: bool = False) -> None:
        """Submit ``dep``, which waited for ``out`` (None: for nothing); held back (unless ``wait``)
        while a model it needs is being fine-tuned."""
        base_state = None
        source = ATTACKS[dep.attack].starts_from
        starts = source in self.s.config.attacks and source != dep.attack  # it waited for that attack's job of its defense
        if starts and not (isinstance(out, JobOutput) and out.state is not None):
            self._finish(dep, RuntimeError(f"the {source} it starts from failed: {error_text(out)}"))
            return
        if dep.kind == "extend":
            self._extend(dep, out)
            return
        start_key = None
        if dep.kind == "refine":
            # From the base fit as its extension left it (the same start for every refinement of the cut).
            role = "extend" if (dep.cut, dep.attack, "extend") in self.jobs else "base"
            start_id = self.jobs[(dep.cut, dep.attack, role)].id
            base = self.outputs.get(start_id)
            if not (isinstance(base, JobOutput) and base.state is not None):
                self._finish(dep, RuntimeError(f"its base attack failed: {error_text(base)}"))
                return
            base_state, start_key = base.state, self._state_keys.get(start_id)
        if not wait and any(not self.prepared.done(self.s.defense(d), dep.cut) for d in (dep.defense, *dep.score) if d != "none"):
            self._deferred.append((dep, out))
            return
        try:
            # What it waited for is a start (``starts_from``), or its other candidate: the undefended attacker for
            # an adaptive one; for the undefended refinement, its start (the base fit), so that its extra epoch can
            # never make it worse than what it started from.
            candidate = out if not starts and isinstance(out, JobOutput) and (dep.defense != "none" or dep.kind == "refine") else None
            self._submit(dep, base_state=base_state, candidate=candidate, start=out if starts else None, start_key=start_key)
        except UserError:
            raise  # a defense that cannot change this model (found while fine-tuning): bad input, exit 2
        except Exception as exc:  # noqa: BLE001 - e.g. the object store is full: that job's failure
            self._finish(dep, exc)

    def _closed_one(self, cut: str) -> None:
        """One more piece of ``cut`` (a job, or its utility) is done; after the last, its rows can be built."""
        self._open[cut] -= 1
        if self._open[cut] == 0:  # the cut's shared inputs are no longer needed
            del self._open[cut], self._inputs[cut]
            self.ex.release(cut)
            if self.on_cut_done is not None:
                self.on_cut_done(cut)

    # -- what the rows read --
    def output(self, cut: str, attack: str, role: str) -> tuple[JobOutput | None, dict]:
        """A row's attack output and its training report (a refinement's merged with its base's)."""
        spec = self.jobs.get((cut, attack, role))
        if spec is None or spec.id not in self.outputs:
            return None, {"converged": False, "error": NOT_RUN}
        out = self.outputs[spec.id]
        if not isinstance(out, JobOutput):
            return None, {"converged": False, "error": error_text(out)}
        report = out.report
        if spec.kind == "refine":
            phases = {}
            for role in ("base", "extend"):
                before = self.jobs.get((cut, attack, role))
                if before is not None and isinstance(self.outputs.get(before.id), JobOutput):
                    phases[role] = self.outputs[before.id].report
            ledger = self.ledgers.get(attack)
            report = merge_reports(phases, report, nominal_epochs=ledger.nominal_epochs if ledger is not None else None)
        return out, report


def _phase(report: dict) -> dict:
    """What one phase of a training spent and why it stopped."""
    keep = ("epochs", "seconds", "restarts", "stop", "grant_epochs", "cached")
    return {k: report[k] for k in keep if k in report}


def merge_reports(phases: dict[str, dict], refine: dict, *, nominal_epochs: int | None = None) -> dict:
    """The report of a base fit, its extension (``phases``: role -> report) and a refinement, as one training:
    epochs, seconds and restarts summed, notes joined, and per phase what it spent and why it stopped
    (``phases``); ``stop`` is why the learning before the refinement ended (the extension's, else the base's)."""
    if "error" in refine:
        return refine
    before = [phases[r] for r in ("base", "extend") if r in phases]
    out = dict(refine)
    out["epochs"] = sum(p.get("epochs", 0) for p in before) + refine.get("epochs", 0)
    out["seconds"] = round(sum(p.get("seconds", 0) for p in before) + refine.get("seconds", 0), 2)
    out["restarts"] = sum(p.get("restarts", 0) for p in before) + refine.get("restarts", 0)
    out["notes"] = [n for p in before for n in p.get("notes", [])] + list(refine.get("notes", []))
    out["converged"] = bool(refine.get("converged", True))  # the refinement picks up where the base ended
    out["phases"] = {**{r: _phase(phases[r]) for r in ("base", "extend") if r in phases}, "refine": _phase(refine)}
    ext = phases.get("extend")
    out["stop"] = ext["stop"] if ext is not None and ext.get("epochs") else (phases.get("base") or {}).get("stop")
    if ext is not None:
        out["grant_epochs"] = ext.get("grant_epochs", ext.get("epochs", 0))
    if nominal_epochs is not None:
        out["nominal_epochs"] = nominal_epochs
    return out
