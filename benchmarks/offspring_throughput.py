"""Offspring throughput as a ratio to the plain fused add, measured side by side.

Run: .venv/bin/python benchmarks/offspring_throughput.py [--mb 256] [--repeats 5]

Every contender runs on the same float32 tensors (--mb MB each), interleaved
round by round; each line reports its median and best time, and the plain
expression's median divided by its median (1.0 = as fast as `a + F*(b - c)`;
higher is better). Medians, because on a shared machine a best-of can be one
lucky round. The offspring goes through mergekit's own method call
(`merge_tensors`), the same kernel `mergekit-evolver yaml` runs per tensor,
masks included: they are drawn by the keyed hash on the tensors' device.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mergekit.merge_methods import merge_tensors

import mergekit_evolver  # noqa: F401  (registers de_rand1)

F, CR = 0.5, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of each tensor in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    # A weight matrix, so row granularity has rows to choose.
    cols = 4096
    n = args.mb * 1024 * 1024 // 4 // cols * cols
    gen = torch.Generator().manual_seed(0)
    x, r1, r2, r3 = (torch.randn(n // cols, cols, generator=gen) for _ in range(4))

    def plain():
        return r1 + F * (r2 - r3)

    def naive_offspring():
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) < CR
        return torch.where(mask, r1 + F * (r2 - r3), x)

    def offspring(**extra):
        params = {"F": F, "CR": CR, "seed": 1, **extra}
        return lambda: merge_tensors(
            [x, r1, r2, r3], "de_rand1", base_index=0, name="bench.weight", parameters=params
        )

    contenders = {
        "plain a + F*(b - c)": plain,
        "naive torch.rand + where": naive_offspring,
        "de_rand1 binomial/element": offspring(),
        "de_rand1 binomial/row": offspring(granularity="row"),
        "de_rand1 exponential/element": offspring(crossover="exponential", CR=0.9),
        "de_rand1 binomial + DARE 0.5": offspring(sparsify="dare", density=0.5),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()  # warm-up: allocator, thread pool
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            del out

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["plain a + F*(b - c)"]
    print(f"tensors: 4 x {args.mb} MB float32 ({n:,} elements), "
          f"threads={torch.get_num_threads()}, {args.repeats} rounds")
    print(f"{'contender':32} {'median s':>9} {'best s':>8} {'GB/s out':>9} {'ratio to plain':>15}")
    for name, seconds in median.items():
        print(f"{name:32} {seconds:9.3f} {min(times[name]):8.3f} "
              f"{n * 4 / seconds / 1e9:9.2f} {base / seconds:15.2f}")
    target = base / median["de_rand1 binomial/element"]
    print(f"offspring/plain throughput ratio, medians (target >= 0.8): {target:.2f}")


if __name__ == "__main__":
    main()
