"""Recipe-space search (the mergekit-evolve successor) as a strategy: an
optimizer over vectors (search/vector_de.py or search/cmaes.py) behind the
search protocol, with the genome (recipes/genome.py) turning each vector into a
mergekit recipe over population.models.

Candidate k is step "search/e{k:04d}". The optimizer is seeded and told only
what the loop learnt (from the ledger on a resume), so a resumed run asks the
same vectors again. An optimizer batch is a generation; in steady mode a
generation is a population's worth of single trials. The best recipe (highest
dev fitness, the earliest on a tie) is the final model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mergekit_evolver.errors import UserError
from mergekit_evolver.recipes.genome import METHODS_WITH_BASE, RecipeGenome
from mergekit_evolver.search.cmaes import CMAES
from mergekit_evolver.search.protocol import (
    GenerationEnd,
    NoInputs,
    Outcome,
    Proposal,
    Result,
    Start,
    fitness_stats,
)
from mergekit_evolver.search.seeds import derive_rng
from mergekit_evolver.search.vector_de import Trial, VectorDE

DE_POPULATION = 10


@dataclass(frozen=True)
class RecipeTrial(Proposal):
    trial: Optional[Trial] = None

    def __eq__(self, other: object) -> bool:  # numpy vectors do not compare to one bool
        return isinstance(other, RecipeTrial) and other.step == self.step

    __hash__ = Proposal.__hash__


class RecipeSpaceSearch(NoInputs):
    def __init__(self, genome: RecipeGenome, optimizer, *, budget: int, operator: str, seed: int, steady: bool = False):
        self.genome = genome
        self.optimizer = optimizer
        self.budget = budget
        self.expected = budget
        self.operator = operator
        self.seed = seed
        self.steady = steady
        # Steady DE asks one trial at a time; a logged generation is then a population's worth.
        self.per_generation = len(optimizer.pop) if steady else None
        self.used = 0
        self.generation = 0
        self.best: Optional[tuple[float, str, dict[str, Any]]] = None  # fitness, step, recipe
        self._batch: list[RecipeTrial] = []  # the optimizer batch being asked and told
        self._asked = 0
        self._fitness: list[Optional[float]] = []
        self._rows: list[Optional[float]] = []  # this generation's told fitness (None: invalid)
        self._raced = 0
        self._initial = False
        self._closing = False  # a generation is over; end_generation() is due

    def recipes_to_check(self) -> list[dict[str, Any]]:
        """The default recipe, checked at the door like a user's own."""
        return [self.genome.recipe(self.genome.default())]

    @property
    def done(self) -> bool:
        return self.used >= self.budget and not self._closing

    def ask(self) -> Optional[Proposal]:
        if self._closing or self.used >= self.budget or self._asked > len(self._fitness):
            return None
        if self._asked == len(self._batch):
            trials = self.optimizer.ask()
            self._full = len(trials)
            self._batch = [self._proposal(t, self.used + k) for k, t in enumerate(trials[: self.budget - self.used])]
            self._asked, self._fitness = 0, []
        proposal = self._batch[self._asked]
        self._asked += 1
        return proposal

    def tell(self, proposal: Proposal, result: Result) -> bool:
        if self._asked != len(self._fitness) + 1 or self._batch[len(self._fitness)].step != proposal.step:
            raise ValueError(f"told {proposal.step} out of order")
        self.used += 1
        fitness = result.fitness
        self._fitness.append(fitness)
        if result.raced:
            self._raced += 1  # its fitness is a bound, not a score: left out of mean/min
        else:
            self._rows.append(fitness)
        self._initial = self._initial or proposal.trial.initial
        better = fitness is not None and (self.best is None or fitness > self.best[0])
        if better:
            self.best = (fitness, proposal.step, dict(proposal.recipe))
        if len(self._fitness) == len(self._batch):
            trials = [p.trial for p in self._batch]
            # CMA-ES learns from whole generations; a cut-off last one ends the run anyway.
            if len(trials) == self._full or isinstance(self.optimizer, VectorDE):
                self.optimizer.tell(trials, self._fitness)
            full = len(self._rows) + self._raced == self.per_generation
            self._closing = not self.steady or self._initial or full or self.used == self.budget
        return better

    def end_generation(self) -> GenerationEnd:
        if not self._closing:
            raise RuntimeError("end_generation() before the generation's trials were told")
        fits = [f for f in self._rows if f is not None]
        stats = {
            "phase": "recipe",
            "best": self.best[0] if self.best else None,
            "mean": fitness_stats(fits)["mean"],
            "min": fitness_stats(fits)["min"],
            "evaluated": len(self._rows) + self._raced,
            "invalid": len(self._rows) - len(fits),
            "raced": self._raced,
            "evaluations": self.used,
        }
        best = "-" if stats["best"] is None else f"{stats['best']:.4f}"
        end = GenerationEnd(self.generation, stats, f"recipe generation {self.generation}: best {best}, {self.used} candidates scored")
        self.generation += 1
        self._rows, self._raced, self._initial, self._closing = [], 0, False, False
        return end

    def result(self) -> Outcome:
        if self.best is None:
            raise UserError("search: every candidate recipe was invalid (non-finite weights)")
        fitness, step, recipe = self.best
        return Outcome(("search_best",), (fitness,), recipe=recipe, best_step=step)

    def _proposal(self, trial: Trial, k: int) -> RecipeTrial:
        # DE keeps a trial at least as fit as its target; CMA-ES ranks every
        # sample (its update uses the whole ranking), so it has no bar.
        bar = None
        if isinstance(self.optimizer, VectorDE) and not trial.initial:
            bar = float(self.optimizer.fit[trial.slot])
        return RecipeTrial(
            bar=bar, bar_strict=False, sets_bar=isinstance(self.optimizer, VectorDE),
            step=f"search/e{k:04d}", generation=self.generation, role="search", slot=trial.slot,
            recipe=self.genome.recipe(trial.x), operator=self.operator, seed=self.seed,
            F=None if trial.initial else trial.F, CR=None if trial.initial else trial.CR,
            note="initial" if trial.initial else None, trial=trial,
        )


