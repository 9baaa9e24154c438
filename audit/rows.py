"""Scoring and rows: a cut's job outputs, utilities and latencies turned into :class:`ResultRow` objects.

Each row summarizes the per-sample scores of one (cut, defense, attack, adaptive) with the shared
bootstrap resamples (mean, 95% interval, the worst sample) for every metric of the modality, next to
the no-information baseline. Example grids (PNG bytes) are made here, for the rows an attacker would
pick, and handed to the writer, which is the only code that writes files.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import replace

import torch

from splitaudit import cache_keys
from splitaudit.cuts import head_forward
from splitaudit.dfil import N_PROBES, N_SAMPLES, JacobianTrace, crb_mse, jacobian_trace
from splitaudit.jobs import N_GRID, N_WORST, Scores
from splitaudit.metrics import most_recognizable, summarize
from splitaudit.results import ResultRow
from splitaudit.scheduler import NOT_RUN, Scheduler
from splitaudit.seeding import job_generator


def image_name(cut: str, defense: str, attack: str, adaptive: bool, ext: str = "png") -> str:
    """The examples' file name (relative to results.json): readable, and unique by its hash suffix."""
    name = f"{cut}__{defense}__{attack}{'__adaptive' if adaptive else ''}"
    keep = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return f"images/{keep[:120]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.{ext}"


def _r(v: float | None, nd: int = 5) -> float | None:
    return None if v is None else round(v, nd)


def _sig(v: float | None, digits: int = 5) -> float | None:
    """``v`` to ``digits`` significant digits (MSE and dFIL span decades); None for None and non-finite values."""
    return None if v is None or not math.isfinite(v) else float(f"{v:.{digits}g}")


