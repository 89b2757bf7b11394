"""Peak RSS of a weight-space run for populations of 4 and 16 copies of one model.

Run: .venv/bin/python benchmarks/memory_population.py [--hidden 512] [--layers 8]

Each population size runs `mergekit-evolver evolve` logic in a fresh process
(one generation, every member an offspring target, both selection modes) on
copies of one random Llama (~100 MB at the defaults) and reports the process's
peak RSS. Target: the 16 run uses at most 1.2x the memory of the 4 run.

`--cache` lists executor.cache_bytes settings (default "0,2x"): 0 reads every
member from its files (and is what "auto" gives on a CPU run); "Nx" is a
budget of N models: 2x binds at both sizes, so the peak must not grow with
the population; 20x holds every member of either, so its peak grows with N
up to the budget.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def child(args) -> None:
    from mergekit_evolver.config import EvolveConfig
    from mergekit_evolver.run import evolve
    from toy_world import ToyWorld, run_config

    root = Path(args.root)
    members = []
    for i in range(args.n):
        dest = root / f"cache{args.cache}" / f"pop{args.n}_{args.mode}" / f"member{i}"
        shutil.copytree(root / "model", dest)
        members.append(dest)
    world = ToyWorld(models=members, base=root / "model", include_path=root / "tasks")
    config = run_config(world, de__generations=1)
    config["selection"] = {"mode": args.mode}
    config["report"] = {"tasks": [], "baselines": []}
    size = sum(f.stat().st_size for f in (root / "model").glob("*.safetensors"))
    cache = args.cache
    config["executor"] = {"cache_bytes": "auto" if cache == "auto" else int(float(cache.rstrip("x")) * size)
                          if cache.endswith("x") else int(cache)}
    evolve(EvolveConfig.model_validate(config), root / f"cache{args.cache}" / f"run{args.n}_{args.mode}", log=lambda _: None)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": args.n, "mode": args.mode, "peak_mb": peak_kb / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--cache", default="0,2x")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from toy_world import reverse_items, save_model, write_task

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_model(root / "model", seed=0, hidden=args.hidden, layers=args.layers)
        size_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
        (root / "tasks").mkdir()
        write_task(root / "tasks", "toy_dev", reverse_items(1, 30))
        write_task(root / "tasks", "toy_test", reverse_items(2, 30))
        print(f"model: {size_mb:.0f} MB of safetensors; one generation per run")
        print(f"{'cache':6} {'selection':12} {'N=4 peak MB':>12} {'N=16 peak MB':>13} {'ratio 16/4':>11}")
        for cache in args.cache.split(","):
            for mode in ("individual", "merged"):
                peaks = {}
                for n in (4, 16):
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", "--n", str(n), "--mode", mode, "--root", tmp,
                         "--cache", cache],
                        capture_output=True, text=True, check=True,
                    )
                    peaks[n] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
                print(f"{cache:6} {mode:12} {peaks[4]:12.0f} {peaks[16]:13.0f} {peaks[16] / peaks[4]:11.2f}")
        print("target: ratio <= 1.2")


if __name__ == "__main__":
    main()