def operator_label(optimizer: str, de_strategy: str, jde: bool, mode: str) -> str:
    if optimizer == "cmaes":
        return "cma-es"
    return f"de {de_strategy}" + (" jDE" if jde else "") + (" steady" if mode == "steady" else "")


def genome_from_config(start: Start) -> RecipeGenome:
    """The genome a config's `search:` section describes over population.models."""
    s, pop = start.config.search, start.config.population
    if not isinstance(start.num_layers, int):
        raise UserError(f"{pop.models[0]}/config.json has no num_hidden_layers to group layers by")
    try:
        return RecipeGenome(
            merge_method=s.merge_method,
            models=tuple(pop.models),
            num_layers=start.num_layers,
            base_model=pop.base_model if s.merge_method in METHODS_WITH_BASE else None,
            layer_granularity=s.layer_granularity,
            filters=tuple(s.filters),
            smooth=s.smooth,
            normalize=s.normalize,
            allow_negative_weights=s.allow_negative_weights,
            bounds=dict(s.bounds),
            start=dict(s.start),
            tokenizer_source=s.tokenizer_source,
        )
    except ValueError as e:  # GenomeError
        raise UserError(f"search: {e}") from None


def from_config(start: Start) -> RecipeSpaceSearch:
    """The optimizer and genome a config's `search:` section describes; bad
    settings are one-line errors."""
    config, s = start.config, start.config.search
    genome = genome_from_config(start)
    try:
        optimizer = make_optimizer(config, genome)
    except ValueError as e:
        raise UserError(f"search: {e}") from None
    return RecipeSpaceSearch(
        genome, optimizer, budget=s.budget, seed=config.seed, steady=s.mode == "steady",
        operator=operator_label(s.optimizer, s.de_strategy, s.jde, s.mode),
    )


def make_optimizer(config, genome: RecipeGenome):
    s = config.search
    lo, hi = genome.box()
    x0 = derive_rng(config.seed, "search-start").uniform(lo, hi) if s.random_start else genome.default()
    if s.optimizer == "cmaes":
        return CMAES(lo, hi, x0=x0, sigma0=s.sigma0, population_size=s.population_size, seed=config.seed)
    return VectorDE(
        lo, hi, population_size=s.population_size or DE_POPULATION, strategy=s.de_strategy,
        F=s.F, CR=s.CR, jde=s.jde, mode=s.mode, bounds=s.boundary, seed=config.seed, x0=x0,
    )