def mse_from_psnr(psnr: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-sample MSE per input dimension from per-sample PSNR (``10·log10(range²/MSE)``; images are in [0, 1])."""
    return data_range**2 * torch.pow(10.0, -psnr.double() / 10)


def _wire_bytes(defense, info) -> int:
    """What the defense sends of the cut's tensor, plus the rest of a module's nest, which travels as it
    is; a sequence sent at its actual length (text: ``sent_bytes`` below the padded size) scales with it."""
    full = 4 * info.numel
    sent = info.sent_bytes or full
    if sent < full:
        return int(round(defense.wire_bytes(info.shape) * sent / full))
    return defense.wire_bytes(info.shape) + (sent - full)


class RowBuilder:
    """``build(cut)`` once a cut's jobs have ended (``all()`` builds any left, for cuts an interrupt left
    unfinished, and returns every row in grid order, flagged)."""

    def __init__(self, scenario, scheduler: Scheduler, latency, utility, prepared, phase, *, grids: bool, judge=None, cache=None):
        self.s, self.sched, self.latency, self.utility, self.prepared, self.phase = scenario, scheduler, latency, utility, prepared, phase
        self.judge, self.cache = judge, cache
        self.want_grids = grids
        self.by_cut: dict[str, list[ResultRow]] = {}
        self.grids: dict[str, bytes] = {}  # image path -> PNG bytes
        self.notes: list[str] = []  # for the result (a dFIL reference that could not be computed)
        self._traces: dict[tuple[str, str], JacobianTrace | None] = {}  # (cut, model hash) -> tr(JᵀJ) of its head

    @property
    def dfil_info(self) -> dict | None:
        """How the dFIL references were estimated (for the result's config), None when none was."""
        t = next((t for t in self._traces.values() if t is not None), None)
        return None if t is None else {"samples": int(t.per_sample.numel()), "probes": t.probes, "method": t.method,
                                       "estimator": "Hutchinson, Rademacher probes"}

    def build(self, cut: str) -> None:
        s, sched = self.s, self.sched
        info = s.cut(cut)
        sched.plan(cut)  # a cut the audit never reached (interrupted) still lists every row it owes
        rows: list[ResultRow] = []
        reference = {d.spec: self._noise_reference(cut, d, sched.fitted.get((cut, d.spec))) for d in s.defenses}
        with self.phase("scoring"):
            for defense in s.defenses:
                spec = defense.spec
                dinfo = self.prepared.info(defense, cut)
                fitted = sched.fitted.get((cut, spec))
                util = self.utility.results.get((cut, spec), {})
                common = dict(
                    cut=cut, defense=spec, n_eval=s.n_eval, accuracy=_r(util.get("accuracy")), agreement=_r(util.get("agreement")),
                    utility_n=self.utility.n,
                    **self.latency.row_fields(cut, spec), epsilon=dinfo.get("epsilon"), delta=dinfo.get("delta"),
                    # what the defense sends of the cut's tensor, plus the rest of a module's nest, which travels as it is
                    bytes_per_sample=_wire_bytes(defense, info),
                    defense_info={**dinfo, **(fitted.info() if fitted is not None else {})},
                    **{f"baseline_{m.name}": round(float(s.baseline[m.name].mean()), m.precision) for m in s.modality.metrics},
                    **reference[spec],
                )
                if "psnr" in s.baseline:
                    common["baseline_mse"] = _sig(float(mse_from_psnr(s.baseline["psnr"]).mean()))
                for attack in s.config.attacks:
                    variants = []
                    if spec != "none" and (cut, attack, spec) in sched.jobs:
                        variants.append((True, *sched.output(cut, attack, spec)))
                    variants.append((False, *sched.output(cut, attack, "clean")))
                    for adaptive, output, report in variants:
                        scores = output.scores.get(spec) if output is not None else None
                        if output is not None and scores is None:
                            report = {"converged": False, "error": self.prepared.error(defense, cut) or NOT_RUN}
                        rows.append(self._row(common, attack, adaptive, scores, report))
        self.by_cut[cut] = rows

    def _noise_reference(self, cut: str, defense, fitted) -> dict:
        """dFIL, its standard error and the Cramér–Rao bound on an unbiased attacker's MSE at ``cut`` under
        ``defense``'s noise (:mod:`splitaudit.dfil`), None for a defense that adds no noise of known density and
        for inputs that are not continuous (text token ids). One estimate of tr(JᵀJ) per cut and model serves
        every noise level there, with the same probes."""
        fisher = fitted.defense.noise_fisher(fitted.state) if fitted is not None else None
        x = self.s.x_eval
        out = {"dfil": None, "dfil_se": None, "crb_mse": None}
        if fisher is None or not torch.is_floating_point(x):
            return out
        model, model_hash, _ = self.prepared.get(defense, cut)
        key = (cut, model_hash)
        if key not in self._traces:
            with self.phase("dfil"):
                try:
                    self._traces[key] = self._trace(model, model_hash, cut, x[:N_SAMPLES])
                except Exception as exc:  # noqa: BLE001 - a cross-check that fails leaves its fields null, never the audit
                    self._traces[key] = None
                    self.notes.append(f"dFIL at {cut} not computed ({type(exc).__name__}: {exc})")
        trace = self._traces[key]
        if trace is None:
            return out
        dfil, se = trace.dfil(fisher)
        return {"dfil": _sig(dfil), "dfil_se": _sig(se), "crb_mse": _sig(crb_mse(dfil))}

    def _trace(self, model, model_hash: str, cut: str, x: torch.Tensor) -> JacobianTrace:
        """tr(JᵀJ) of the head at ``cut`` on the inputs ``x``, from the cache when an identical audit estimated it."""
        s, method = self.s, "vjp"
        inputs = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes() + repr(tuple(x.shape)).encode()).hexdigest()
        key = cache_keys.dfil_trace(model_hash=model_hash, inputs_hash=inputs, seed=s.config.seed, cut=cut, probes=N_PROBES,
                                    method=method, code=cache_keys.code_of(jacobian_trace))
        hit = self.cache.get("dfil", key) if self.cache is not None else None
        if hit is not None:
            return JacobianTrace(**hit)
        trace = jacobian_trace(functools.partial(head_forward, model, cut), x, generator=job_generator(s.config.seed, cut, "dfil"),
                               method=method)
        if self.cache is not None:
            self.cache.put("dfil", key, {"per_sample": trace.per_sample, "input_dim": trace.input_dim, "probes": trace.probes,
                                         "method": trace.method})
        return trace

    def _row(self, common: dict, attack: str, adaptive: bool, scores: Scores | None, report: dict) -> ResultRow:
        s, modality = self.s, self.s.modality
        if scores is None:
            nan = math.nan
            empty = {k: v for m in modality.metrics for k, v in ((m.name, nan), (f"{m.name}_ci", (nan, nan)))}
            return ResultRow.make(attack=attack, adaptive=adaptive, converged=False, status="failed", error=report.get("error"),
                                  flags=(f"attack failed: {report.get('error')}",), **empty, **common)
        values = {}

        def per(metric: str, part: str = "") -> torch.Tensor | None:  # a ratio metric's denominators, where it has any
            info = next((m for m in modality.metrics if m.name == metric), None)
            d = scores.values.get(f"{info.per}{part}") if info is not None and info.per else None
            return d.cpu() if d is not None and float(d.sum()) > 0 else None

        def put(key: str, v: torch.Tensor, nd: int, den: torch.Tensor | None = None) -> None:  # mean and interval, from the shared resamples
            summ = summarize(v, resamples=s.resamples, per=den)
            values[key] = round(summ.mean, nd)
            values[f"{key}_ci"] = (round(summ.ci[0], nd), round(summ.ci[1], nd))

        for m in modality.metrics:
            v = scores.values[m.name].cpu()
            put(m.name, v, m.precision, per(m.name))
            put(f"{m.name}_gain", v - s.baseline[m.name], m.precision, per(m.name))  # paired: the same samples, the same resamples
        for key, v in scores.values.items():  # a metric split by part (text: PII recovery by kind, "pii_recovery@2")
            metric, sep, part = key.partition("@")
            if sep and any(m.name == metric for m in modality.metrics):
                kinds = s.dataset.kinds
                name = kinds[int(part)] if kinds and part.isdigit() and int(part) < len(kinds) else part
                summ = summarize(v.cpu(), resamples=s.resamples, per=per(metric, sep + part))
                values.setdefault(f"{metric}_by_kind", {})[name] = {"mean": round(summ.mean, 5),
                                                                    "ci": [round(summ.ci[0], 5), round(summ.ci[1], 5)]}
        if "psnr" in scores.values:  # MSE per pixel, next to the dFIL reference's bound on it
            summ = summarize(mse_from_psnr(scores.values["psnr"].cpu()), resamples=s.resamples)
            values["mse"], values["mse_ci"] = _sig(summ.mean), (_sig(summ.ci[0]), _sig(summ.ci[1]))
        put("reid_top1", scores.values["reid_top1"].cpu(), 5)
        values["reid_chance"] = round(1 / s.n_eval, 6)
        if "reid_top1_features" in scores.values:
            put("reid_top1_features", scores.values["reid_top1_features"].cpu(), 5)
        if "attack_correct" in scores.values and self.judge is not None:
            put("attack_accuracy", scores.values["attack_correct"].cpu(), 5)
            values.update(judge_accuracy=round(self.judge.accuracy, 5), attack_chance=round(self.judge.chance, 5))
        head = scores.values[modality.headline].cpu()
        # The examples worth looking at: those the reconstruction rebuilt best beyond the prior.
        worst = most_recognizable(head - s.baseline[modality.headline], N_WORST)
        images = None
        # Grids for every row an attacker would pick: undefended, and adaptive under a defense. The naive
        # (non-adaptive) rows only show the gap in numbers.
        if self.want_grids and (adaptive or common["defense"] == "none"):
            images = image_name(common["cut"], common["defense"], attack, adaptive, modality.examples_format)
            recon = torch.zeros_like(s.x_eval)
            recon[scores.recon_idx.to(recon.device)] = scores.recon.to(recon.device)
            fixed = torch.arange(min(N_GRID, s.n_eval))
            self.grids[images] = modality.examples(s.x_eval.cpu(), recon.cpu(), fixed=fixed, ranked=worst, values=head, data=s.dataset)
        converged = bool(report.get("converged", True))
        label = modality.metric(modality.headline).label
        flags = () if converged else (f"attack did not beat the no-information guess on held-out aux data; its {label} is a lower bound",)
        return ResultRow.make(
            attack=attack, adaptive=adaptive, **values, worst_ssim=round(float(head.max()), 5),
            worst_indices=tuple(int(i) for i in worst), converged=converged, status="ok" if converged else "not_converged",
            flags=flags, notes=tuple(report.get("notes", ())), train_seconds=report.get("seconds"), epochs=report.get("epochs"),
            images=images, attack_info={k: v for k, v in report.items() if k not in ("notes",)}, **common,
        )

    def all(self) -> list[ResultRow]:
        rows: list[ResultRow] = []
        for cut in self.s.cuts:
            if cut.name not in self.by_cut:
                self.build(cut.name)
            # Rows built before their defense's latency was measured get it now.
            rows += [r if r.latency_ms is not None else replace(r, **self.latency.row_fields(r.cut, r.defense))
                     for r in self.by_cut[cut.name]]
        m = self.s.modality
        return flag_inversions(rows, m.headline, m.metric(m.headline).label)


