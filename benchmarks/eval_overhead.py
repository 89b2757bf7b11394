"""Share of a testbed run's wall time spent outside lm-eval's model calls,
with and without merging the next candidate ahead, side by side.

Run: .venv/bin/python benchmarks/eval_overhead.py [--testbed .testbed] [--config mergekit_evolver/examples/demo.yml]
     [--generations G] [--width W --layers L] [--rounds R] [--spare-core]

Builds (or reuses) the testbed and runs the example config in scratch run
dirs, R times with merge_ahead off and R times with it on, interleaved. It
times every call into lm-eval's HF model (loglikelihood,
loglikelihood_rolling, generate_until: batching, tokenizing and forward
passes). Everything else is overhead. Target: at most 10% of the search's
wall time. The whole run's share, with one-time setup, baselines and the
report, is printed too.

The search's time per candidate is split into lm-eval's model calls, the rest
of lm-eval's evaluate() (per-document process_results, filters,
aggregation), mergekit's in-memory merges in this process (planner, executor
and the DE kernel), waiting for and receiving the merge-ahead worker's
tensors, and the rest, which is this project's code (weights copied in,
content hash, ledger, accepted offspring written). The floor line times the
cheapest merge mergekit can do on this model, a linear merge of two members:
it and lm-eval's own share are paid by any search that merges in-process.

The side-by-side lines compare the candidate's wall time as well as the
share: merging ahead only helps if candidates get faster, not if its merges
just slow the model calls down by as much as they save.

--spare-core pins this process to one CPU with one torch thread, and the
worker to the others: a stand-in for a machine whose scoring leaves cores
idle (a GPU run, or more cores than the forward passes use).

--width W --layers L swap the testbed's 144K-parameter specialists for random
Llamas of that width and depth (same tokenizer and tasks; head size 16), to
show how the share moves with model size. Their scores mean nothing; only the
timings do.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from lm_eval.models.huggingface import HFLM

MODEL_CALLS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
FLOOR_REPEATS = 50


class Clock:
    """Seconds and calls accumulated per label, counted only while `on`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.on = False

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                if self.on:
                    self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                    self.calls[label] = self.calls.get(label, 0) + 1

        setattr(owner, name, timed)

    def wrap_stream(self, owner, name: str, label: str) -> None:
        """A generator function: the time spent making each item counts, not
        the time its consumer spends between items."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*a, **kw):
            stream = original(*a, **kw)
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(stream)
                    except StopIteration:
                        return
                    finally:
                        if self.on:
                            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                    yield item
            finally:
                stream.close()

        setattr(owner, name, timed)


def random_population(root: Path, like: Path, width: int, layers: int, n: int) -> tuple[list[Path], Path]:
    """A random base Llama and n perturbed copies, with the testbed's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergekit_evolver.population.store import copy_side_files

    config = AutoConfig.from_pretrained(like)
    config.update(dict(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 16, num_key_value_heads=width // 16, head_dim=16,
    ))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    paths = []
    for i in range(n + 1):
        dest = root / ("base" if i == 0 else f"member{i}")
        dest.mkdir(parents=True)
        copy_side_files(like, dest)  # tokenizer; save_pretrained writes the new config.json
        model = base
        if i:
            model = AutoModelForCausalLM.from_config(config)
            with torch.no_grad():
                for mine, theirs in zip(model.parameters(), base.parameters()):
                    mine.copy_(theirs + 0.02 * torch.randn_like(theirs))
        model.save_pretrained(dest)
        paths.append(dest)
    return paths[1:], paths[0]


def parameter_count(model_dir: Path) -> int:
    from mergekit_evolver.population.store import tensor_shapes

    return sum(math.prod(shape) for shape in tensor_shapes(model_dir).values())


def floor_merge_ms(models: list[Path], options) -> float:
    """Milliseconds per in-memory linear merge of two members through mergekit."""
    from mergekit_evolver.merging.merge import merge_in_memory
    from mergekit_evolver.recipes.parse import parse_merge_config
    from mergekit_evolver.population.store import read_from_files

    recipe = parse_merge_config({
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models[:2]],
        "dtype": "float32",
    })
    read_from_files(recipe.referenced_models())
    merge_in_memory(recipe, options)
    start = time.perf_counter()
    for _ in range(FLOOR_REPEATS):
        merge_in_memory(recipe, options)
    return (time.perf_counter() - start) / FLOOR_REPEATS * 1000


