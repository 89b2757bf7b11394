"""Exact and statistical racing and a subset estimator against full scoring, side by side in one run:
documents scored per candidate, search wall time, and whether the decisions
and the final model are the same.

Run: .venv/bin/python benchmarks/racing.py [--kind merge_friendly|disjoint] [--testbed DIR] [--rounds 4]
     [--confidence 0.95] [--runs runs/racing] [--modes off,exact,statistical,subset] [--seeds 0]

Three searches on the testbed, each with `fitness.racing.mode: off`, `exact`
and `statistical`, and with `fitness.subset: {share: 0.25}` (exact racing on top): the demo's Evolver (mergekit_evolver/examples/demo.yml),
recipe DE (examples/recipe.yml) and kinship greedy (slerp, top 3, the demo's
budget). Baselines are left out; the report scores the final model on the
in-domain test tasks (its column), so a subset run's model can be compared.
Statistical racing's decisions are compared step by step with full scoring's
over the steps both runs made (its search may take another path after the
first decision that differs). With several --seeds each cell sums (documents,
decisions, same models) or averages (shares, test score, with its spread over
seeds) the seeds' runs; `kept` counts the candidates that passed their bar
in full scoring (accepted), which no exact race may stop.
"""

from __future__ import annotations

import copy
import shutil
import statistics
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


def configs(rounds: int, confidence: float) -> dict[str, dict]:
    demo = load_yaml((EXAMPLES / "demo.yml").read_text(), "demo.yml")
    recipe = load_yaml((EXAMPLES / "recipe.yml").read_text(), "recipe.yml")
    greedy = copy.deepcopy(demo)
    greedy["strategy"] = "kinship_greedy"
    greedy["greedy"] = {"merge_method": "slerp", "parameters": {"t": 0.5}, "top_k": 3, "max_rounds": 10,
                        "budget": demo["de"]["generations"] * len(demo["population"]["models"])}
    out = {"Evolver (demo)": demo, "recipe DE": recipe, "kinship greedy": greedy}
    for config in out.values():
        tests = [t for t in config["report"]["tasks"] if (t["group"] if isinstance(t, dict) else "") == "in_domain"]
        config["report"] = {"tasks": tests, "baselines": []}
        config["fitness"]["racing"] = {"rounds": rounds, "confidence": confidence}
    return out


def run(config: dict, mode: str, out: Path, seed: int) -> dict:
    config = copy.deepcopy(config)
    config["seed"] = seed
    if mode == "subset":
        config["fitness"]["subset"] = {"share": 0.25}
    else:
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
        if c.status == Status.RACED or any(v.get("estimated") for v in c.dev.values()):
            docs += sum(int(v["documents"]) for v in c.dev.values())
        elif c.status != Status.INVALID:
            docs += full_size(parsed)
    decisions = [(c.step, c.status == Status.ACCEPTED) for c in rows]
    # Recipe DE records its trials as scored, kept or not: no count there.
    kept = sum(c.status == Status.ACCEPTED for c in rows) if any(c.status == Status.ACCEPTED for c in rows) else None
    final = Ledger(out).find("report/evolved")
    test = sum(v["acc"] for v in final.test.values()) / len(final.test)
    return dict(seconds=seconds, docs=docs, candidates=len(rows), kept=kept,
                raced=sum(c.status == Status.RACED for c in rows), decisions=decisions, test=test,
                model=(out / "model" / "model.safetensors").read_bytes())


def kept(runs: list[dict]) -> str:
    counts = [r["kept"] for r in runs]
    return "-" if None in counts else str(sum(counts))


def full_size(config: EvolveConfig) -> int:
    from mergekit_evolver.scoring.evaluator import Suite

    key = config.fitness.model_dump_json()
    if key not in full_size.cache:
        suite = Suite(config.fitness.tasks, config.fitness)
        full_size.cache[key] = sum(suite.sizes.values())
    return full_size.cache[key]


full_size.cache = {}


def main() -> None:
    args = parse_args(__doc__.split("\n")[0], "runs/racing", rounds=4, confidence=0.95,
                      modes="off,exact,statistical,subset", seeds="0")
    modes = args.modes.split(",")
    if modes[0] != "off":
        raise SystemExit("--modes: off comes first, as what every other mode is compared with")
    testbed_for(args)
    rows = []
    for name, config in configs(args.rounds, args.confidence).items():
        where = Path(args.runs) / name.replace(" ", "_")
        results = {mode: [run(config, mode, where / f"seed{seed}" / mode, seed) for seed in args.seeds] for mode in modes}
        rows.append((name, results))
    print(f"\nrounds: {args.rounds}; confidence {args.confidence}; seeds {args.seeds}; documents are summed over "
          "the dev tasks and the seeds; test: mean (sample std) over seeds")
    print("| search | mode | candidates | kept in full scoring | raced out | documents scored (share of off) "
          "| run time (ratio to off) | decisions the same as off | same model | final model, in-domain test |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, results in rows:
        offs = results["off"]
        for mode, runs in results.items():
            agree = common = 0
            for off, r in zip(offs, runs):
                theirs = dict(off["decisions"])
                steps = [(step, acc) for step, acc in r["decisions"] if step in theirs]
                common += len(steps)
                agree += sum(theirs[step] == acc for step, acc in steps)
            total = lambda key, rs=runs: sum(r[key] for r in rs)  # noqa: E731
            docs, off_docs = total("docs"), sum(r["docs"] for r in offs)
            seconds, off_seconds = total("seconds"), sum(r["seconds"] for r in offs)
            same = sum(r["model"] == off["model"] for off, r in zip(offs, runs))
            tests = [r["test"] for r in runs]
            spread = f" ({statistics.stdev(tests):.3f})" if len(tests) > 1 else ""
            print(
                f"| {name} | {mode} | {total('candidates')} | {kept(offs)} | {total('raced')} "
                f"| {docs} ({docs / off_docs:.3f}) | {seconds:.1f} s ({seconds / off_seconds:.3f}) | {agree}/{common} "
                f"| {same}/{len(runs)} | {statistics.mean(tests):.3f}{spread} |"
            )


if __name__ == "__main__":
    main()
