"""Exact racing against full scoring, side by side in one run: documents
scored per candidate, search wall time, and whether every decision and the
final model are the same.

Run: .venv/bin/python benchmarks/racing.py [--testbed .testbed] [--rounds 4] [--runs runs/racing]

Three searches on the testbed, each with `fitness.racing.mode: off` then
`exact`: the demo's Evolver (mergekit_evolver/examples/demo.yml), recipe DE
(examples/recipe.yml) and kinship greedy (slerp, top 3, the demo's budget).
Baselines and the report are left out; only the search is compared.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.config.load import load_yaml
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.run import evolve
from testbed_runs import ROOT, parse_args, testbed_for

EXAMPLES = ROOT / "mergekit_evolver" / "examples"
SEARCH_ROLES = {"offspring", "search"}


def configs(rounds: int) -> dict[str, dict]:
    demo = load_yaml((EXAMPLES / "demo.yml").read_text(), "demo.yml")
    recipe = load_yaml((EXAMPLES / "recipe.yml").read_text(), "recipe.yml")
    greedy = copy.deepcopy(demo)
    greedy["strategy"] = "kinship_greedy"
    greedy["greedy"] = {"merge_method": "slerp", "parameters": {"t": 0.5}, "top_k": 3, "max_rounds": 10,
                        "budget": demo["de"]["generations"] * len(demo["population"]["models"])}
    out = {"Evolver (demo)": demo, "recipe DE": recipe, "kinship greedy": greedy}
    for config in out.values():
        config["report"] = {"tasks": [], "baselines": []}
        config["fitness"]["racing"] = {"rounds": rounds}
    return out


def run(config: dict, mode: str, out: Path) -> dict:
    config = copy.deepcopy(config)
    config["fitness"]["racing"]["mode"] = mode
    shutil.rmtree(out, ignore_errors=True)
    # ${TESTBED} in the example configs is expanded when the config is validated.
    parsed = EvolveConfig.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    start = time.perf_counter()
    evolve(parsed, out, log=lambda _: None)
    seconds = time.perf_counter() - start
    rows = [c for c in Ledger(out).candidates() if c.role in SEARCH_ROLES]
    docs = 0
    for c in rows:
        if c.status == Status.RACED:
            docs += sum(int(v["documents"]) for v in c.dev.values())
        elif c.status != Status.INVALID:
            docs += full_size(parsed)
    decisions = [(c.step, c.status == Status.ACCEPTED) for c in rows]
    return dict(seconds=seconds, docs=docs, candidates=len(rows),
                raced=sum(c.status == Status.RACED for c in rows), decisions=decisions,
                model=(out / "model" / "model.safetensors").read_bytes())


def full_size(config: EvolveConfig) -> int:
    from mergekit_evolver.scoring.evaluator import Suite

    key = config.fitness.model_dump_json()
    if key not in full_size.cache:
        suite = Suite(config.fitness.tasks, config.fitness)
        full_size.cache[key] = sum(suite.sizes.values())
    return full_size.cache[key]


full_size.cache = {}


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "runs/racing", rounds=4)
    testbed_for(args)
    rows = []
    for name, config in configs(args.rounds).items():
        off = run(config, "off", Path(args.runs) / name.replace(" ", "_") / "off")
        exact = run(config, "exact", Path(args.runs) / name.replace(" ", "_") / "exact")
        same = off["decisions"] == exact["decisions"] and off["model"] == exact["model"]
        rows.append((name, off, exact, same))
    print(f"\nrounds: {args.rounds}; documents per candidate are summed over the dev tasks")
    print("| search | candidates | raced out | documents scored, exact / off | run time off → exact (ratio) | same decisions and model |")
    print("|---|---|---|---|---|---|")
    for name, off, exact, same in rows:
        share = exact["docs"] / off["docs"]
        print(
            f"| {name} | {exact['candidates']} | {exact['raced']} | {exact['docs']} / {off['docs']} = **{share:.3f}** "
            f"| {off['seconds']:.1f} s → {exact['seconds']:.1f} s ({exact['seconds'] / off['seconds']:.3f}) | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
