"""Evolver (Du et al., 2024): DE over a population of whole models.

`individual` selection is classic synchronous DE: every offspring of a
generation is built from the population as it stood when the generation began,
competes with its own parent on dev fitness, and replaces it only if strictly
better. `merged` selection follows the paper's Evolver+merger code: slots are
visited in turn, an offspring temporarily takes slot i, and it stays only if
the merged population's fitness strictly beats the best seen so far. There a
member's fitness is the merged fitness it was accepted at (initial members:
their own), used only to pick the `best` donor of best/1 operators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mergekit_evolver.methods.de import OPERATORS
from mergekit_evolver.search.seeds import derive_rng, derive_seed


@dataclass(frozen=True)
class Proposal:
    step: str
    generation: int
    slot: int
    operator: str
    target: str
    donors: tuple[str, ...]
    seed: int


class Evolver:
    def __init__(
        self,
        members: list[str],
        fitness: list[float],
        *,
        operator: str,
        mode: str,
        generations: int,
        seed: int,
        merged_fitness: Optional[float] = None,
    ):
        if len(members) != len(fitness):
            raise ValueError("one fitness per member")
        self.members = list(members)
        self.fitness = list(fitness)
        self.operator = operator
        self.mode = mode
        self.generations = generations
        self.seed = seed
        self.best_merged = merged_fitness
        self.generation = 1
        self.slot = 0
        self._snapshot = list(self.members)
        self._pending: dict[int, tuple[str, float]] = {}

    @property
    def done(self) -> bool:
        return self.generation > self.generations

    def best_index(self) -> int:
        # Ties go to the lowest slot, so the choice is deterministic.
        return max(range(len(self.fitness)), key=lambda i: (self.fitness[i], -i))

    def ask(self) -> Optional[Proposal]:
        if self.done:
            return None
        g, i = self.generation, self.slot
        source = self._snapshot if self.mode == "individual" else self.members
        roles = OPERATORS[self.operator][0]
        rng = derive_rng(self.seed, "donors", g, i)
        donors: list[str] = []
        exclude = {i}
        if roles[0] == "best":
            best = self.best_index()
            donors.append(source[best])
            exclude.add(best)
        others = [j for j in range(len(source)) if j not in exclude]
        picks = rng.choice(
            others, size=len(roles) - len(donors), replace=False, p=self._donor_odds(i, others, source)
        )
        donors.extend(source[int(j)] for j in picks)
        return Proposal(
            step=f"g{g:03d}/s{i:02d}/offspring",
            generation=g,
            slot=i,
            operator=self.operator,
            target=source[i],
            donors=tuple(donors),
            seed=derive_seed(self.seed, "offspring", g, i),
        )

    def set_kinship(self, kinship: Optional[dict[tuple[str, str], float]]) -> None:
        """Pairwise kinship of current members, for diversity-preserving donor
        choice; None (the default) draws donors uniformly."""
        self.kinship = kinship

    def _donor_odds(self, target: int, others: list[int], source: list[str]):
        kinship = getattr(self, "kinship", None)
        if not kinship:
            return None
        # Kinship in [-1, 1]: the least related donors are the likeliest, and
        # none is ruled out, so the search can still mix close relatives.
        weights = [
            1.0 - kinship.get(tuple(sorted((source[target], source[j]))), 0.0) + 0.05
            for j in others
        ]
        total = sum(weights)
        return [w / total for w in weights]

    def stop(self) -> None:
        """End the search after the current generation (e.g. kinship saturated)."""
        self.generations = self.generation - 1

    def tell(self, proposal: Proposal, fitness: Optional[float], member: str) -> bool:
        """Record the offspring's fitness (None: invalid, e.g. NaN weights).
        Returns whether it was accepted. In merged mode `fitness` is the merged
        population's fitness with the offspring in its slot."""
        if (proposal.generation, proposal.slot) != (self.generation, self.slot):
            raise ValueError(f"told {proposal.step} out of order")
        accepted = self.accepts(proposal, fitness)
        if accepted and self.mode == "individual":
            self._pending[proposal.slot] = (member, fitness)
        elif accepted:
            self.best_merged = fitness
            self.members[proposal.slot] = member
            self.fitness[proposal.slot] = fitness
        self._advance()
        return accepted

    def accepts(self, proposal: Proposal, fitness: Optional[float]) -> bool:
        """Strictly better than the parent (individual) or than the best merged
        population so far (merged); an invalid offspring never is."""
        if fitness is None:
            return False
        if self.mode == "individual":
            return fitness > self.fitness[proposal.slot]
        return self.best_merged is None or fitness > self.best_merged

    def _advance(self) -> None:
        self.slot += 1
        if self.slot < len(self.members):
            return
        for slot, (member, fitness) in sorted(self._pending.items()):
            self.members[slot] = member
            self.fitness[slot] = fitness
        self._pending.clear()
        self.generation += 1
        self.slot = 0
        self._snapshot = list(self.members)
