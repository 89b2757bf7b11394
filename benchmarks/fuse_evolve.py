"""Fuse, then evolve (FuseChat's order) against evolving without the fused member.

Run: .venv/bin/python benchmarks/fuse_evolve.py [--seeds 0 1 2] [--root .testbed/fusion_bench]
     [--steps 1000] [--generations 10]

Per seed, on the fusion testbed (benchmarks/fusion.py builds the same one
under the same --root, so its fusion runs are reused):
- the CLM-only control (the target trained on the corpus with lambda 1) is
  fused once, as a third Llama member, so that both populations are big
  enough for DE's current-to-rand/1;
- "evolve" runs the Evolver (examples/demo.yml's operator, F and CR) over
  llama_rev, the target and the control;
- "fuse -> evolve" runs the same config with a `fuse:` section (the example
  fusion: MinCE, lambda 0.5): the fused target joins as a fourth member.
Both score on the three families' dev tasks; the table is held-out test
accuracy (mean of the three test tasks), mean +- sample std over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergekit_evolver.config import EvolveConfig  # noqa: E402
from mergekit_evolver.fusion import fuse  # noqa: E402
from mergekit_evolver.fusion.config import parse_fusion_config  # noqa: E402
from mergekit_evolver.fusion.testbed import build_fusion_testbed, example_config  # noqa: E402
from mergekit_evolver.ledger import Ledger  # noqa: E402
from mergekit_evolver.run import evolve, member_labels  # noqa: E402
from mergekit_evolver.testbed import task_name  # noqa: E402


def config(tb, members: list[str], seed: int, generations: int, fuse_section=None) -> EvolveConfig:
    families = list(tb.families.values())
    data = {
        "seed": seed,
        "population": {"models": members, "base_model": str(tb.target)},
        "de": {"operator": "de_current_to_rand1", "F": 0.1, "CR": 0.9, "generations": generations},
        "fitness": {"tasks": [task_name(f, "dev") for f in families], "include_path": str(tb.include_path),
                    "device": "cpu"},
        "report": {"tasks": [{"name": task_name(f, "test"), "group": "test"} for f in families], "baselines": []},
    }
    if fuse_section:
        data["fuse"] = fuse_section
    return EvolveConfig.model_validate(data)


def held_out(run_dir: Path) -> dict[str, float]:
    ledger = Ledger(run_dir)
    try:
        out = {}
        for c in ledger.candidates("report"):
            out[c.note] = statistics.mean(v["acc"] for v in c.test.values())
        return out
    finally:
        ledger.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=ROOT / ".testbed" / "fusion_bench")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--generations", type=int, default=10)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {}
    for seed in args.seeds:
        tb = build_fusion_testbed(args.root / f"testbed-{seed}", seed, log=None)
        runs = args.root / f"runs-{seed}"
        control_cfg = parse_fusion_config(example_config(tb.target, tb.sources, tb.corpus, seed=seed,
                                                          steps=args.steps, fusion="min_ce", **{"lambda": 1.0}))
        control = fuse(control_cfg, runs / "clm_only", (runs / "clm_only" / "fusion.json").is_file(), log=None)
        members = [str(tb.sources["llama_rev"]), str(tb.target), str(control)]
        fused = {"config": example_config(tb.target, tb.sources, tb.corpus, seed=seed, steps=args.steps,
                                          fusion="min_ce", **{"lambda": 0.5}),
                 "out": str(runs / "fused_min_ce_0.5")}
        fused_model = Path(fused["out"]) / "model"
        names = {"input llama_rev": members[0], "input target": members[1], "input CLM-only control": members[2]}
        for name, section in (("evolve", None), ("fuse -> evolve", fused)):
            run_dir = runs / ("evolve" if section is None else "fuse_evolve") / f"g{args.generations}"
            cfg = config(tb, members, seed, args.generations, section)
            evolve(cfg, run_dir, resume=(run_dir / "ledger.sqlite").exists(), log=lambda *_: None)
            scores = held_out(run_dir)
            rows.setdefault(name, []).append(scores["evolved"])
            inputs = [Path(m) for m in members] + ([] if section is None else [fused_model])
            label = dict(zip(map(str, inputs), member_labels(inputs)))
            wanted = names if section is None else {"input fused (MinCE, lambda 0.5)": str(fused_model)}
            for row, path in wanted.items():
                rows.setdefault(row, []).append(scores[label[path]])
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    print(f"\nseeds {args.seeds}; mean held-out test accuracy over the 3 families; "
          f"{args.generations} generations of the Evolver")
    print("| model | mean ± sd | per seed |")
    print("|---|---|---|")
    for label, values in rows.items():
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {label} | {statistics.mean(values):.3f}{sd} | {', '.join(f'{v:.3f}' for v in values)} |")


if __name__ == "__main__":
    main()
