"""Per-candidate cost of a weight-space run at real sizes: where the time and the memory go.

Run: .venv/bin/python benchmarks/real_size.py [--sizes 0.1,0.5,1] [--dtypes float32,bfloat16]
     [--device cpu|cuda] [--limit 16]

For each size (random-init Llamas: 0.1 -> width 768 x 12 layers, 0.5 -> 1536 x
16, 1 -> 2048 x 16; the testbed's character tokenizer, so the embeddings are
small) and dtype, in a fresh process: a population of 4 perturbed copies of one
base, one Evolver generation (4 offspring, individual selection) scored on
`--limit` documents of the testbed's tb_rev_dev, no baselines, no report.
Per candidate it prints:
- merge ms (mergekit's planner and executor, in this process), model-call ms
  (lm-eval's calls into the HF model) and our ms (the rest of the candidate);
- bytes read: /proc/self/io read_bytes (from the disk; page-cache hits are not
  counted) and rchar (read() calls; mmap-ed safetensors are not counted);
- RSS when the candidate starts, and peak RSS during it (sampled every 5 ms; with the children's, such
  as the merge-ahead worker's, `--merge-ahead`) and peak device memory;
- peak RSS / one model's size;
- whether it was kept: a kept offspring's time includes writing it (fsync'd).
- the population cache (executor.cache_bytes; `--cache 0,6x` runs each
  setting in its own process; "Nx" is N models' bytes, "auto" the default,
  which is 0 on a CPU run): its budget, and its hits and misses (tensors).
`--drop-caches` empties the OS page cache before each candidate (root only),
so that what is not in the population cache comes from the disk itself.
Targets (issue 16) at 1B: peak <= 1.3 x one model + the cache budget; our
share <= 5% of a candidate's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {"0.1": (768, 12), "0.5": (1536, 16), "1": (2048, 16)}


class RssPeak:
    """The highest VmRSS seen since the last reset, sampled by a thread."""

    def __init__(self, children: bool = False):
        self.children = children
        self.peak = 0
        self._stop = False
        threading.Thread(target=self._watch, daemon=True).start()

    def now(self) -> int:
        """This process's RSS, plus its children's (the merge-ahead worker's)
        when asked: scanning /proc costs CPU."""
        me = os.getpid()
        total = _rss(Path("/proc/self/status"))
        for proc in Path("/proc").iterdir() if self.children else ():
            if proc.name.isdigit():
                try:
                    if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                        total += _rss(proc / "status")
                except (OSError, IndexError, ValueError):
                    pass  # gone meanwhile
        return total

    def _watch(self):
        while not self._stop:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def reset(self) -> None:
        self.peak = self.now()


def _rss(status: Path) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def io_counters() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value)
    return out


def child(args) -> None:
    import torch
    from lm_eval.models.huggingface import HFLM

    from eval_overhead import MODEL_CALLS, Clock, parameter_count, random_population
    from mergekit_evolver.config import EvolveConfig
    from mergekit_evolver.run import evolve, executor
    from mergekit_evolver.run.loop import CandidateLoop
    from mergekit_evolver.testbed import PRESETS, build_testbed

    testbed = build_testbed(Path(".testbed") / "merge_friendly", PRESETS["merge_friendly"], log=None)
    width, layers = SHAPES[args.size]
    root = Path(args.root)
    models, base = random_population(root / "models", testbed.specialists["rev"], width, layers, 4)
    params = parameter_count(models[0])
    if args.dtype != "float32":
        import safetensors.torch as st
        for m in [*models, base]:
            state = st.load_file(str(m / "model.safetensors"))
            st.save_file({k: v.to(getattr(torch, args.dtype)) for k, v in state.items()},
                         str(m / "model.safetensors"), metadata={"format": "pt"})
        del state  # else the last fp32 copy stays alive through the run, in its RSS
    model_bytes = sum((m / "model.safetensors").stat().st_size for m in models[:1])
    config = EvolveConfig.model_validate({
        "seed": 0,
        "population": {"models": [str(m) for m in models], "base_model": str(base)},
        "de": {"operator": "de_current_to_rand1", "F": 0.1, "CR": 0.9, "generations": 1},
        "fitness": {"tasks": ["tb_rev_dev"], "include_path": str(testbed.include_path), "device": args.device,
                    "dtype": args.dtype, "limit": args.limit, "batch_size": 16},
        "report": {"tasks": [], "baselines": []},
        "executor": {"cache_bytes": cache_bytes(args.cache, model_bytes)},
        "merge_ahead": args.merge_ahead,
    })
    from mergekit_evolver.population.cache import POPULATION_CACHE
    clock, rss = Clock(), RssPeak(children=args.merge_ahead)
    for name in MODEL_CALLS:
        clock.wrap(HFLM, name, "model")
    clock.wrap(executor, "merge_in_memory", "merge")
    clock.wrap_stream(executor, "merge_tensors", "merge")  # a candidate streamed into the resident model
    rows = []
    original = CandidateLoop._compute

    def compute(self, *a, **kw):
        if args.drop_caches:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        before = dict(clock.seconds)
        hits, misses = POPULATION_CACHE.hits, POPULATION_CACHE.misses
        io0 = io_counters()
        rss.reset()
        rss_start = rss.peak
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        clock.on = True
        start = time.perf_counter()
        kept = None
        try:
            got_row = original(self, *a, **kw)
            kept = got_row[1]  # accepted: its write is in the candidate's time
            return got_row
        finally:
            wall = time.perf_counter() - start
            clock.on = False
            io1 = io_counters()
            got = {k: clock.seconds.get(k, 0.0) - before.get(k, 0.0) for k in ("merge", "model")}
            rows.append({
                "wall_ms": wall * 1000, "merge_ms": got["merge"] * 1000, "model_ms": got["model"] * 1000,
                "ours_ms": (wall - got["merge"] - got["model"]) * 1000, "kept": kept,
                "read_bytes": io1["read_bytes"] - io0["read_bytes"], "rchar": io1["rchar"] - io0["rchar"],
                "peak_rss": rss.peak, "rss_start": rss_start, "budget": POPULATION_CACHE.budget,
                "hits": POPULATION_CACHE.hits - hits, "misses": POPULATION_CACHE.misses - misses,
                "peak_device": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
            })

    CandidateLoop._compute = compute
    evolve(config, root / "run", log=lambda *_: None)
    print(json.dumps({"size": args.size, "dtype": args.dtype, "params": params, "model_bytes": model_bytes,
                      "rows": rows}))


def cache_bytes(setting: str, model_bytes: int):
    if setting == "auto":
        return "auto"
    if setting.endswith("x"):
        return int(float(setting[:-1]) * model_bytes)
    return int(float(setting))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,0.5,1")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--cache", default="auto", help="executor.cache_bytes settings, comma-separated")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--merge-ahead", action="store_true", help="merge the next candidate in a worker process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(HERE))
        return child(args)
    drop = " --drop-caches: the page cache emptied before each candidate;" if args.drop_caches else ""
    drop += " merge-ahead on (peak RSS includes its worker);" if args.merge_ahead else ""
    print(f"device {args.device}; population 4; one generation (4 offspring); {args.limit} dev documents;{drop}")
    print("| size | dtype | params | one model | cache budget | candidate ms | merge ms | model-call ms "
          "| our ms (share) | kept | cache hits/misses | read_bytes | rchar | RSS at start | peak RSS | peak / model | peak device |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gb = 1024 ** 3
    merge_ms: dict = {}
    for size in args.sizes.split(","):
        for dtype in args.dtypes.split(","):
            for cache in args.cache.split(","):
                with tempfile.TemporaryDirectory(dir=os.environ.get("REAL_SIZE_TMP")) as tmp:
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", "--size", size, "--dtype", dtype, "--root", tmp,
                         "--device", args.device, "--limit", str(args.limit), "--cache", cache,
                         *(["--drop-caches"] if args.drop_caches else []),
                         *(["--merge-ahead"] if args.merge_ahead else [])],
                        capture_output=True, text=True,
                    )
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                if out.returncode or not lines:
                    print(f"| {size}B | {dtype} | failed: {(out.stderr.strip().splitlines() or ['?'])[-1]} |")
                    continue
                r = json.loads(lines[-1])
                for row in r["rows"]:
                    share = row["ours_ms"] / row["wall_ms"]
                    print(
                        f"| {size}B | {dtype} | {r['params'] / 1e9:.2f}B | {r['model_bytes'] / gb:.2f} GiB "
                        f"| {row['budget'] / gb:.2f} GiB | {row['wall_ms']:.0f} | {row['merge_ms']:.0f} | {row['model_ms']:.0f} "
                        f"| {row['ours_ms']:.0f} ({share:.1%}) | {'yes' if row['kept'] else 'no'} "
                        f"| {row['hits']}/{row['misses']} "
                        f"| {row['read_bytes'] / gb:.2f} GiB | {row['rchar'] / gb:.2f} GiB "
                        f"| {row['rss_start'] / gb:.2f} GiB "
                        f"| {row['peak_rss'] / gb:.2f} GiB | {row['peak_rss'] / r['model_bytes']:.2f} "
                        f"| {row['peak_device'] / gb:.2f} GiB |"
                    )
                # The offspring only: the initial members are scored without a merge.
                merge_ms[size, dtype, cache] = sorted(row["merge_ms"] for row in r["rows"] if row["merge_ms"] > 0)
    caches = args.cache.split(",")
    if len(caches) > 1:
        print(f"\nmedian merge ms per offspring, cache {caches[0]} / cache {caches[1]}:")
        for (size, dtype, cache), got in merge_ms.items():
            other = merge_ms.get((size, dtype, caches[1]))
            if cache == caches[0] and got and other:
                a, b = got[len(got) // 2], other[len(other) // 2]
                print(f"  {size}B {dtype}: {a:.0f} / {b:.0f} = {a / b:.2f}x")


if __name__ == "__main__":
    main()
