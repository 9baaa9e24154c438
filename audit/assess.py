"""The assessment of one (cut, defense): the only place a verdict is decided.

Like pytest's outcome of a test, it is decided once and every view only renders it: the console, the
HTML report, the gate, the planner and the pytest helpers. :func:`assess` reads the rows of every
attack that ran on the pair (the ladder) and returns the headline row, a status and its reasons.

It fails closed. A failed attack, one that did not converge, or one whose number is flagged as a
lower bound (an under-trained attack) means the ladder did not show what the strongest attacker can
do: such a pair is "no conclusion", never "not recognizable". A reconstruction that is recognizable
stays evidence of leakage whatever happened to the other attacks. A pair where every attack failed is
shown, as a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitaudit.results import AuditResult, ResultRow

RECOGNIZABLE = "recognizable"
NO_LEAKAGE_BEYOND_PRIOR = "no_leakage_beyond_prior"
NOT_RECOGNIZABLE = "not_recognizable"
NO_CONCLUSION = "no_conclusion"
STATUSES = (RECOGNIZABLE, NO_LEAKAGE_BEYOND_PRIOR, NOT_RECOGNIZABLE, NO_CONCLUSION)

WORDS = {  # plain words, never "safe": what the attacks that ran achieved
    RECOGNIZABLE: "recognizable",
    NO_LEAKAGE_BEYOND_PRIOR: "no evidence of leakage beyond the prior",
    NOT_RECOGNIZABLE: "not recognizable by the attacks run",
    NO_CONCLUSION: "no conclusion",
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def attack_name(row: ResultRow) -> str:
    return row.attack + (" (adaptive)" if row.adaptive else "")


@dataclass(frozen=True)
class Assessment:
    cut: str
    defense: str
    status: str  # one of STATUSES
    headline: ResultRow | None  # the row the status rests on: the strongest attack that ran (None: every attack failed)
    reasons: tuple[str, ...]
    problems: tuple[str, ...] = ()  # attacks of the ladder that failed, did not converge or are flagged as lower bounds
    metric: str = "ssim"  # the headline metric of the result's modality

    @property
    def verified(self) -> bool:
        """Every attack of the ladder ran to a conclusion: the headline is not only a lower bound."""
        return self.headline is not None and not self.problems

    @property
    def failed(self) -> bool:
        """Every attack failed: nothing was measured."""
        return self.headline is None

    @property
    def words(self) -> str:
        if self.failed:
            return "every attack failed: no conclusion"
        return WORDS[self.status]

    @property
    def value(self) -> float | None:
        """The headline's value of the metric the verdict rests on (SSIM for images, token accuracy for text)."""
        v = None if self.headline is None else self.headline.value(self.metric)
        return float(v) if _finite(v) else None

    def to_dict(self, index: dict[tuple, int] | None = None) -> dict:
        head = None
        if self.headline is not None:
            head = {"attack": self.headline.attack, "adaptive": self.headline.adaptive}
            if index is not None and self.headline.key in index:
                head["index"] = index[self.headline.key]
        return {"cut": self.cut, "defense": self.defense, "status": self.status, "headline": head, "reasons": list(self.reasons)}


def headline(rows: list[ResultRow], metric: str = "ssim") -> ResultRow | None:
    """The strongest attack that ran: the highest mean of ``metric``, adaptive or not; a failed row never wins."""
    cands = [r for r in rows if r.status != "failed" and _finite(r.value(metric))]
    return max(cands, key=lambda r: r.value(metric)) if cands else None


def problems_of(rows: list[ResultRow]) -> list[str]:
    out = []
    for r in rows:
        who = attack_name(r)
        if r.status == "failed":
            out.append(f"attack {who} failed: {r.error}" if r.error else f"attack {who} failed")
        elif r.status != "ok" or not r.converged:
            out.append(f"attack {who} did not converge (did not beat the no-information guess on held-out aux data)")
        for f in r.flags:
            if r.status != "failed" and f not in out:
                out.append(f"attack {who}: {f}")
    return out


def _ci(row: ResultRow, key: str) -> tuple[float, float] | None:
    ci = row.value(f"{key}_ci")
    return (float(ci[0]), float(ci[1])) if ci is not None and all(_finite(v) for v in ci) else None


