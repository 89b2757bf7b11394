"""Kinship-guided top-k greedy merging (Hu et al., 2024), without models.

The strategy knows member ids, their dev fitness and a kinship table; it
proposes pairs to merge and learns from their scores. Rounds:

0. The starting population is every starting member (not yet cut to k).
1. A pair round merges every pair of the population not merged before (round 1:
   every pair of the starting members), fitter member first: it is the base of
   a slerp-like merge (ties: the earlier-born). Pairs are proposed in rank
   order, (1st, 2nd), (1st, 3rd), ..., so a `budget` that cuts a round short
   keeps the most promising ones. The new population is the top k of the old
   population and this round's children, by dev fitness.
2. A round that does not strictly improve the best fitness is followed by ONE
   exploration round: the best member is merged with its LEAST related partner,
   the lowest kinship to it among every individual that was ever a member (the
   starting members and every child that survived a round's selection), not
   counting partners it was already merged with. Discarded children are not
   partners: their weights were never kept. If the exploration child improves
   the best, pair rounds go on; otherwise the search stops. With explore=False
   (the ablation of this step) a stalled pair round ends the search.
3. After each round (round 0 too) the search stops, with the first of these
   as its reason: the population's mean pairwise kinship is >= stop_kinship
   (saturation); an exploration round did not improve the best; a stalled pair
   round leaves the best no partner to explore with; max_rounds rounds are
   done (pair and exploration rounds both count); `budget` children were
   evaluated (a round the budget cuts short still selects its top k).

Ranking is by fitness, ties to the earlier-born (starting members in the given
order, then children in the order they were told), so the result is a function
of the inputs alone. An invalid child (fitness None or NaN, e.g. non-finite
weights) counts against the budget and is never kept. Pairs are unordered:
a pair merged once is never proposed again, so nothing counts twice.

It speaks search/protocol.py's protocol: kinship is asked for with needs()
before the call that uses it (end_generation, or the ask of an exploration
round), and each round ends with an explicit end_generation(). The finer steps
(kinship_needed, add_kinship, round_over, end_round, accepts) are its own.
Kinship values, once added, are never overwritten, so a caller that computes
them deterministically gets a deterministic search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import combinations
from typing import Any, Mapping, Optional, Sequence

from mergekit_evolver.recipes.candidates import pair_recipe_data
from mergekit_evolver.search.protocol import GenerationEnd, KinshipRequest, Outcome, Proposal, Result, Start, member_ref

Pair = tuple[str, str]


def pair_key(a: str, b: str) -> Pair:
    return (a, b) if a <= b else (b, a)


def _valid(fitness: Optional[float]) -> bool:
    return fitness is not None and not math.isnan(fitness)


@dataclass(frozen=True)
class PairProposal(Proposal):
    """A child of two members; step is its ledger key (greedy/r001/p03,
    greedy/r004/explore) and child its member id (r001_p03, r004_explore)."""

    round: int = 0
    index: int = 0
    kind: str = "pair"  # "pair" | "explore"
    base: str = ""  # the fitter parent (slerp's base_model)
    other: str = ""
    kinship: Optional[float] = None  # explore: kinship of base and other


@dataclass(frozen=True)
class RoundSummary:
    round: int
    kind: str  # "start" | "pair" | "explore"
    members: tuple[str, ...]  # the population after selection, best first
    fitness: tuple[float, ...]
    kinship: Optional[float]  # mean pairwise kinship of `members` (NaN pairs left out)
    evaluated: int
    kept: int  # this round's children among `members`
    improved: bool
    # Children accepted while the round ran but pushed out of the top k by a
    # later child of the same round: never a member, never a parent.
    displaced: tuple[str, ...]
    used: int  # children evaluated so far, all rounds
    stopped: Optional[str]
    next: Optional[str]  # "pair" | "explore" | None (stopped)

    def stats(self) -> dict:
        """The generation row the report plots (best/mean/min, kinship)."""
        return {
            "best": self.fitness[0],
            "mean": sum(self.fitness) / len(self.fitness),
            "min": min(self.fitness),
            "kinship": self.kinship,
            "evaluated": self.evaluated,
            "kept": self.kept,
            "members": list(self.members),
            "kind": self.kind,
            "improved": self.improved,
            "budget_used": self.used,
            **({"stopped": self.stopped} if self.stopped else {}),
        }


class KinshipGreedy:
    def __init__(
        self,
        members: Sequence[str],
        fitness: Sequence[Optional[float]],
        *,
        top_k: int,
        max_rounds: int,
        budget: Optional[int] = None,
        stop_kinship: Optional[float] = None,
        metric: str = "pcc",
        template: Optional[Mapping[str, Any]] = None,
        base_model: Optional[str] = None,
        explore: bool = True,
    ):
        if len(members) != len(fitness):
            raise ValueError("one fitness per member")
        if len(set(members)) != len(members):
            raise ValueError("member ids must be unique")
        if len(members) < 2:
            raise ValueError("greedy merging needs at least 2 members")
        if top_k < 2 or max_rounds < 1 or (budget is not None and budget < 1):
            raise ValueError("top_k >= 2, max_rounds >= 1 and budget >= 1 (or None)")
        bad = [m for m, f in zip(members, fitness) if not _valid(f)]
        if bad:
            raise ValueError(f"starting members without a fitness: {bad}")
        self.top_k = top_k
        self.explore = explore
        self.max_rounds = max_rounds
        self.metric = metric
        # The pair recipe's method and parameters (slerp t=0.5 by default).
        self.template = dict(template or {"merge_method": "slerp", "parameters": {"t": 0.5}})
        self.base_model = base_model
        self.expected = budget
        self.budget = budget
        self.stop_kinship = stop_kinship
        self.fitness: dict[str, float] = dict(zip(members, fitness))
        self.born: dict[str, int] = {m: i for i, m in enumerate(members)}
        self.population: list[str] = self.ranked(members)
        self.pool: list[str] = list(members)  # every individual that was a member
        self.kinship: dict[Pair, float] = {}
        self.merged: set[Pair] = set()
        self.history: list[RoundSummary] = []
        self.used = 0
        self.stopped: Optional[str] = None
        # The round in progress (round 0, the start, is over before it begins).
        self.round = 0
        self.kind = "start"
        self._queue: list[PairProposal] = []
        self._next = 0  # proposals asked
        self._told = 0
        self._best_before = self.fitness[self.population[0]]
        self._running: list[str] = list(self.population[: top_k])
        self._accepted: list[str] = []  # this round's children that entered _running
        self._explore_pending = False

    # -- state --------------------------------------------------------------
    def rank_key(self, member: str) -> tuple[float, int]:
        return (-self.fitness[member], self.born[member])

    def ranked(self, members: Sequence[str]) -> list[str]:
        return sorted(members, key=self.rank_key)

    @property
    def done(self) -> bool:
        return self.stopped is not None

    @property
    def best(self) -> str:
        return self.population[0]

    @property
    def round_over(self) -> bool:
        """All proposals of the current round were told: end_round() is due."""
        return not self.done and not self._explore_pending and self._told == len(self._queue)

    # -- kinship ------------------------------------------------------------
    def kinship_needed(self) -> list[Pair]:
        """Pairs whose kinship the next call (end_round or ask) needs."""
        if self.done:
            return []
        if self._explore_pending:
            wanted = [pair_key(self.best, c) for c in self.explore_partners()]
        elif self.round_over:
            wanted = [pair_key(a, b) for a, b in combinations(self._selection(), 2)]
        else:
            return []
        return [p for p in wanted if p not in self.kinship]

    def add_kinship(self, table: Mapping[tuple[str, str], float]) -> None:
        """Learn kinship values; a pair already known keeps its first value."""
        for (a, b), value in table.items():
            self.kinship.setdefault(pair_key(a, b), float(value))

    def mean_kinship(self, members: Sequence[str]) -> Optional[float]:
        values = [self.kinship[pair_key(a, b)] for a, b in combinations(members, 2)]
        values = [v for v in values if not math.isnan(v)]  # NaN: a delta with no variance
        return sum(values) / len(values) if values else None

    def explore_partners(self) -> list[str]:
        """Who the best may be merged with to explore: pool members it was not
        merged with yet, in birth order."""
        best = self.best
        return [c for c in self.pool if c != best and pair_key(best, c) not in self.merged]

    def _require_kinship(self) -> None:
        missing = self.kinship_needed()
        if missing:
            raise RuntimeError(f"kinship needed first for {len(missing)} pair(s), e.g. {missing[0]}")

    # -- ask / tell ---------------------------------------------------------
    def _remaining(self) -> Optional[int]:
        return None if self.budget is None else self.budget - self.used

    def _plan_pairs(self) -> list[PairProposal]:
        r = self.round
        pairs = [
            (a, b) for a, b in combinations(self.population, 2) if pair_key(a, b) not in self.merged
        ]
        left = self._remaining()
        if left is not None:
            pairs = pairs[:left]
        return [self._child(f"greedy/r{r:03d}/p{i:02d}", r, i, "pair", a, b, f"r{r:03d}_p{i:02d}") for i, (a, b) in enumerate(pairs)]

    def _child(
        self, step: str, r: int, i: int, kind: str, base: str, other: str, child: str,
        kinship: Optional[float] = None,
    ) -> PairProposal:
        method = self.template.get("merge_method")
        note = None if kinship is None else f"explore: kinship {kinship:.4f} ({self.metric}) to the best"
        return PairProposal(
            step=step, generation=r, slot=i, parents=(base, other), child=child, like=base,
            recipe=pair_recipe_data(self.template, member_ref(base), member_ref(other), self.base_model),
            operator=method, note=note, round=r, index=i, kind=kind, base=base, other=other,
            kinship=kinship,
        )

    def _plan_explore(self) -> PairProposal:
        best, r = self.best, self.round

        def order(c: str) -> tuple[bool, float, int]:
            # Lowest kinship first; unknown (NaN) last; ties to the earlier-born.
            k = self.kinship[pair_key(best, c)]
            return (math.isnan(k), 0.0 if math.isnan(k) else k, self.born[c])

        partner = min(self.explore_partners(), key=order)
        return self._child(
            f"greedy/r{r:03d}/explore", r, 0, "explore", best, partner, f"r{r:03d}_explore",
            kinship=self.kinship[pair_key(best, partner)],
        )

    def ask(self) -> Optional[Proposal]:
        """The next child to make, or None when none is due (round over, done)."""
        if self.done:
            return None
        if self._explore_pending:
            self._require_kinship()
            self._queue = [self._plan_explore()]
            self._explore_pending = False
        if self._next >= len(self._queue):
            return None  # every proposal of the round asked; tell them, then end_round()
        # A child is kept if it beats the k-th of the running top k, as it
        # stands now (earlier children of the round were told).
        bar = self.fitness[self._running[-1]] if len(self._running) >= self.top_k else None
        proposal = self._queue[self._next] = replace(self._queue[self._next], bar=bar)
        self._next += 1
        return proposal

    def accepts(self, proposal: Proposal, fitness: Optional[float]) -> bool:
        """Whether the child, told now, would enter the top k (before later
        children of its round are told)."""
        if not _valid(fitness):
            return False
        if len(self._running) < self.top_k:
            return True
        worst = self._running[-1]
        # A child is born after everyone, so a tie with the k-th goes against it.
        return fitness > self.fitness[worst]

    def tell(self, proposal: Proposal, result: Result) -> bool:
        """Learn a child's dev fitness (None: invalid). Returns whether it
        entered the top k at this point of the round."""
        fitness = result.fitness
        if self._told >= self._next or self._queue[self._told] != proposal:
            # Proposals are told in the order they were asked.
            raise ValueError(f"told {proposal.step} out of order")
        self._told += 1
        self.used += 1
        self.merged.add(pair_key(proposal.base, proposal.other))
        accepted = self.accepts(proposal, fitness)
        if accepted:
            self.fitness[proposal.child] = float(fitness)
            self.born[proposal.child] = len(self.born)
            self._running = self.ranked(self._running + [proposal.child])[: self.top_k]
            self._accepted.append(proposal.child)
        return accepted

    def _selection(self) -> list[str]:
        """The population this round ends with: round 0 keeps every starting
        member; later rounds, the top k of the old population and the children."""
        return list(self.population) if self.round == 0 else list(self._running)

    # -- rounds -------------------------------------------------------------
    def end_round(self) -> RoundSummary:
        """Close the round: the top k become the population; decide what
        comes next (a pair round, an exploration round, or the end)."""
        if not self.round_over:
            raise RuntimeError("end_round() before every proposal of the round was told")
        self._require_kinship()
        kind, r = self.kind, self.round
        self.population = self._selection()
        members = self.population
        new = [c for c in self._accepted if c in members]
        displaced = tuple(c for c in self._accepted if c not in members)
        self.pool.extend(new)
        best_fit = self.fitness[members[0]]
        improved = r > 0 and best_fit > self._best_before
        kinship = self.mean_kinship(members)
        left = self._remaining()

        stopped: Optional[str] = None
        following: Optional[str] = None
        if self.stop_kinship is not None and kinship is not None and kinship >= self.stop_kinship:
            stopped = f"kinship: population mean {kinship:.4f} >= {self.stop_kinship}"
        elif kind == "explore" and not improved:
            stopped = "no improvement: the exploration child did not beat the best"
        elif kind == "pair" and not improved and not self.explore:
            stopped = "no improvement (exploration is off)"
        elif kind == "pair" and not improved and not self.explore_partners():
            stopped = "no improvement, and the best has no unmerged partner to explore with"
        elif r >= self.max_rounds:
            stopped = f"max_rounds: {self.max_rounds} rounds done"
        elif left is not None and left <= 0:
            stopped = f"budget: {self.budget} children evaluated"
        else:
            following = "pair" if r == 0 or improved else "explore"

        summary = RoundSummary(
            round=r, kind=kind, members=tuple(members),
            fitness=tuple(self.fitness[m] for m in members), kinship=kinship,
            evaluated=len(self._queue), kept=len(new), improved=improved,
            displaced=displaced, used=self.used, stopped=stopped, next=following,
        )
        self.history.append(summary)
        self._start(stopped, following, best_fit)
        return summary

    def _start(self, stopped: Optional[str], following: Optional[str], best_fit: float) -> None:
        self.stopped = stopped
        self._best_before = best_fit
        self._queue, self._next, self._told = [], 0, 0
        self._running = list(self.population[: self.top_k])
        self._accepted = []
        if stopped is not None:
            return
        self.round += 1
        self.kind = following
        if following == "explore":
            self._explore_pending = True
            return
        self._queue = self._plan_pairs()
        if not self._queue:
            # Cannot happen after round 0 or an improvement (a new best brings
            # new pairs), nor with budget left; kept as a guard, not a hang.
            self.stopped = "no pair left to merge"

    # -- the search protocol ------------------------------------------------
    def needs(self) -> Optional[KinshipRequest]:
        """Kinship among the members the due pairs name, in birth order, so the
        same request is always spelled alike."""
        pairs = self.kinship_needed()
        if not pairs:
            return None
        ids = sorted({m for pair in pairs for m in pair}, key=lambda m: self.born[m])
        return KinshipRequest(tuple((a, b) for i, a in enumerate(ids) for b in ids[i + 1:]), self.metric)

    def give(self, request: KinshipRequest, answer: Mapping[tuple[str, str], float]) -> None:
        self.add_kinship(answer)

    def end_generation(self) -> GenerationEnd:
        summary = self.end_round()
        kinship = "-" if summary.kinship is None else f"{summary.kinship:.4f}"
        stats = summary.stats()
        line = (
            f"greedy round {summary.round} ({summary.kind}): best {stats['best']:.4f} "
            f"mean {stats['mean']:.4f} min {stats['min']:.4f}, kept {summary.kept}/{summary.evaluated}, "
            f"kinship {kinship}"
        )
        if summary.stopped:
            line += f"; stop: {summary.stopped}"
        return GenerationEnd(summary.round, stats, line, dropped=summary.displaced)

    def result(self) -> Outcome:
        return Outcome(tuple(self.population), tuple(self.fitness[m] for m in self.population))


def from_config(start: Start) -> KinshipGreedy:
    c = start.config
    g = c.greedy
    return KinshipGreedy(
        start.members, start.fitness, top_k=g.top_k, max_rounds=g.max_rounds, budget=g.budget,
        stop_kinship=g.stop_kinship, metric=g.metric, base_model=c.population.base_model, explore=g.explore,
        template={"merge_method": g.merge_method, "parameters": dict(g.parameters)},
    )
