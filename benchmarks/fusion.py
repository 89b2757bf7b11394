"""Knowledge fusion on the fusion testbed: the fused target against a CLM-only
control and against each source, on held-out test tasks, over several seeds.

Run: .venv/bin/python benchmarks/fusion.py [--seeds 0 1 2] [--root .testbed/fusion_bench]
     [--steps 1000] [--variants min_ce:0.5 min_ce:0.9 avg_ce:0.9]

Per seed: builds (or reuses) the fusion testbed (mergekit_evolver.fusion.
testbed: a Llama, a GPT-2 and a GPT-NeoX source, each with its own
tokenizer and trained on one task family; a Llama target near chance on all
three), then runs `fuse` for each --variants entry (method:lambda; the
defaults are the example config mergekit_evolver/examples/fuse.yml, MinCE
with lambda 0.5, chosen on dev with this script; the paper's MinCE with
lambda 0.9; and AvgCE with 0.9), with the example's other settings, and
the control: the same run with lambda 1 (causal LM loss only: the same
corpus, steps, order and seed, no source distributions). Every model is
scored with the project's lm-eval path (scoring.lmeval.score_model) on the
three families' test tasks (tb_<family>_test: inputs no model trained on).

Prints one table per seed, the mean over seeds, and each run's mean
accuracy per seed on test and on the dev tasks (the split to choose
settings on). Runs and testbeds under --root are reused: a second call only
scores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mergekit_evolver.fusion import fuse  # noqa: E402
from mergekit_evolver.fusion.testbed import build_fusion_testbed, example_config, format_scores, score_dir  # noqa: E402


def run_variant(tb, name: str, overrides: dict, root: Path) -> Path:
    out = root / name
    cfg = root / f"{name}.yml"
    config = example_config(tb.target, tb.sources, tb.corpus, **overrides)
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    resume = (out / "fusion.json").is_file()
    start = time.perf_counter()
    model = fuse(cfg, out, resume, log=None)
    print(f"  {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=ROOT / ".testbed" / "fusion_bench")  # .testbed/ is git-ignored
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--variants", nargs="*", default=["min_ce:0.5", "min_ce:0.9", "avg_ce:0.9"],
                    help="method:lambda fusion runs (min_ce:0.5 is the example config, min_ce:0.9 the paper's)")
    args = ap.parse_args()

    variants = {}
    for v in args.variants:
        method, lam = v.split(":")
        variants[f"fused_{method}_{lam}"] = {"fusion": method, "lambda": float(lam)}
    variants["clm_only"] = {"fusion": "min_ce", "lambda": 1.0}

    per_seed, dev_means = [], {}
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        tb = build_fusion_testbed(args.root / f"testbed-{seed}", seed, log=None)
        tasks = tb.test_tasks()
        runs = args.root / f"runs-{seed}"
        runs.mkdir(parents=True, exist_ok=True)
        scores = dict(tb.scores)
        for name, overrides in variants.items():
            model = run_variant(tb, name, {"seed": seed, "steps": args.steps, **overrides}, runs)
            scores[name] = score_dir(model, tasks, tb.include_path)
            # Dev accuracy: what settings may be chosen on (the test tasks only report).
            dev = score_dir(model, tb.dev_tasks(), tb.include_path)
            dev_means.setdefault(name, []).append(statistics.mean(dev.values()))
        print(format_scores(scores, tasks), flush=True)
        per_seed.append(scores)

    tasks = list(per_seed[0]["target"])
    mean = {m: {t: statistics.mean(s[m][t] for s in per_seed) for t in tasks} for m in per_seed[0]}
    print(f"\nmean over seeds {args.seeds} (test accuracy; each source was trained on one family):")
    print(format_scores(mean, tasks))
    spread = {m: [statistics.mean(s[m].values()) for s in per_seed] for m in per_seed[0]}
    print("\nmean test accuracy per seed:")
    for m, vals in spread.items():
        print(f"  {m:<20}" + "  ".join(f"{v:.3f}" for v in vals))
    print("mean dev accuracy per seed (fusion runs):")
    for m, vals in dev_means.items():
        print(f"  {m:<20}" + "  ".join(f"{v:.3f}" for v in vals))


if __name__ == "__main__":
    main()
