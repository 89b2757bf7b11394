"""Search throughput in-process and on Ray workers, side by side in one run.

Run: .venv/bin/python benchmarks/scale_out.py [--spec tiny|full] [--generations 3] [--rounds 2] [--workers 1,2]

The Evolver (generational update) searches the testbed's four
specialists. Each contender sets up its run (workers started and checked,
members scored) outside the clock, then the search alone is timed: candidates
per minute, over --rounds interleaved rounds (best round kept). Every process
that scores uses one torch thread: the driver in-process, each Ray worker
(cpus_per_worker 1). All contenders must reach the same model; the benchmark
says so or stops.

Scaling is Ray at N workers over Ray at 1; Ray's overhead per candidate is
Ray at 1 worker against in-process, in seconds per candidate.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch


def config_for(testbed, generations: int, executor: dict):
    from mergekit_evolver.config import EvolveConfig

    return EvolveConfig.model_validate({
        "seed": 0,
        "population": {"models": [str(p) for p in testbed.specialists.values()], "base_model": str(testbed.base)},
        "de": {"operator": "de_current_to_rand1", "F": 0.1, "CR": 0.9, "generations": generations},
        "fitness": {"tasks": testbed.dev_tasks(), "include_path": str(testbed.include_path), "device": "cpu"},
        "executor": executor,
    })


def timed_search(config, run_dir: Path) -> tuple[float, int, str]:
    """Seconds of the search, candidates it scored, digest of its final members."""
    from mergekit_evolver.ledger import Ledger
    from mergekit_evolver.run import Run, search

    run = Run(config, run_dir, log=lambda _: None)
    try:
        members = run.initial_members()
        start = time.perf_counter()
        final, _ = search(run, members)
        seconds = time.perf_counter() - start
        n = len(Ledger(run_dir).candidates("offspring"))
        digest = hashlib.sha256()
        for member in final:
            digest.update((Path(member.path) / "model.safetensors").read_bytes())
        return seconds, n, digest.hexdigest()[:12]
    finally:
        run.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--spec", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--testbed", default=None, help="its dir (default .testbed-SPEC)")
    args = parser.parse_args()

    import ray

    from mergekit_evolver.testbed import FULL, TINY, build_testbed

    torch.set_num_threads(1)
    spec = {"tiny": TINY, "full": FULL}[args.spec]
    testbed = build_testbed(Path(args.testbed or f".testbed-{args.spec}"), spec, reuse=True, log=None)
    counts = [int(w) for w in args.workers.split(",")]
    start = time.perf_counter()
    ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False, logging_level="error")
    ray_start = time.perf_counter() - start
    contenders = {"in-process": {"kind": "in_process"}}
    contenders.update({f"ray, {n} worker{'s' * (n > 1)}": {"kind": "ray", "workers": n, "cpus_per_worker": 1}
                       for n in counts})
    best: dict[str, float] = {}
    models: dict[str, str] = {}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            names = list(contenders)
            names = names[r % len(names):] + names[: r % len(names)]  # each goes first in some round
            for name in names:
                run_dir = Path(tmp) / f"{r}-{name.replace(' ', '').replace(',', '-')}"
                seconds, n, digest = timed_search(config_for(testbed, args.generations, contenders[name]), run_dir)
                best[name] = min(best.get(name, float("inf")), seconds)
                if models.setdefault(name, digest) != digest:
                    raise SystemExit(f"{name}: a different model in round {r}")
    ray.shutdown()
    if len(set(models.values())) != 1:
        raise SystemExit(f"the contenders reached different models: {models}")

    print(f"{args.spec} testbed, Evolver generational, {n} candidates per search, best of {args.rounds} rounds, "
          f"{os.cpu_count()} CPUs; local Ray started in {ray_start:.1f} s (not timed)")
    print(f"{'executor':18} {'search s':>9} {'cand/min':>9} {'s/cand':>8}")
    for name, seconds in best.items():
        print(f"{name:18} {seconds:9.2f} {n / seconds * 60:9.1f} {seconds / n:8.3f}")
    one = best[f"ray, {counts[0]} worker{'s' * (counts[0] > 1)}"]
    for c in counts[1:]:
        print(f"scaling, {c} workers over {counts[0]}: {one / best[f'ray, {c} workers']:.2f}x")
    print(f"Ray overhead per candidate ({counts[0]} worker vs in-process): {(one - best['in-process']) / n * 1000:+.0f} ms")
    print(f"same final population in every contender: {next(iter(models.values()))}")


if __name__ == "__main__":
    main()