def assess(result: AuditResult, cut: str, defense: str) -> Assessment:
    """The assessment of ``(cut, defense)`` in ``result``, by these rules in order (shared/DESIGN.md):

    1. every attack failed: **no conclusion**, shown as a failure;
    2. **recognizable** when the strongest attack's headline metric (the modality's: SSIM for images, token
       accuracy for text) is above the threshold *and* its gain over the
       no-information guess is significantly above zero (its 95% interval excludes 0), or when any attack
       re-identifies its inputs significantly more often than ``reid_threshold`` (the interval's lower end
       above it), whatever the headline metric says. Evidence of leakage stands whatever the other attacks did;
    3. **no conclusion** when any attack failed, did not converge or is flagged as a lower bound, or when
       an interval straddles the threshold it is compared with (the sample is too small to decide);
    4. **no evidence of leakage beyond the prior** when the strongest attack does not beat the
       no-information guess significantly and re-identifies no more often than chance;
    5. otherwise **not recognizable by the attacks run**.

    Results written before gains and re-identification were measured are judged by the headline metric alone.
    """
    rows = result.rows(cut=cut, defense=defense)
    thr, reid_thr = result.threshold, result.reid_threshold
    info = result.headline_metric
    metric, label, nd = info.name, info.label, info.digits
    head = headline(rows, metric)
    problems = tuple(problems_of(rows))
    if head is None:
        reasons = problems or ("no attack ran on this pair",)
        return Assessment(cut, defense, NO_CONCLUSION, None, ("every attack failed",) + tuple(reasons), problems, metric)
    value, (lo, hi) = head.value(metric), (head.value(f"{metric}_ci") or (math.nan, math.nan))
    n = head.n_eval
    where = f"{attack_name(head)}: {label} {value:.{nd}f} [95% CI {lo:.{nd}f}, {hi:.{nd}f}], n={n}"
    gain_ci = _ci(head, f"{metric}_gain")
    gain = None if gain_ci is None else (f"gain over the no-information guess {head.value(f'{metric}_gain'):+.{nd}f} "
                                         f"[95% CI {gain_ci[0]:+.{nd}f}, {gain_ci[1]:+.{nd}f}]")
    beats_prior = gain_ci is None or gain_ci[0] > 0  # unknown (older results): judged by the headline metric alone
    ran = [r for r in rows if r.status != "failed"]
    reids = [(r, ci) for r in ran if (ci := _ci(r, "reid_top1")) is not None]
    chance = next((r.reid_chance for r, _ in reids if r.reid_chance is not None), None)

    def reid_text(r, ci):
        return (f"{attack_name(r)} re-identifies {100 * r.reid_top1:.1f}% of its inputs [95% CI {100 * ci[0]:.1f}, {100 * ci[1]:.1f}] "
                f"among n={r.n_eval} (chance {100 * (r.reid_chance or 0):.2f}%)")

    def done(status, *why):
        return Assessment(cut, defense, status, head, tuple(why), problems, metric)

    if value > thr and beats_prior:
        return done(RECOGNIZABLE, f"{where} > threshold {thr:g}" + (f"; {gain} excludes 0" if gain else ""), *problems)
    identified = [(r, ci) for r, ci in reids if ci[0] > reid_thr]
    if identified:
        r, ci = max(identified, key=lambda rc: rc[1][0])
        return done(RECOGNIZABLE, f"{reid_text(r, ci)}: above the re-identification threshold {100 * reid_thr:g}%, whatever {label} says",
                    where, *problems)
    if problems:
        return done(NO_CONCLUSION, f"{where}: the ladder is incomplete, so this is only a lower bound", *problems)
    if beats_prior and lo <= thr < hi:
        return done(NO_CONCLUSION, f"{where}: the interval straddles the threshold {thr:g}, so n={n} is too small to decide")
    straddling = [(r, ci) for r, ci in reids if ci[0] <= reid_thr < ci[1]]
    if straddling:
        r, ci = straddling[0]
        return done(NO_CONCLUSION, f"{reid_text(r, ci)}: the interval straddles the re-identification threshold "
                                   f"{100 * reid_thr:g}%, so n={r.n_eval} is too small to decide")
    above_chance = [(r, ci) for r, ci in reids if chance is not None and ci[0] > chance]
    if not beats_prior and not above_chance:
        return done(NO_LEAKAGE_BEYOND_PRIOR, f"{where}; {gain} does not exclude 0: the reconstructions are no better than "
                                             "the no-information guess", "no attack re-identifies its inputs more often than chance",
                    "every attack converged")
    why = [f"{where} <= threshold {thr:g}" if value <= thr else f"{where} > threshold {thr:g}, but {gain} does not exclude 0"]
    why += [f"{reid_text(r, ci)}: above chance, below the threshold {100 * reid_thr:g}%" for r, ci in above_chance[:1]]
    return done(NOT_RECOGNIZABLE, *why, "every attack converged")


def assess_all(result: AuditResult) -> list[Assessment]:
    """One assessment per (cut, defense) that has rows, in cut order then defense order."""
    cuts = [c.name for c in result.cuts]
    cuts += [c for c in dict.fromkeys(r.cut for r in result.results) if c not in cuts]
    return [assess(result, c, d) for c in cuts for d in result.defenses() if result.rows(cut=c, defense=d)]
