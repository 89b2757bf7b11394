"""Recipe-space search against the weight-space Evolver at one evaluation budget.

Run: .venv/bin/python benchmarks/recipe_search.py [--seeds 0,1,2] [--budget 60] [--runs runs/recipe]

On the testbed (built or reused), per seed, each contender scores `budget`
candidates on the dev tasks, beyond the four specialists every contender
starts from:
- Recipe DE: rand/1/bin (population 10, F 0.5, CR 0.9) over task_arithmetic
  weights per layer (layer_granularity 1) and per filter (self_attn, mlp,
  the rest): 2 x 4 x 3 = 24 parameters, starting from the default recipe;
- Recipe CMA-ES: the same genome, sigma0 1/6, pycma's population size;
- Default recipe: task_arithmetic with uniform weights 1/4 (one candidate);
- Evolver: mergekit_evolver/examples/demo.yml with budget/4 generations;
- Hybrid: recipe DE (or CMA-ES) for half the budget, then the Evolver over
  the four specialists plus the best recipe's model for the other half.

Prints mean held-out in-domain and OOD test accuracy, mean +- sample std over
seeds, and how many candidates each scored before one beat the default
recipe's dev fitness (for the Evolver, 0 when a starting specialist already
does: it can return one). Run dirs
are kept, so a rerun only reprints.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.run import evolve
from testbed_runs import apply_changes, fmt, group_means, parse_args, testbed_for

GENOME = {"merge_method": "task_arithmetic", "layer_granularity": 1, "filters": ["self_attn", "mlp"]}


def contenders(budget: int) -> dict[str, dict]:
    half = budget // 2
    return {
        "Recipe DE": {"strategy": "recipe", "search": {**GENOME, "optimizer": "de", "budget": budget}},
        "Recipe CMA-ES": {"strategy": "recipe", "search": {**GENOME, "optimizer": "cmaes", "budget": budget}},
        "Default recipe": {"strategy": "recipe", "search": {**GENOME, "optimizer": "de", "budget": 1}},
        "Evolver": {"de": {"generations": budget // 4}},
        "Hybrid": {
            "strategy": "recipe",
            "search": {**GENOME, "optimizer": "de", "budget": half, "hybrid": True},
            "de": {"generations": (budget - half) // 5},
        },
        "Hybrid (CMA-ES)": {
            "strategy": "recipe",
            "search": {**GENOME, "optimizer": "cmaes", "budget": half, "hybrid": True},
            "de": {"generations": (budget - half) // 5},
        },
    }


def config_for(change: dict, seed: int, config_file: Path) -> EvolveConfig:
    data = copy.deepcopy(yaml.safe_load(os.path.expandvars(config_file.read_text())))
    data["seed"] = seed
    data["report"]["baselines"] = []
    apply_changes(data, change)
    return EvolveConfig.model_validate(data)


def scored_in_order(ledger: Ledger) -> tuple[list[float], list[float]]:
    """Dev fitness of the starting models, then of every candidate in the
    order they were scored (recipe candidates, then weight-space offspring)."""
    start, later = [], []
    for c in ledger.candidates():
        if c.step.startswith("init/m"):
            start.append(c.fitness)
        elif c.role in ("search", "offspring") and c.status != "invalid":
            later.append(c.fitness)
    return start, later


def evaluations_to_beat(target: float, start: list[float], later: list[float], weight_space: bool) -> Optional[int]:
    """Candidates scored until one beat `target` on dev. A weight-space run's
    starting models are members it can return (0 when one already beats it);
    a recipe search can only return recipes, so only its candidates count."""
    if weight_space and max(start) > target:
        return 0
    return next((k + 1 for k, f in enumerate(later) if f > target), None)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/recipe", budget=60)
    seeds = args.seeds
    testbed_for(args)

    results: dict[str, dict[str, list]] = {}
    for name, change in contenders(args.budget).items():
        for seed in seeds:
            config = config_for(change, seed, Path(args.config))
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            run_dir = Path(args.runs) / f"{slug}_b{args.budget}_seed{seed}"
            resume = (run_dir / "ledger.sqlite").exists()
            evolve(config, run_dir, resume=resume, log=lambda *_: None)
            ledger = Ledger(run_dir)
            row = results.setdefault(name, {})
            final = ledger.find("report/evolved")
            for group, value in group_means(final, config).items():
                row.setdefault(group, []).append(value)
            start, later = scored_in_order(ledger)
            row.setdefault("dev", []).append(final.fitness)
            row.setdefault("trace", []).append((start, later))
            row.setdefault("scored", []).append(len(later))
            ledger.close()
    default_dev = results["Default recipe"]["dev"][0]  # deterministic: one recipe
    print(f"seeds {seeds}; budget {args.budget} candidates on dev; test = 200 items/task; "
          f"default recipe dev fitness {default_dev:.4f}")
    print("| contender | candidates scored | mean in-domain test | mean OOD test | dev fitness | candidates to beat the default recipe on dev |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        weight_space = "strategy" not in contenders(args.budget)[name]
        reach = [evaluations_to_beat(default_dev, s, l, weight_space) for s, l in row["trace"]]
        reach_text = "-" if name == "Default recipe" else f"{fmt(reach)} (per seed: {', '.join(map(str, reach))})"
        print(f"| {name} | {fmt(row['scored'])} | {fmt(row['in_domain'])} | {fmt(row['ood'])} | "
              f"{fmt(row['dev'])} | {reach_text} |")


if __name__ == "__main__":
    main()
