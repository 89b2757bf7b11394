"""After the search: baselines, the final model, the held-out report."""

from __future__ import annotations

from pathlib import Path

from mergekit.config import MergeConfiguration

from mergekit_evolver.ledger import Candidate, Role, Status
from mergekit_evolver.recipes.parse import recipe_yaml
from mergekit_evolver.population.store import load_state
from mergekit_evolver.recipes.candidates import BASELINES_NEED_BASE, baseline_recipes, single_model_recipe
from mergekit_evolver.run.context import Member, Run


def baselines(run: Run, inputs: list[Path]) -> list[tuple[str, MergeConfiguration, float]]:
    """Each baseline at the grid point with the best dev fitness."""
    chosen = []
    base = run.config.population.base_model
    for name in run.config.report.baselines:
        if name in BASELINES_NEED_BASE and not base:
            run.log(f"baseline {name} skipped: population.base_model is not set")
            continue
        best = None
        stats = run.config.population.stats_dirs()
        for k, recipe in enumerate(baseline_recipes(name, inputs, base, stats)):
            c = run.scored_recipe(f"baseline/{name}/{k}", recipe, Role.BASELINE, note=name)
            if best is None or c.fitness > best[2]:
                best = (name, recipe, c.fitness)
        chosen.append(best)
    return chosen


def final_recipe(run: Run, members: list[Member]) -> MergeConfiguration:
    if run.config.output.kind == "merged":
        return run.merger_recipe([m.path for m in members])
    best = max(range(len(members)), key=lambda i: (members[i].fitness, -i))
    return single_model_recipe(members[best].path)


def write_model(run: Run, recipe: MergeConfiguration) -> Path:
    return run.materialize(recipe, run.run_dir / "model", copy_tokenizer=True)


def report(run: Run, entries: list[tuple[str, MergeConfiguration | Path]]) -> None:
    """Score each entry on the held-out suite; dev fitness rides along."""
    for label, source in entries:
        def compute(label=label, source=source) -> Candidate:
            if isinstance(source, Path):
                state, recipe = load_state(source), None
            else:
                state, recipe = run.merge(source), recipe_yaml(source)
            dev = run.score(state)
            test = {}
            if run.report_suite is not None:
                test = run.score(state, run.report_suite).scores
            return Candidate(
                step=f"report/{label}", generation=0, role=Role.REPORT, status=Status.SCORED,
                recipe=recipe, fitness=dev.fitness, dev=dev.scores, test=test, note=label,
                content_hash=dev.content_hash,
            )

        run.step(f"report/{label}", compute)
