"""Recipe-space search as a run: the glue between an optimizer (search/
vector_de.py or search/cmaes.py), the genome (recipe_genome.py) and the run's
one merge path, evaluation path and ledger (run.py).

Candidate k is scored inside `run.step("search/e{k:04d}")`. The optimizer is
seeded and told only what the ledger holds, so a resumed run asks exactly the
same vectors again and replays their fitness instead of scoring them; each
replayed row's recipe is checked against the asked one.

The best recipe (highest dev fitness, the earliest on a tie) is exported as
plain mergekit YAML (best_recipe.yml). With `search.hybrid`, its merged model
joins population.models as a weight-space member and the Evolver runs on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergekit.config import MergeConfiguration
from tqdm import tqdm

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.errors import UserError
from mergekit_evolver.ledger.store import Candidate
from mergekit_evolver.merging.merge import parse_merge_config, recipe_yaml
from mergekit_evolver.population.store import read_json
from mergekit_evolver.recipes.genome import NEEDS_BASE, GenomeError, RecipeGenome
from mergekit_evolver.run.context import Member, Run, write_generations_log
from mergekit_evolver.search.cmaes import CMAES
from mergekit_evolver.search.seeds import derive_rng
from mergekit_evolver.search.vector_de import Trial, VectorDE

BEST_RECIPE_FILE = "best_recipe.yml"
DE_POPULATION = 10


@dataclass
class Best:
    recipe: MergeConfiguration
    fitness: float
    step: str


def build_genome(config: EvolveConfig) -> RecipeGenome:
    """The genome over population.models; bad settings are one-line errors."""
    s, pop = config.search, config.population
    layers = read_json(Path(pop.models[0]) / "config.json").get("num_hidden_layers")
    if not isinstance(layers, int):
        raise UserError(f"{pop.models[0]}/config.json has no num_hidden_layers to group layers by")
    try:
        genome = RecipeGenome(
            merge_method=s.merge_method,
            models=tuple(pop.models),
            num_layers=layers,
            base_model=pop.base_model if s.merge_method in NEEDS_BASE else None,
            layer_granularity=s.layer_granularity,
            filters=tuple(s.filters),
            smooth=s.smooth,
            normalize=s.normalize,
            allow_negative_weights=s.allow_negative_weights,
            bounds=dict(s.bounds),
            start=dict(s.start),
            tokenizer_source=s.tokenizer_source,
        )
    except GenomeError as e:
        raise UserError(f"search: {e}") from None
    parse_merge_config(genome.recipe(genome.default()), where="search (default recipe)")
    return genome


def make_optimizer(config: EvolveConfig, genome: RecipeGenome):
    s = config.search
    lo, hi = genome.box()
    x0 = derive_rng(config.seed, "search-start").uniform(lo, hi) if s.random_start else genome.default()
    try:
        if s.optimizer == "cmaes":
            return CMAES(lo, hi, x0=x0, sigma0=s.sigma0, population_size=s.population_size, seed=config.seed)
        return VectorDE(
            lo, hi, population_size=s.population_size or DE_POPULATION, strategy=s.de_strategy,
            F=s.F, CR=s.CR, jde=s.jde, mode=s.mode, bounds=s.boundary, seed=config.seed, x0=x0,
        )
    except ValueError as e:
        raise UserError(f"search: {e}") from None


class RecipeSearch:
    def __init__(self, run: Run):
        self.run = run
        self.settings = run.config.search
        self.genome: RecipeGenome = run.genome
        self.optimizer = make_optimizer(run.config, self.genome)
        self.best: Optional[Best] = None
        self.generation = 0
        self.used = 0

    def search(self) -> Best:
        budget, steady = self.settings.budget, self.settings.mode == "steady"
        # Steady DE asks one trial at a time; a logged generation is then a population's worth.
        per_generation = len(self.optimizer.pop) if steady else None
        bar = tqdm(total=budget, desc="candidates", unit="cand", leave=False)
        rows: list[Candidate] = []
        start = time.perf_counter()
        while self.used < budget:
            asked = self.optimizer.ask()
            trials = asked[: budget - self.used]
            fitness = []
            recipes = [self.recipe(trial) for trial in trials]
            for k, trial in enumerate(trials):
                row = self.candidate(trial, *recipes[k], upcoming=recipes[k + 1][1] if k + 1 < len(trials) else None)
                rows.append(row)
                fitness.append(row.fitness if row.status != "invalid" else None)
                bar.update(1)
            # CMA-ES learns from whole generations; a cut-off last one ends the run anyway.
            if len(trials) == len(asked) or isinstance(self.optimizer, VectorDE):
                self.optimizer.tell(trials, fitness)
            initial = any(t.initial for t in trials)
            if not steady or initial or len(rows) == per_generation or self.used == budget:
                self.end_generation(rows, time.perf_counter() - start)
                rows, start = [], time.perf_counter()
        bar.close()
        if self.best is None:
            raise UserError("search: every candidate recipe was invalid (non-finite weights)")
        return self.best

    def recipe(self, trial: Trial) -> tuple[MergeConfiguration, str]:
        recipe = parse_merge_config(self.genome.recipe(trial.x), where="search")
        return recipe, recipe_yaml(recipe)

    def candidate(
        self, trial: Trial, recipe: MergeConfiguration, text: str, upcoming: Optional[str] = None
    ) -> Candidate:
        """Score one trial; `upcoming` is the next trial's recipe, which the
        merge-ahead worker makes while this one is scored."""
        run, step = self.run, f"search/e{self.used:04d}"

        def compute() -> Candidate:
            base = dict(
                step=step, generation=self.generation, slot=trial.slot, role="search",
                recipe=text, operator=self.operator, seed=run.config.seed,
                F=trial.F if not trial.initial else None, CR=trial.CR if not trial.initial else None,
                note="initial" if trial.initial else None,
            )
            weights = run.merge_candidate(recipe, step, text)
            if upcoming is not None:
                run.expect(upcoming)
            if weights.invalid:
                return Candidate(**base, status="invalid", merge_s=weights.merge_s, note=weights.invalid)
            fitness, scores, seconds, _ = run.score(weights.state, run.dev, weights.content_hash)
            return Candidate(
                **base, status="scored", fitness=fitness, dev=scores, merge_s=weights.merge_s,
                eval_s=seconds,
            )

        row = run.step(step, compute)
        if row.recipe != text:
            raise RuntimeError(f"{step}: the ledger holds another recipe; the run cannot be replayed")
        self.used += 1
        if row.status != "invalid" and (self.best is None or row.fitness > self.best.fitness):
            self.best = Best(recipe, row.fitness, step)
        return row

    @property
    def operator(self) -> str:
        s = self.settings
        if s.optimizer == "cmaes":
            return "cma-es"
        return f"de {s.de_strategy}" + (" jDE" if s.jde else "") + (" steady" if s.mode == "steady" else "")

    def end_generation(self, rows: list[Candidate], seconds: float) -> None:
        fits = [r.fitness for r in rows if r.status != "invalid"]
        stats = {
            "phase": "recipe",
            "best": self.best.fitness if self.best else None,
            "mean": sum(fits) / len(fits) if fits else None,
            "min": min(fits) if fits else None,
            "evaluated": len(rows),
            "invalid": len(rows) - len(fits),
            "evaluations": self.used,
            "seconds": round(seconds, 3),
        }
        run = self.run
        run.ledger.record_generation(self.generation, stats)
        write_generations_log(run.run_dir, run.ledger)
        best = "-" if stats["best"] is None else f"{stats['best']:.4f}"
        run.log(f"recipe generation {self.generation}: best {best}, {self.used} candidates scored")
        self.generation += 1


def write_best_recipe(run: Run, best: Best) -> Path:
    """The best recipe as plain mergekit YAML, with how to reproduce the model."""
    path = run.run_dir / BEST_RECIPE_FILE
    header = (
        f"# The best recipe of this run: dev fitness {best.fitness:.6f} ({best.step}).\n"
        "# Plain mergekit (no plugin) writes the run's model from it bit for bit:\n"
        f"#   mergekit-yaml {BEST_RECIPE_FILE} OUT --random-seed {run.config.seed}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + recipe_yaml(best.recipe), encoding="utf-8")
    tmp.replace(path)
    return path


def recipe_strategy(run: Run, members: list[Member]) -> tuple[list[Member], Optional[MergeConfiguration]]:
    """The search, then (hybrid) the Evolver. Returns the final members and,
    without hybrid, the best recipe, which is then the final model's recipe."""
    searcher = RecipeSearch(run)
    best = searcher.search()
    write_best_recipe(run, best)
    if not run.config.search.hybrid:
        return [Member("search_best", run.run_dir / BEST_RECIPE_FILE, best.fitness)], best.recipe
    dest = run.population_dir / "search_best"

    def seed_member() -> Candidate:
        run.materialize(best.recipe, dest)
        return Candidate(
            step="search/best", generation=searcher.generation, role="member", status="accepted",
            recipe=recipe_yaml(best.recipe), fitness=best.fitness, member=str(dest), note=best.step,
        )

    run.step("search/best", seed_member)
    run.generation_offset = searcher.generation
    return run.evolve([*members, Member("search_best", dest, best.fitness)]), None
