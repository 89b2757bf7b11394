"""The evidence: every contender on both testbeds at one budget, and the papers' claims.

Run: .venv/bin/python benchmarks/evidence.py [--kinds merge_friendly,disjoint]
     [--seeds 0,1,2,3,4] [--budget 40] [--runs runs/evidence] [--only NAME,...]

Per testbed kind (built or reused in .testbed/<kind>, each specialist's
RegMean/Fisher statistics collected on its own dev split) and per seed, each
search contender scores `budget` candidates on the dev tasks beyond the four
specialists it starts from. Settings are chosen on dev only:
- the baselines pick their grid point by dev fitness (recipes/candidates.py);
- Evolver+TIES and Evolver+RegMean use the density / alpha their baseline
  chose on dev in the same seed's Evolver run;
- F, CR and the operator are examples/demo.yml's (chosen on the disjoint
  testbed's dev tasks); the recipe genome is benchmarks/recipe_search.py's.
Kinship greedy (slerp t=0.5) draws nothing at random: it runs once per kind.

Prints, per kind, held-out in-domain and OOD test means (mean +- sample std
over seeds), then the claims as pass/fail rows with their numbers. Run dirs are
kept, so a rerun only reprints; a contender or seed not run yet is left out.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path
from typing import Optional

import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.recipes.candidates import BASELINES
from mergekit_evolver.run import evolve
from mergekit_evolver.testbed import PRESETS, build_testbed
from recipe_search import GENOME
from testbed_comparison import specialist_stats
from testbed_runs import apply_changes, ROOT, fmt, group_means

BASELINE_ROWS = ["average", "task_arithmetic", "ties", "dare_ties", "regmean", "fisher"]
DETERMINISTIC = {"Kinship greedy", "Kinship greedy, no exploration"}


def merged(method: str, **parameters) -> dict:
    return {"selection": {"mode": "merged", "merger": {"merge_method": method, "parameters": parameters}},
            "output": {"kind": "merged"}}


def contenders(budget: int, chosen: dict) -> dict[str, dict]:
    """name -> config changes; `chosen` holds the dev-chosen merger settings."""
    gens = budget // 4
    half = budget // 2
    greedy = {"merge_method": "slerp", "parameters": {"t": 0.5}, "top_k": 3, "max_rounds": 10,
              "budget": budget, "stop_kinship": None}
    return {
        "Evolver": {"de": {"generations": gens}},
        "Evolver, authors' options (annealed_best donor, immediate update)": {
            "de": {"generations": gens, "donor": "annealed_best"}, "selection": {"update": "immediate"}},
        "Evolver+average": {"de": {"generations": gens}, **merged("linear", weight=1.0)},
        "Evolver+average, permuted slots": {
            "de": {"generations": gens},
            **{**merged("linear", weight=1.0), "selection": {**merged("linear", weight=1.0)["selection"],
                                                              "slot_order": "permuted"}}},
        "Evolver+TIES": {"de": {"generations": gens}, **merged("ties", weight=1.0, density=chosen["ties"])},
        "Evolver+RegMean": {"de": {"generations": gens}, **merged("regmean", alpha=chosen["regmean"])},
        "Evolver+Fisher": {"de": {"generations": gens}, **merged("fisher")},
        "Recipe DE": {"strategy": "recipe", "search": {**GENOME, "optimizer": "de", "budget": budget}},
        "Recipe CMA-ES": {"strategy": "recipe", "search": {**GENOME, "optimizer": "cmaes", "budget": budget}},
        "Hybrid (recipe DE, then the Evolver)": {
            "strategy": "recipe", "search": {**GENOME, "optimizer": "de", "budget": half, "hybrid": True},
            "de": {"generations": max(1, (budget - half) // 5)}},
        "Kinship greedy": {"strategy": "kinship_greedy", "greedy": greedy},
        "Kinship greedy, no exploration": {"strategy": "kinship_greedy", "greedy": {**greedy, "explore": False}},
    }


def config_for(change: dict, seed: int, stats: list[str], with_baselines: bool) -> EvolveConfig:
    data = yaml.safe_load(os.path.expandvars((ROOT / "mergekit_evolver" / "examples" / "demo.yml").read_text()))
    data = copy.deepcopy(data)
    data["seed"] = seed
    data["population"]["stats"] = stats
    data["report"]["baselines"] = BASELINE_ROWS if with_baselines else []
    if not with_baselines:
        data["report"].pop("references", None)
    apply_changes(data, change)
    return EvolveConfig.model_validate(data)


def chosen_settings(ledger: Ledger) -> dict:
    """The grid point each baseline chose on dev, as its parameters."""
    best: dict[str, tuple[float, int]] = {}
    for c in ledger.candidates("baseline"):
        name, k = c.step.split("/")[1], int(c.step.split("/")[2])
        if name not in best or c.fitness > best[name][0]:
            best[name] = (c.fitness, k)
    grid = lambda name: BASELINES[name][1][best[name][1]]  # noqa: E731
    return {"ties": grid("ties")["density"], "regmean": grid("regmean")["alpha"], "dev": best}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())[:48]


def run_kind(kind: str, args) -> tuple[dict, dict]:
    testbed = build_testbed(Path(".testbed") / kind, PRESETS[kind], reuse=True, log=lambda *_: None)
    os.environ["TESTBED"] = str(testbed.root.resolve())
    stats = specialist_stats(testbed)
    rows: dict[str, dict[str, list]] = {}
    extra: dict = {"greedy_rounds": None, "chosen": []}
    only = set(args.only.split(",")) if args.only else None
    for seed in args.seeds:
        first = Path(args.runs) / kind / f"evolver_seed{seed}"
        names = list(contenders(args.budget, {"ties": 0.5, "regmean": 0.9}))
        for name in names:
            if only and name not in only and name != "Evolver":
                continue
            if name in DETERMINISTIC and seed != args.seeds[0]:
                continue
            if name == "Evolver":
                run_dir = first
            else:
                run_dir = Path(args.runs) / kind / f"{slug(name)}_seed{seed}"
            chosen = {"ties": 0.5, "regmean": 0.9}
            if name != "Evolver":
                chosen = chosen_settings(Ledger(first))
            config = config_for(contenders(args.budget, chosen)[name], seed, stats, name == "Evolver")
            evolve(config, run_dir, resume=(run_dir / "ledger.sqlite").exists(), log=lambda *_: None)
            ledger = Ledger(run_dir)
            for c in ledger.candidates("report"):
                if c.note != "evolved" and name != "Evolver":
                    continue  # inputs, references and baselines: from the Evolver runs
                label = name if c.note == "evolved" else c.note
                row = rows.setdefault(label, {})
                for group, value in group_means(c, config).items():
                    row.setdefault(group, []).append(value)
                row.setdefault("dev", []).append(c.fitness)
            if name == "Evolver":
                extra["chosen"].append(chosen_settings(ledger))
            if name == "Kinship greedy":
                extra["greedy_rounds"] = ledger.generations()
            ledger.close()
    return rows, extra


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def claims(rows: dict, extra: dict) -> list[tuple[str, Optional[bool], str]]:
    out: list[tuple[str, Optional[bool], str]] = []
    ind = lambda name: mean(rows[name]["in_domain"]) if name in rows else None  # noqa: E731

    present = [b for b in BASELINE_ROWS if b in rows]
    if "evolved" in rows or "Evolver" in rows:
        best_dev = max(present, key=lambda b: mean(rows[b]["dev"]))
        e, b = ind("Evolver"), ind(best_dev)
        out.append(("the Evolver beats the best baseline (best on dev)", e > b,
                    f"Evolver {e:.3f} vs {best_dev} {b:.3f} in-domain test"))
        best_test = max(present, key=ind)
        out.append(("the Evolver beats every baseline (best on test)", e > ind(best_test),
                    f"Evolver {e:.3f} vs {best_test} {ind(best_test):.3f}"))
    for merger, base in (("average", "average"), ("TIES", "ties"), ("RegMean", "regmean"), ("Fisher", "fisher")):
        name = f"Evolver+{merger}"
        if name in rows and base in rows:
            out.append((f"{name} beats {merger} alone", ind(name) > ind(base),
                        f"{ind(name):.3f} vs {ind(base):.3f}"))
    if all(b in rows for b in ("regmean", "fisher", "average")):
        r, f, a = ind("regmean"), ind("fisher"), ind("average")
        out.append(("RegMean > Fisher > average", r > f > a, f"RegMean {r:.3f}, Fisher {f:.3f}, average {a:.3f}"))
    g, n = "Kinship greedy", "Kinship greedy, no exploration"
    if g in rows and n in rows:
        out.append(("kinship greedy with exploration >= without", ind(g) >= ind(n),
                    f"{ind(g):.3f} vs {ind(n):.3f}"))
    rounds = extra.get("greedy_rounds")
    if rounds:
        trace = [(r["generation"], r.get("kinship"), r.get("improved"), r.get("best")) for r in rounds]
        start = trace[0][1]
        stall = next((t for t in trace[1:] if t[2] is False), trace[-1])
        text = "; ".join(f"round {k}: kinship {v:.3f}, best {b:.3f}{' (stalled)' if k and not i else ''}"
                         for k, v, i, b in trace if v is not None)
        holds = start is not None and stall[1] is not None and stall[1] > start
        out.append(("kinship saturation: the top-k's mean kinship rises as gains stall", holds, text))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="merge_friendly,disjoint")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--runs", default="runs/evidence")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for kind in args.kinds.split(","):
        rows, extra = run_kind(kind, args)
        n = {label: len(r["in_domain"]) for label, r in rows.items()}
        print(f"\n### {kind} testbed: seeds {args.seeds}, budget {args.budget} candidates on dev, "
              f"test = 200 items/task")
        d = extra["chosen"]
        if d:
            print(f"dev-chosen: TIES density {[c['ties'] for c in d]}, RegMean alpha {[c['regmean'] for c in d]}")
        print("| model | runs | mean in-domain test | mean OOD test | dev fitness |")
        print("|---|---|---|---|---|")
        for label, row in rows.items():
            print(f"| {label} | {n[label]} | {fmt(row['in_domain'])} | {fmt(row['ood'])} | {fmt(row['dev'])} |")
        print("\n| claim | holds | numbers (means over seeds) |")
        print("|---|---|---|")
        for claim, holds, text in claims(rows, extra):
            print(f"| {claim} | {'pass' if holds else 'FAIL'} | {text} |")


if __name__ == "__main__":
    main()
