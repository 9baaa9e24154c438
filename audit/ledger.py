"""The training budget of a learned attack across cuts: spent by difficulty, not by position.

Each profile gives every cut a nominal allotment: its attack's nominal epochs, in training FLOPs (an
epoch of a first conv's full-resolution decoder costs more than one of a vector cut's). A cut's base
fit stops early once its validation curve has flattened (``attacks.training.flattened``); what it left
unspent goes into a pool. A cut whose base was still improving when its allotment ended is granted more
epochs (the scheduler's ``extend`` job): its own unspent share, plus a share of the pool in proportion to
its nominal cost among itself and the cuts after it, with its total capped at ``cap`` times its nominal
allotment. What no cut was granted is not spent.

Deterministic by construction, whatever the order and timing of jobs: grants are decided in cut order,
and cut i's grant depends only on the base outcomes of cuts 0..i, never on when they arrived. Identical
outcomes (an identical rerun, served from the cache) give identical grants, hence identical cache keys.
A cut audited alone has only its own allotment, and a last cut's surplus has no one to go to: both are
expected, and recorded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """How a cut's base fit went: what it spent and whether it asks for more."""

    epochs: int  # epochs it ran, every run of it (a restart's too)
    improving: bool  # its allotment ended while its validation curve was still rising
    stop: str  # why it stopped: flattened | budget | no_improvement | diverged | schedule | failed | ...


@dataclass(frozen=True)
class Grant:
    """What a cut is granted beyond its base fit (0 epochs: it does not extend, ``reason`` says why)."""

    epochs: int
    flops: float
    # granted | cap (granted up to its cap) | no surplus | the base's stop reason (flattened, ...) when it asked for nothing
    reason: str
    sources: Mapping[str, float] = field(default_factory=dict)  # cut -> FLOPs of its savings drawn (itself: its own unspent share)


class Ledger:
    """Grants in cut order from base outcomes. ``epoch_flops[cut]``: the attack's training FLOPs for one epoch
    at that cut (the same unit for every cut; any positive unit works)."""

    def __init__(self, cuts: Sequence[str], epoch_flops: Mapping[str, float], *, nominal_epochs: int, cap: float, unit: str = "FLOPs"):
        if len(set(cuts)) != len(cuts):
            raise ValueError("the ledger's cuts must be distinct")
        bad = [c for c in cuts if not (math.isfinite(epoch_flops[c]) and epoch_flops[c] > 0)]
        if bad:
            raise ValueError(f"an epoch must cost something at every cut: {bad}")
        if nominal_epochs < 1 or cap < 1:
            raise ValueError(f"nominal epochs must be at least 1 and the cap at least 1x, got {nominal_epochs} and {cap}")
        self.cuts = tuple(cuts)
        self.cost = {c: float(epoch_flops[c]) for c in cuts}
        self.nominal_epochs, self.cap, self.unit = nominal_epochs, float(cap), unit
        self.nominal = {c: nominal_epochs * self.cost[c] for c in cuts}
        self._outcomes: dict[str, Outcome] = {}
        self._grants: dict[str, Grant] = {}
        self._pool: dict[str, float] = {}  # source cut -> FLOPs of its savings not yet granted
        self._moved: list[tuple[str, str, float]] = []  # (from, to, FLOPs), in cut order
        self._extended: dict[str, tuple[int, str]] = {}  # cut -> (epochs its extension ran, why it stopped)

    # -- outcomes in, grants out --
    def record(self, cut: str, outcome: Outcome) -> None:
        """The base outcome of ``cut`` (recorded once: a second, different one is a bug)."""
        if cut not in self.cost:
            raise KeyError(f"{cut!r} is not in the ledger")
        if cut in self._outcomes and self._outcomes[cut] != outcome:
            raise ValueError(f"{cut!r} already has an outcome")
        self._outcomes[cut] = outcome

    def grant(self, cut: str) -> Grant | None:
        """The grant of ``cut``, or None while a cut before it (or it) has no outcome yet."""
        for c in self.cuts:
            if c in self._grants:
                if c == cut:
                    return self._grants[c]
                continue
            if c not in self._outcomes:
                return None
            self._grants[c] = self._decide(c)
            if c == cut:
                return self._grants[c]
        raise KeyError(f"{cut!r} is not in the ledger")

    def record_extension(self, cut: str, epochs: int, stop: str) -> None:
        """What the extension granted to ``cut`` ran (for the record only: grants never depend on it)."""
        self._extended[cut] = (epochs, stop)

    def _decide(self, cut: str) -> Grant:
        o, cost = self._outcomes[cut], self.cost[cut]
        spent = o.epochs * cost
        own = max(0.0, self.nominal[cut] - spent)
        if not o.improving:
            self._add(cut, own)
            return Grant(0, 0.0, o.stop)
        i = self.cuts.index(cut)
        later = sum(self.nominal[c] for c in self.cuts[i + 1:])
        pool = sum(self._pool.values())
        share = pool * self.nominal[cut] / (self.nominal[cut] + later)
        room = max(0.0, self.cap * self.nominal[cut] - spent)
        epochs = int(math.floor(min(own + share, room) / cost + 1e-9))
        flops = epochs * cost
        from_own = min(own, flops)
        from_pool = flops - from_own
        sources = {cut: from_own} if from_own > 0 else {}
        if from_pool > 0:
            for src, amount in list(self._pool.items()):
                take = amount * from_pool / pool
                self._pool[src] = amount - take
                sources[src] = sources.get(src, 0.0) + take
                self._moved.append((src, cut, take))
        self._add(cut, own - from_own)  # what it could not use of its own share
        if room < own + share:
            reason = "cap"  # granted up to its cap, or nothing where it was already there
        else:
            reason = "granted" if epochs else "no surplus"
        return Grant(epochs, flops, reason, sources)

    def _add(self, cut: str, amount: float) -> None:
        if amount > 0:
            self._pool[cut] = self._pool.get(cut, 0.0) + amount

    # -- the record --
    def summary(self) -> dict[str, Any]:
        """The ledger for results.json: the total, what was spent, what moved from which cuts to which."""
        rows, spent = [], 0.0
        for c in self.cuts:
            o, g = self._outcomes.get(c), self._grants.get(c)
            ext_epochs, ext_stop = self._extended.get(c, (0, None))
            base = 0.0 if o is None else o.epochs * self.cost[c]
            spent += base + ext_epochs * self.cost[c]
            rows.append({
                "cut": c, "flops_per_epoch": _n(self.cost[c]), "nominal_epochs": self.nominal_epochs, "nominal": _n(self.nominal[c]),
                "base_epochs": None if o is None else o.epochs, "base_stop": None if o is None else o.stop,
                "saved": _n(max(0.0, self.nominal[c] - base)) if o is not None and not o.improving else 0,
                "grant_epochs": None if g is None else g.epochs, "grant": None if g is None else _n(g.flops),
                "grant_reason": None if g is None else g.reason,
                "extend_epochs": ext_epochs if c in self._extended else None, "extend_stop": ext_stop,
            })
        total = sum(self.nominal.values())
        moved = [{"from": a, "to": b, "flops": _n(f), "epochs": round(f / self.cost[b], 2)} for a, b, f in self._moved if f > 0]
        return {
            "unit": self.unit, "nominal_epochs": self.nominal_epochs, "cap": self.cap,
            "total": _n(total), "spent": _n(spent), "unspent": _n(max(0.0, total - spent)),
            "granted": _n(sum(g.flops for g in self._grants.values())), "cuts": rows, "moved": moved,
        }


