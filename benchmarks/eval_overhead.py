"""Share of a testbed run's wall time spent outside lm-eval's model calls.

Run: .venv/bin/python benchmarks/eval_overhead.py [--testbed .testbed] [--config examples/demo.yml]

Builds (or reuses) the testbed, runs the example config in a scratch run dir,
and times every call into lm-eval's HF model (loglikelihood,
loglikelihood_rolling, generate_until: batching, tokenizing and forward
passes). Everything else (merging, hashing, copying weights in, request
building, ledger, files) is overhead. Target: at most 10% of the search's wall
time. The whole run's share, with one-time setup, baselines and the report, is
printed too.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

from lm_eval.models.huggingface import HFLM

MODEL_CALLS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default=".testbed")
    parser.add_argument("--config", default="examples/demo.yml")
    args = parser.parse_args()

    from mergekit_evolver.config import load_evolve_config
    from mergekit_evolver import run as run_module
    from mergekit_evolver.testbed import build_testbed

    build_testbed(Path(args.testbed), reuse=True, log=lambda *_: None)
    os.environ["TESTBED"] = str(Path(args.testbed).resolve())
    config = load_evolve_config(args.config)

    spent = {"model": 0.0}
    for name in MODEL_CALLS:
        original = getattr(HFLM, name)

        @functools.wraps(original)
        def timed(self, *a, _original=original, **kw):
            start = time.perf_counter()
            try:
                return _original(self, *a, **kw)
            finally:
                spent["model"] += time.perf_counter() - start

        setattr(HFLM, name, timed)

    phases = {}
    original_evolve = run_module.Run.evolve

    def timed_evolve(self, members):
        start, before = time.perf_counter(), spent["model"]
        try:
            return original_evolve(self, members)
        finally:
            phases["search"] = (time.perf_counter() - start, spent["model"] - before)

    run_module.Run.evolve = timed_evolve
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_module.evolve(config, Path(tmp) / "run", log=lambda *_: None)
        total = time.perf_counter() - start
    wall, model = phases["search"]
    print(f"config: {args.config} (seed {config.seed}, {config.de.generations} generations)")
    print(f"{'phase':22} {'wall s':>8} {'model calls s':>14} {'outside share':>14}")
    print(f"{'search (generations)':22} {wall:8.1f} {model:14.1f} {1 - model / wall:14.1%}")
    print(f"{'whole run':22} {total:8.1f} {spent['model']:14.1f} {1 - spent['model'] / total:14.1%}")
    print("target: search outside share <= 10%")


if __name__ == "__main__":
    main()
