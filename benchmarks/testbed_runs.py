"""What the testbed benchmarks share: arguments, testbed setup, table cells."""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.testbed import PRESETS, build_testbed

ROOT = Path(__file__).resolve().parent.parent


def parse_args(description: str, runs: str, seeds: str = "0,1,2", **extra) -> argparse.Namespace:
    """--seeds, --runs, --kind, --testbed, --config, plus `extra` (name -> default)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--runs", default=runs)
    parser.add_argument("--kind", default="merge_friendly", choices=sorted(PRESETS))
    parser.add_argument("--testbed", default=None, help="default: .testbed/KIND")
    parser.add_argument("--config", default=str(ROOT / "mergekit_evolver" / "examples" / "demo.yml"))
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def testbed_for(args: argparse.Namespace):
    """Build or reuse the testbed, and point ${TESTBED} in configs at it."""
    where = Path(args.testbed) if args.testbed else Path(".testbed") / args.kind
    testbed = build_testbed(where, PRESETS[args.kind], reuse=True, log=lambda *_: None)
    os.environ["TESTBED"] = str(testbed.root.resolve())
    return testbed


def apply_changes(data: dict, change: dict) -> None:
    """A contender's config changes over a base config: a section's keys
    are updated one by one, a plain value replaces the setting."""
    for key, value in change.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value


def group_means(candidate, config: EvolveConfig) -> dict[str, float]:
    """Mean held-out accuracy per report group (in_domain, ood)."""
    groups: dict[str, list[float]] = {}
    for spec in config.report.tasks:
        groups.setdefault(spec.group, []).append(candidate.test[spec.name]["acc"])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def fmt(values: list) -> str:
    """mean +- sample std over seeds; one value when they all agree."""
    missing = sum(v is None for v in values)
    if missing:
        return f"not within budget in {missing} of {len(values)} seeds"
    if len(set(values)) == 1:
        return f"{values[0]:.3f}" if isinstance(values[0], float) else str(values[0])
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