def _n(v: float) -> float:
    """FLOPs to four significant digits (they span decades; the exact count is not the point)."""
    return float(f"{v:.4g}")


def describe(attack: str, summary: Mapping[str, Any]) -> str:
    """One line on what a ledger did, for the console and the report: which cuts stopped early, what they
    saved, which cuts it went to, and what was left unspent."""
    cuts = summary.get("cuts") or []
    total = float(summary.get("total") or 0.0)
    n = summary.get("nominal_epochs")
    early = [c for c in cuts if c.get("base_epochs") is not None and c.get("saved")]
    granted = [c for c in cuts if c.get("grant_epochs")]
    saved = sum(float(c["saved"]) for c in early)
    pct = (lambda v: f"{100 * v / total:.0f}%") if total > 0 else (lambda v: "n/a")
    parts = [f"{attack}: {n} epochs a cut, up to {summary.get('cap', 1):g}x"]
    if early:
        stops = ", ".join(f"{c['cut']} {c['base_epochs']}" for c in early)
        parts.append(f"{len(early)} of {len(cuts)} cuts stopped early ({stops}) and saved {pct(saved)} of the budget")
    else:
        parts.append(f"no cut stopped early (of {len(cuts)})")
    if granted:
        parts.append("granted " + ", ".join(f"{c['cut']} +{c['grant_epochs']}" for c in granted) + " epochs")
    elif early:
        parts.append("no cut was still improving to take it")
    parts.append(f"{pct(float(summary.get('unspent') or 0.0))} unspent")
    return "; ".join(parts)


def budget_lines(config: Mapping[str, Any]) -> list[str]:
    """:func:`describe` for each ledgered attack of a result's ``config`` (none for results without a ledger)."""
    budget = config.get("budget")
    return [describe(a, s) for a, s in budget.items() if isinstance(s, Mapping)] if isinstance(budget, Mapping) else []
