"""The testbed comparison table: specialists, baselines and evolved models over seeds.

Run: .venv/bin/python benchmarks/testbed_comparison.py [--seeds 0,1,2] [--runs runs/compare]

Builds (or reuses) the testbed and each specialist's RegMean/Fisher statistics
(collected on its own dev split), then runs, per seed, every variant below with
the same evaluation budget (generations x population). Selection uses dev tasks
only. Prints held-out means over the in-domain test tasks and the two OOD
tasks, as mean +- sample std over seeds (specialists and deterministic
baselines have no spread). Run dirs are kept, so a rerun only reprints.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.run import evolve
from mergekit_evolver.stats.collect import Source, collect_to_dir
from testbed_runs import apply_changes, fmt, group_means, parse_args, testbed_for


VARIANTS = {
    "Evolver": {},
    "Evolver+RegMean": {
        "selection": {"mode": "merged", "merger": {"merge_method": "regmean", "parameters": {"alpha": 0.9}}},
        "output": {"kind": "merged"},
    },
    "Evolver+Fisher": {
        "selection": {"mode": "merged", "merger": {"merge_method": "fisher"}},
        "output": {"kind": "merged"},
    },
    # Same budget as the Evolver: at most generations x population merged
    # candidates scored (it may stop sooner when nothing improves).
    "Kinship greedy (slerp)": {
        "strategy": "kinship_greedy",
        "greedy": {"merge_method": "slerp", "parameters": {"t": 0.5}, "top_k": 3, "max_rounds": 10},
    },
}


def specialist_stats(testbed) -> list[str]:
    dirs = []
    for family in testbed.families:
        out = testbed.root / "stats" / family
        if not (out / "manifest.json").is_file():
            collect_to_dir(
                str(testbed.specialists[family]),
                Source(testbed.dev_task(family), (str(testbed.include_path),)),
                str(out),
                kinds=("gram", "fisher"),
                device="cpu",
            )
        dirs.append(str(out))
    return dirs


def config_for(variant: dict, seed: int, stats: list[str], config_file: Path) -> EvolveConfig:
    data = yaml.safe_load(os.path.expandvars(config_file.read_text()))
    data = copy.deepcopy(data)
    data["seed"] = seed
    data["population"]["stats"] = stats
    data["report"]["baselines"] = ["average", "task_arithmetic", "ties", "dare_ties", "regmean", "fisher"]
    apply_changes(data, variant)
    if data.get("strategy") == "kinship_greedy":
        data["greedy"]["budget"] = data["de"]["generations"] * len(data["population"]["models"])
    return EvolveConfig.model_validate(data)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/compare")
    seeds = args.seeds
    testbed = testbed_for(args)
    stats = specialist_stats(testbed)

    rows: dict[str, dict[str, list[float]]] = {}
    budget = None
    for name, variant in VARIANTS.items():
        for seed in seeds:
            config = config_for(variant, seed, stats, Path(args.config))
            budget = config.de.generations * len(config.population.models)
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            run_dir = Path(args.runs) / f"{slug}_seed{seed}"
            resume = (run_dir / "ledger.sqlite").exists()
            evolve(config, run_dir, resume=resume, log=lambda *_: None)
            ledger = Ledger(run_dir)
            for c in ledger.candidates("report"):
                label = name if c.note == "evolved" else c.note
                if c.note != "evolved" and name != "Evolver":
                    continue  # inputs and baselines: once, from the Evolver runs
                means = group_means(c, config)
                for group, value in means.items():
                    rows.setdefault(label, {}).setdefault(group, []).append(value)
            ledger.close()

    print(f"seeds {seeds}; each evolved model: {budget} offspring scored on dev; test = 200 items/task")
    print("| model | mean in-domain test | mean OOD test |")
    print("|---|---|---|")
    for label, groups in rows.items():
        print(f"| {label} | {fmt(groups['in_domain'])} | {fmt(groups['ood'])} |")


if __name__ == "__main__":
    main()
