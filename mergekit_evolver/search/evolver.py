"""Evolver (Du et al., 2024): DE over a population of whole models.

`individual` selection is classic synchronous DE: every offspring of a
generation is built from the population as it stood when the generation began,
competes with its own parent on dev fitness, and replaces it only if strictly
better. `merged` selection is the paper's Evolver+merger: an offspring
temporarily takes slot i, and it stays only if the merged population's
fitness strictly beats the best seen so far. There a member's fitness is the
merged fitness it was accepted at (initial members: their own), used only to
pick the `best` donor of best/1 operators.

The authors' released code (model-evolution, src/model_merge/evolver.py)
differs in three ways, each an option here with our default first:
- update "generation" | "immediate": their individual selection replaces a
  member at once, so later slots of the generation see it;
- slot_order "fixed" | "permuted": their merged selection visits the slots in
  a fresh random permutation each generation (here a seeded one);
- donor "uniform" | "annealed_best": without a merger, their donor is a random
  other member with probability p = 0.5/(T - t) + 0.5 (t the 0-based
  generation, T the generation count), otherwise the fittest other member.
(The fourth, tensors left out of mutation, is the DE methods' `exclude`.)

Generation 0 is the starting population: in merged mode its one proposal is the
merged starting population, whose fitness is the first bar. Kinship (of the
members' deltas from the population's base) is asked for at each generation's
end when it is tracked, steers donors, or may stop the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from mergekit_evolver.methods.de import OPERATORS
from mergekit_evolver.recipes.candidates import de_recipe_data, population_recipe_data
from mergekit_evolver.search.protocol import (
    CANDIDATE,
    GenerationEnd,
    KinshipRequest,
    Outcome,
    Proposal,
    Result,
    Start,
    fitness_stats,
    member_ref,
)
from mergekit_evolver.search.seeds import derive_rng, derive_seed


@dataclass(frozen=True)
class Offspring(Proposal):
    target: str = ""
    donors: tuple[str, ...] = ()


@dataclass(frozen=True)
class KinshipUse:
    metric: str = "pcc"
    track: bool = False
    stop_above: Optional[float] = None
    diverse_donors: bool = False

    @property
    def needed(self) -> bool:
        return self.track or self.stop_above is not None or self.diverse_donors


def child_id(generation: int, slot: int) -> str:
    return f"g{generation:03d}_s{slot:02d}"


class Evolver:
    def __init__(
        self,
        members: Sequence[str],
        fitness: Sequence[float],
        *,
        operator: str,
        mode: str,
        generations: int,
        seed: int,
        merged_fitness: Optional[float] = None,
        parameters: Optional[Mapping[str, Any]] = None,
        reference: Optional[str] = None,
        merger: Optional[Mapping[str, Any]] = None,
        base_model: Optional[str] = None,
        stats: Optional[Sequence[str]] = None,
        kinship: KinshipUse = KinshipUse(),
        update: str = "generation",
        slot_order: str = "fixed",
        donor: str = "uniform",
    ):
        if len(members) != len(fitness):
            raise ValueError("one fitness per member")
        self.members = list(members)
        self.fitness = list(fitness)
        self.operator = operator
        self.mode = mode
        self.generations = generations
        self.seed = seed
        # The DE method's parameters; each offspring's own seed takes the "seed" key.
        self.parameters = dict(parameters or {})
        self.reference = reference  # task-vector space: the base every delta is from
        self.merger = dict(merger or {"merge_method": "linear", "parameters": {"weight": 1.0}})
        self.base_model = base_model
        self.stats = list(stats) if stats is not None else None
        self.kinship_use = kinship
        self.kinship: Optional[dict[tuple[str, str], float]] = None
        self.best_merged = merged_fitness
        self.expected = generations * len(self.members) + (mode == "merged" and merged_fitness is None)
        # Merged selection replaces members at once by its nature.
        self.immediate = update == "immediate" or mode == "merged"
        self.slot_order = slot_order
        self.donor = donor
        # Generation 0 has one proposal in merged mode: the starting population merged.
        self.generation = 0
        self._order: list[int] = list(range(len(self.members)))
        self._pos = len(self.members) if mode != "merged" or merged_fitness is not None else -1
        self._snapshot = list(self.members)
        self._pending: dict[int, tuple[str, float]] = {}
        self._asked = self._told = 0
        self._counts = {"accepted": 0, "invalid": 0, "raced": 0, "evaluated": 0}
        self._table: Optional[dict[tuple[str, str], float]] = None  # this generation's end

    # -- protocol -------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.generation > self.generations

    def best_index(self) -> int:
        # Ties go to the lowest slot, so the choice is deterministic.
        return max(range(len(self.fitness)), key=lambda i: (self.fitness[i], -i))

    def needs(self) -> Optional[KinshipRequest]:
        if not self._complete or not self.kinship_use.needed or self._table is not None:
            return None
        ids = tuple(dict.fromkeys(self.members))
        return KinshipRequest(tuple((a, b) for i, a in enumerate(ids) for b in ids[i + 1:]), self.kinship_use.metric)

    def give(self, request: KinshipRequest, answer: Mapping[tuple[str, str], float]) -> None:
        self._table = {tuple(sorted(pair)): value for pair, value in answer.items()}

    @property
    def slot(self) -> Optional[int]:
        """The slot the next proposal is for (None: the merged start, or none due)."""
        return self._order[self._pos] if 0 <= self._pos < len(self._order) else None

    def ask(self) -> Optional[Proposal]:
        if self.done or self._asked > self._told:
            return None
        if self._pos == -1:
            self._asked += 1
            return Proposal(
                step="g000/merged", generation=0, role="merged",
                recipe=self.merger_recipe([member_ref(m) for m in self.members]),
            )
        if self._complete:
            return None
        self._asked += 1
        return self._offspring(self.generation, self.slot)

    def tell(self, proposal: Proposal, result: Result) -> bool:
        """Record a proposal's result (fitness None: invalid, e.g. NaN weights).
        Returns whether it was accepted. In merged mode the fitness is the merged
        population's with the offspring in its slot."""
        if proposal.generation != self.generation or proposal.slot != self.slot:
            raise ValueError(f"told {proposal.step} out of order")
        self._told += 1
        if self._pos == -1:
            self.best_merged = result.fitness
            self._pos = len(self.members)
            return False
        fitness = result.fitness
        accepted = self._accepts(proposal, fitness)
        self._counts["evaluated"] += 1
        self._counts["accepted"] += accepted
        self._counts["invalid"] += fitness is None
        self._counts["raced"] += result.raced
        if accepted and not self.immediate:
            self._pending[proposal.slot] = (proposal.child, fitness)
        elif accepted:
            if self.mode == "merged":
                self.best_merged = fitness
            self.members[proposal.slot] = proposal.child
            self.fitness[proposal.slot] = fitness
        self._pos += 1
        if self._complete:
            for slot, (member, value) in sorted(self._pending.items()):
                self.members[slot] = member
                self.fitness[slot] = value
            self._pending.clear()
        return accepted

    def end_generation(self) -> GenerationEnd:
        if not self._complete or self._asked > self._told:
            raise RuntimeError("end_generation() before every proposal of the generation was told")
        g, fits = self.generation, self.fitness
        stats: dict[str, Any] = {
            **fitness_stats(fits), **self._counts,
            "members": list(self.members), "merged": self.best_merged,
        }
        if self.kinship_use.needed:
            values = [v for v in self._table.values() if v == v]  # NaN: a delta with no variance
            stats["kinship"] = sum(values) / len(values) if values else None
            if self.kinship_use.diverse_donors:
                self.kinship = self._table
            limit = self.kinship_use.stop_above
            if limit is not None and stats["kinship"] is not None and stats["kinship"] >= limit:
                stats["stopped"] = f"mean kinship {stats['kinship']:.4f} >= {limit}"
                self.generations = g
        line = (
            f"generation {g}: best {stats['best']:.4f} mean {stats['mean']:.4f} "
            f"min {stats['min']:.4f}, accepted {stats['accepted']}/{stats['evaluated']}"
        )
        self.generation, self._pos = g + 1, 0
        self._order = self._visiting_order(g + 1)
        self._snapshot = list(self.members)
        self._counts = {"accepted": 0, "invalid": 0, "raced": 0, "evaluated": 0}
        self._table = None
        return GenerationEnd(g, stats, line)

    def result(self) -> Outcome:
        return Outcome(tuple(self.members), tuple(self.fitness))

    # -- DE -------------------------------------------------------------------
    @property
    def _complete(self) -> bool:
        return self._pos >= len(self.members)

    def _visiting_order(self, g: int) -> list[int]:
        n = len(self.members)
        if self.slot_order == "fixed":
            return list(range(n))
        return [int(i) for i in derive_rng(self.seed, "slot-order", g).permutation(n)]

    def _accepts(self, proposal: Proposal, fitness: Optional[float]) -> bool:
        """Strictly better than the parent (individual) or than the best merged
        population so far (merged); an invalid offspring never is."""
        if fitness is None:
            return False
        if self.mode == "individual":
            return fitness > self.fitness[proposal.slot]
        return self.best_merged is None or fitness > self.best_merged

    def merger_recipe(self, refs: Sequence[str]) -> dict[str, Any]:
        """The merger over members in slot order; slot i keeps model i's stats."""
        return population_recipe_data(self.merger, refs, self.base_model, stats=self.stats)

    def _offspring(self, g: int, i: int) -> Offspring:
        source = self.members if self.immediate else self._snapshot
        roles = OPERATORS[self.operator][0]
        rng = derive_rng(self.seed, "donors", g, i)
        donors: list[str] = []
        exclude = {i}
        if roles[0] == "best":
            best = self.best_index()
            donors.append(source[best])
            exclude.add(best)
        others = [j for j in range(len(source)) if j not in exclude]
        if self.donor == "annealed_best" and rng.random() >= 0.5 / (self.generations - (g - 1)) + 0.5:
            # The fittest other member (ties to the lowest slot); self.fitness
            # takes pending replacements only at the generation's end, so it
            # stands where the donors' population does.
            donors.append(source[max(others, key=lambda j: (self.fitness[j], -j))])
        else:
            picks = rng.choice(
                others, size=len(roles) - len(donors), replace=False, p=self._donor_odds(i, others, source)
            )
            donors.extend(source[int(j)] for j in picks)
        seed = derive_seed(self.seed, "offspring", g, i)
        target = source[i]
        recipe = de_recipe_data(
            self.operator, member_ref(target), [member_ref(d) for d in donors],
            {**self.parameters, "seed": seed}, reference=self.reference,
        )
        score_in = None
        if self.mode == "merged":
            trial = [member_ref(m) for m in self.members]
            trial[i] = CANDIDATE
            score_in = self.merger_recipe(trial)
        # The one comparison that decides: its parent's fitness, or the best
        # merged population's.
        bar = self.best_merged if self.mode == "merged" else self.fitness[i]
        return Offspring(
            step=f"g{g:03d}/s{i:02d}/offspring", generation=g, slot=i, recipe=recipe, bar=bar,
            parents=(target, *donors), child=child_id(g, i), like=target, score_in=score_in,
            operator=self.operator, F=self.parameters.get("F"), CR=self.parameters.get("CR"),
            seed=seed, target=target, donors=tuple(donors),
        )

    def _donor_odds(self, target: int, others: list[int], source: list[str]):
        if not self.kinship:
            return None
        # Kinship in [-1, 1]: the least related donors are the likeliest, and
        # none is ruled out, so the search can still mix close relatives.
        weights = [
            1.0 - self.kinship.get(tuple(sorted((source[target], source[j]))), 0.0) + 0.05
            for j in others
        ]
        total = sum(weights)
        return [w / total for w in weights]


def from_config(start: Start) -> Evolver:
    c = start.config
    de, pop, k = c.de, c.population, c.kinship
    return Evolver(
        list(start.members), list(start.fitness), operator=de.operator, mode=c.selection.mode,
        generations=de.generations, seed=c.seed, parameters=de.method_parameters(0),
        reference=pop.base_model if de.space == "task_vectors" else None,
        merger=c.selection.merger.template(), base_model=pop.base_model, stats=pop.stats_dirs(),
        kinship=KinshipUse(metric=k.metric, track=k.track, stop_above=k.stop_above, diverse_donors=k.diverse_donors),
        update=c.selection.update, slot_order=c.selection.slot_order, donor=de.donor,
    )
