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
    metric: str = "ssim"

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
        """The headline's value of the metric the verdict rests on (SSIM for images)."""
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


def assess(result: AuditResult, cut: str, defense: str) -> Assessment:
    """The assessment of ``(cut, defense)`` in ``result`` (the threshold is ``result.threshold``)."""
    rows = result.rows(cut=cut, defense=defense)
    thr = result.threshold
    metric = "ssim"
    head = headline(rows, metric)
    problems = tuple(problems_of(rows))
    if head is None:
        reasons = problems or ("no attack ran on this pair",)
        return Assessment(cut, defense, NO_CONCLUSION, None, ("every attack failed",) + tuple(reasons), problems, metric)
    value, (lo, hi) = head.value(metric), head.value(f"{metric}_ci")
    where = f"{attack_name(head)}: SSIM {value:.3f} [95% CI {lo:.3f}, {hi:.3f}], n={head.n_eval}"
    if value > thr:
        # Evidence of leakage stands whatever the other attacks did: a lower bound above the threshold is above it.
        return Assessment(cut, defense, RECOGNIZABLE, head, (f"{where} > threshold {thr:g}",) + problems, problems, metric)
    if problems:
        reasons = (f"{where} <= threshold {thr:g}, but the ladder is incomplete, so this is a lower bound",) + problems
        return Assessment(cut, defense, NO_CONCLUSION, head, reasons, problems, metric)
    return Assessment(cut, defense, NOT_RECOGNIZABLE, head, (f"{where} <= threshold {thr:g}; every attack converged",), problems, metric)


def assess_all(result: AuditResult) -> list[Assessment]:
    """One assessment per (cut, defense) that has rows, in cut order then defense order."""
    cuts = [c.name for c in result.cuts]
    cuts += [c for c in dict.fromkeys(r.cut for r in result.results) if c not in cuts]
    return [assess(result, c, d) for c in cuts for d in result.defenses() if result.rows(cut=c, defense=d)]