def flag_inversions(rows: list[ResultRow], metric: str = "ssim", label: str = "SSIM") -> list[ResultRow]:
    """Rows flagged where an attack under-performed, so that its number reads as a lower bound.

    A deeper cut cannot carry more information than a shallower one (data processing inequality). If
    a cut leaks clearly less than a deeper cut of the same model with nothing applied to the activation
    (no defense, or one that changes the model the same way for every cut, like DP-SGD), the attack at
    the shallower cut under-performed. Noise, dropout or quantization applied at different cuts, and
    NoPeek's per-cut models, are not ordered. Within a cut, an activation defense only removes
    information: an attacker of the defended activation that beats the undefended one means the
    undefended attack under-performed.
    """
    from splitaudit.defenses.base import DEFENSES

    def cls(spec: str):  # the defense's declared abilities (class attributes)
        return DEFENSES.get(spec.split(":")[0])

    def v(r):  # the headline metric's mean and interval (SSIM for images, token accuracy for text)
        return r.value(metric)

    def lo(r):
        return (r.value(f"{metric}_ci") or (math.nan, math.nan))[0]

    def hi(r):
        return (r.value(f"{metric}_ci") or (math.nan, math.nan))[1]

    rows = list(rows)
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r.cut, len(order))
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        d = cls(r.defense)
        if d is None or d.stochastic or d.per_cut_model or d.transforms_activation:
            continue
        groups.setdefault((r.defense, r.attack, r.adaptive), []).append(i)
    for idx in groups.values():
        for i in idx:
            ri = rows[i]
            deeper = [rows[j] for j in idx if order[rows[j].cut] > order[ri.cut] and lo(rows[j]) > hi(ri)]
            if deeper:
                d = max(deeper, key=v)
                flag = (
                    f"leaks less than the deeper cut {d.cut} ({label} {v(ri):.3f} < {v(d):.3f}): the attack here is "
                    f"likely under-trained, so read this {label} as a lower bound"
                )
                rows[i] = replace(ri, flags=ri.flags + (flag,))
    for i, ri in enumerate(rows):
        if ri.defense != "none":
            continue
        better = [
            r for r in rows
            if r.cut == ri.cut and r.attack == ri.attack and r.defense != "none" and r.status == "ok"
            and cls(r.defense) is not None and not cls(r.defense).changes_model and lo(r) > hi(ri)
        ]
        if better:
            b = max(better, key=v)
            flag = (
                f"leaks less undefended than under {b.defense} ({label} {v(ri):.3f} < {v(b):.3f}): the attack on the "
                f"clean activation is likely under-trained, so read this {label} as a lower bound"
            )
            rows[i] = replace(rows[i], flags=rows[i].flags + (flag,))
    return rows