@contextlib.contextmanager
def one_core_for_scoring(enabled: bool):
    """Simulate a machine whose scoring leaves a core idle, as a GPU run or
    a machine with more cores than the forward passes use does: this process
    on the first CPU with one torch thread, the merge-ahead worker on another."""
    if not enabled:
        yield
        return
    from mergekit_evolver.merging.ahead import MergeAhead

    import torch

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--spare-core needs at least 2 CPUs")
    threads, start = torch.get_num_threads(), MergeAhead.start

    def start_on_the_spare_core(self):
        start(self)
        if self._process is not None:
            os.sched_setaffinity(self._process.pid, cpus[1:])

    MergeAhead.start = start_on_the_spare_core
    torch.set_num_threads(1)
    os.sched_setaffinity(0, cpus[:1])
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
        MergeAhead.start = start


def timed_run(config, run_dir: Path, merge_ahead: bool, spare_core: bool = False) -> dict:
    """One whole run, timed; returns the search's and the whole run's clocks."""
    import lm_eval.evaluator

    import mergekit_evolver.run as run_module
    from mergekit_evolver.merging.ahead import MergeAhead
    from mergekit_evolver.run import executor
    from mergekit_evolver.run.loop import CandidateLoop

    config = config.model_copy(update={"merge_ahead": merge_ahead})
    clock, totals = Clock(), Clock()
    saved = {
        (owner, name): getattr(owner, name)
        for owner, name in [(HFLM, n) for n in MODEL_CALLS] + [
            (lm_eval.evaluator, "evaluate"), (executor, "merge_in_memory"),
            (CandidateLoop, "_compute"), (run_module, "search"), (MergeAhead, "take"),
        ]
    }
    for name in MODEL_CALLS:
        clock.wrap(HFLM, name, "model")
        totals.wrap(HFLM, name, "model")
    clock.wrap(lm_eval.evaluator, "evaluate", "evaluate")  # fitness imports it per call
    clock.wrap(executor, "merge_in_memory", "merge")
    clock.wrap_stream(executor, "merge_tensors", "merge")  # a candidate streamed into the resident model
    clock.wrap(MergeAhead, "take", "take")
    clock.wrap(CandidateLoop, "_compute", "candidate")
    clock.wrap(run_module, "search", "search")
    searched = {}
    original_search = run_module.search

    def search_only(run, members):
        clock.on = True
        try:
            return original_search(run, members)
        finally:
            clock.on = False
            searched.update(taken=run.executor.ahead.taken, missed=run.executor.ahead.missed)

    run_module.search = search_only
    try:
        with one_core_for_scoring(spare_core):
            totals.on = True
            start = time.perf_counter()
            run_module.evolve(config, run_dir, log=lambda *_: None)
            total = time.perf_counter() - start
            totals.on = False
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
    return dict(clock=clock, total=total, model_total=totals.seconds["model"], **searched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", default=".testbed")
    parser.add_argument("--config", default="mergekit_evolver/examples/demo.yml")
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--width", type=int, default=0, help="random Llamas of this width (0: the testbed's)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved")
    parser.add_argument(
        "--spare-core", action="store_true",
        help="score on one core with one torch thread, the merge-ahead worker on another",
    )
    args = parser.parse_args()

    from mergekit.options import MergeOptions

    from mergekit_evolver.config import load_evolve_config
    from mergekit_evolver.scoring.evaluator import resolve_device
    from mergekit_evolver.testbed import build_testbed

    build_testbed(Path(args.testbed), reuse=True, log=lambda *_: None)
    os.environ["TESTBED"] = str(Path(args.testbed).resolve())
    config = load_evolve_config(args.config)
    if args.generations is not None:
        config = config.model_copy(update={"de": config.de.model_copy(update={"generations": args.generations})})

    with tempfile.TemporaryDirectory() as tmp:
        label = "the testbed's specialists"
        if args.width:
            models, base = random_population(
                Path(tmp) / "models", Path(config.population.models[0]), args.width, args.layers,
                len(config.population.models),
            )
            population = config.population.model_copy(
                update={"models": [str(m) for m in models], "base_model": str(base)}
            )
            # The references are the testbed's size: they cannot sit in a report of these.
            unreferenced = config.report.model_copy(update={"references": []})
            config = config.model_copy(update={"population": population, "report": unreferenced})
            label = f"random Llamas, width {args.width}, {args.layers} layers"
        label += f" ({parameter_count(Path(config.population.models[0])) / 1e6:.2f}M parameters)"
        runs = []
        for k in range(args.rounds):
            for ahead in (False, True):
                runs.append((ahead, timed_run(config, Path(tmp) / f"run{k}_{int(ahead)}", ahead, args.spare_core)))
        options = MergeOptions(
            quiet=True, device=resolve_device(config.fitness.device), random_seed=config.seed
        )
        floor = floor_merge_ms(config.population.models, options)
    print(f"config: {args.config} (seed {config.seed}, {config.de.generations} generations); model: {label}")
    print(f"runs: {args.rounds} of each variant, interleaved (merge_ahead off, on, off, on, ...)")
    if args.spare_core:
        print("simulated spare core: scoring on CPU 0 with 1 torch thread, the merge-ahead worker on the others")
    for ahead, result in runs:
        report(ahead, result)
    compare(runs, floor)


def report(ahead: bool, result: dict) -> None:
    clock = result["clock"]
    s = clock.seconds
    wall, model, n = s["search"], s["model"], clock.calls["candidate"]
    per = {
        "lm-eval model calls": model,
        "lm-eval, outside model calls": s["evaluate"] - model,
        "mergekit merge in this process": s.get("merge", 0.0),
        "merge-ahead: waiting for and receiving": s.get("take", 0.0),
    }
    per["the rest (ours: weights in, hash, ledger, files)"] = wall - sum(per.values())
    total, model_total = result["total"], result["model_total"]
    print(f"\nmerge_ahead {'on' if ahead else 'off'}:")
    print(f"  {'phase':22} {'wall s':>8} {'model calls s':>14} {'outside share':>14}")
    print(f"  {'search (generations)':22} {wall:8.1f} {model:14.1f} {1 - model / wall:14.1%}")
    print(f"  {'whole run':22} {total:8.1f} {model_total:14.1f} {1 - model_total / total:14.1%}")
    print(f"  per candidate ({n} candidates), {wall / n * 1000:.1f} ms:")
    for name, seconds in per.items():
        print(f"    {name:48} {seconds / n * 1000:7.1f} ms {seconds / wall:6.1%}")
    if ahead:
        print(f"  merged ahead by the worker: {result['taken']} of {result['taken'] + result['missed']} candidates")


def compare(runs: list, floor_ms: float) -> None:
    """Each round's on run against the off run just before it: the machine's
    speed drifts between runs, so ratios of neighbours say more than means."""

    def per_candidate(r):
        return r["clock"].seconds["search"] / r["clock"].calls["candidate"] * 1000

    def model_ms(r):
        return r["clock"].seconds["model"] / r["clock"].calls["candidate"] * 1000

    def share(r):
        return 1 - r["clock"].seconds["model"] / r["clock"].seconds["search"]

    pairs = [(runs[k][1], runs[k + 1][1]) for k in range(0, len(runs) - 1, 2)]
    print("\nside by side, round by round (merge_ahead on / off):")
    print(f"  {'round':>5} {'ms a candidate':>22} {'model calls ms':>22} {'outside share':>18}")
    for k, (off, on) in enumerate(pairs):
        print(
            f"  {k:5d} {per_candidate(off):7.1f} -> {per_candidate(on):6.1f} ({per_candidate(on) / per_candidate(off):.3f})"
            f" {model_ms(off):7.1f} -> {model_ms(on):6.1f} ({model_ms(on) / model_ms(off):.3f})"
            f" {share(off):7.1%} -> {share(on):6.1%}"
        )
    ratios = sorted(per_candidate(on) / per_candidate(off) for off, on in pairs)
    print(f"  candidate time on/off: median {statistics.median(ratios):.3f}, range {ratios[0]:.3f}-{ratios[-1]:.3f}")
    print(
        f"floor without merging ahead: mergekit's cheapest merge of this model (linear, two members) "
        f"takes {floor_ms:.1f} ms"
    )
    print("target: search outside share <= 10%")


if __name__ == "__main__":
    main()
