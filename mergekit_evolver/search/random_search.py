"""Random search over the recipe genome: the example of a new strategy (see the
README's design section), and the floor any recipe optimizer must beat."""

from __future__ import annotations

from mergekit_evolver.search.protocol import GenerationEnd, NoInputs, Outcome, Proposal, Result, Start
from mergekit_evolver.search.recipe_space import genome_from_config
from mergekit_evolver.search.seeds import derive_rng


class RandomSearch(NoInputs):
    def __init__(self, genome, budget: int, seed: int):
        self.genome, self.expected, self.rng = genome, budget, derive_rng(seed, "random-search")
        self.asked, self.ended, self.best = 0, 0, None  # best: (fitness, step, recipe)

    done = property(lambda self: self.ended == self.expected)

    def ask(self) -> Proposal | None:
        if self.asked > self.ended or self.done:
            return None  # a generation is one candidate: told, then ended
        self.asked += 1
        x = self.rng.uniform(*self.genome.box())
        return Proposal(step=f"random/e{self.ended:04d}", generation=self.ended, role="search", recipe=self.genome.recipe(x))

    def tell(self, proposal: Proposal, result: Result) -> bool:
        better = result.valid and (self.best is None or result.fitness > self.best[0])
        self.best = (result.fitness, proposal.step, dict(proposal.recipe)) if better else self.best
        return better

    def end_generation(self) -> GenerationEnd:
        self.ended += 1
        best = self.best[0] if self.best else None
        return GenerationEnd(self.ended - 1, {"best": best, "evaluations": self.ended}, f"random search: {self.ended} scored, best {best}")

    def result(self) -> Outcome:
        if self.best is None:
            raise ValueError("random search: every candidate was invalid")
        return Outcome(("search_best",), (self.best[0],), recipe=self.best[2], best_step=self.best[1])


def from_config(start: Start) -> RandomSearch:
    return RandomSearch(genome_from_config(start), start.config.search.budget, start.config.seed)
