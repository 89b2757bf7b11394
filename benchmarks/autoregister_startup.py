"""What the auto-registration hook costs every Python start.

mergekit_evolver_autoregister.pth runs at every interpreter start in this
environment. This times `python -c pass` with the hook and without it
(MERGEKIT_EVOLVER_NO_AUTOREGISTER=1, which the .pth tests before importing
anything), side by side: runs alternate, so load on a shared machine falls
on both alike, and medians are compared. Target: at most 5 ms more.

--mergekit also times `import mergekit.merge` (what mergekit-yaml loads)
both ways: the hook's cost where it does its work, importing the plugin and
registering its methods. (A bare `import mergekit.merge_methods` grows more,
because the plugin imports mergekit.common, peft and transformers, which any
merge loads anyway.)

Run: .venv/bin/python benchmarks/autoregister_startup.py [--runs 200] [--mergekit]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

OFF = "MERGEKIT_EVOLVER_NO_AUTOREGISTER"


def once(code: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - start


def compare(code: str, runs: int) -> tuple[list[float], list[float]]:
    on = {k: v for k, v in os.environ.items() if k != OFF}
    off = {**on, OFF: "1"}
    with_hook, without = [], []
    for i in range(runs):
        # Alternate which goes first, so neither always runs on a warm cache.
        pair = [(with_hook, on), (without, off)]
        for sink, env in pair if i % 2 else reversed(pair):
            sink.append(once(code, env))
    return with_hook, without


def report(title: str, with_hook: list[float], without: list[float]) -> float:
    a, b = statistics.median(with_hook), statistics.median(without)
    print(f"{title} ({len(with_hook)} runs each, interleaved)")
    print(f"  with hook     median {a * 1e3:8.2f} ms   (p10 {_q(with_hook, 0.1):.2f}, p90 {_q(with_hook, 0.9):.2f})")
    print(f"  without hook  median {b * 1e3:8.2f} ms   (p10 {_q(without, 0.1):.2f}, p90 {_q(without, 0.9):.2f})")
    print(f"  ratio {a / b:.3f}   difference {(a - b) * 1e3:+.2f} ms")
    return (a - b) * 1e3


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--mergekit", action="store_true", help="also time `import mergekit.merge`")
    args = parser.parse_args()

    pth = Path(sysconfig.get_paths()["purelib"]) / "mergekit_evolver_autoregister.pth"
    if not pth.is_file():
        sys.exit(f"{pth} is not installed: reinstall the package (pip install -e .)")
    print(f"python {sys.version.split()[0]}, {sys.executable}")
    difference = report("python -c pass", *compare("pass", args.runs))
    print(f"  target <= 5 ms more: {'met' if difference <= 5 else 'NOT met'}")
    if args.mergekit:
        report("python -c 'import mergekit.merge'", *compare("import mergekit.merge", max(5, args.runs // 20)))


if __name__ == "__main__":
    main()
