"""Kinship throughput as a ratio to plainly reading the same weights, measured side by side.

Run: .venv/bin/python benchmarks/kinship_throughput.py [--vocab 16000] [--hidden 768] [--layers 4]
     [--dtype float32] [--repeats 3] [--chunk N] [--threads N]

Builds a random Llama base and three random Llama "fine-tunes" (~210 MB each
in float32 at the defaults) with transformers in a temp dir, then times, round
by round interleaved and best of --repeats (files warm in the page cache):
  - raw read: every safetensors file read whole with readinto;
  - loader read: every tensor of every input read with FileLoader (the pread
    loader kinship uses), nothing else;
  - kinship: `compute_kinship(models, base)` with all metrics, and with pcc,cos.
GB/s counts the weight bytes of all four inputs; the ratio is loader read's
best time divided by kinship's (1.0 = kinship as fast as reading the tensors;
higher is better). A fresh process then runs kinship once and reports how far
its resident memory rose above what the imports left, next to the size of the
weights: it follows the largest tensor, not the models.

On a machine shared with other jobs, torch's default threads can stall in
every parallel op waiting for a descheduled thread; --threads 1 measures the
code rather than the neighbours.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_evolver.kinship.metrics import CHUNK_ELEMENTS, compute_kinship
from mergekit_evolver.population.store import FileLoader


def build(root: Path, args) -> tuple[Path, list[Path]]:
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    dtype = getattr(torch, args.dtype)
    paths = []
    for i, name in enumerate(["base", "m1", "m2", "m3"]):
        torch.manual_seed(i)
        model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(root / name, safe_serialization=True)
        paths.append(root / name)
        del model
    return paths[0], paths[1:]


def weight_files(paths: list[Path]) -> list[Path]:
    return [f for p in paths for f in sorted(p.glob("*.safetensors"))]


def raw_read(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def loader_read(paths: list[Path]) -> None:
    for path in paths:
        loader = FileLoader(path)
        for name in loader.index.tensor_paths:
            loader.get_tensor(name)


def rss_of_kinship(base: Path, models: list[Path], chunk: int) -> tuple[float, float]:
    """(resident MB before, peak resident MB during) one kinship run in a fresh
    process; the peak is reset after import, so imports' transients don't count."""
    code = (
        "import sys\n"
        "from mergekit_evolver.kinship.metrics import compute_kinship\n"
        "import mergekit_evolver.population.store  # kinship's lazy import: count it with the imports\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key): return int(line.split()[1]) / 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # resets VmHWM to VmRSS\n"
        "before = status('VmRSS')\n"
        "compute_kinship(sys.argv[3:], sys.argv[2], chunk_elements=int(sys.argv[1]))\n"
        "print(before, status('VmHWM'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(chunk), str(base), *map(str, models)],
                         check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), float(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=CHUNK_ELEMENTS, help="kinship's float64 chunk, in elements")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kinship_bench_") as tmp:
        base, models = build(Path(tmp), args)
        inputs = [base, *models]
        files = weight_files(inputs)
        total = sum(f.stat().st_size for f in files)
        largest = max(t.numel() * t.element_size() for t in
                      (FileLoader(base).get_tensor(n) for n in FileLoader(base).index.tensor_paths))

        contenders = {
            "raw read (readinto)": lambda: raw_read(files),
            "loader read (FileLoader)": lambda: loader_read(inputs),
            "kinship pcc,cos,ed": lambda: compute_kinship(models, base, chunk_elements=args.chunk),
            "kinship pcc,cos": lambda: compute_kinship(models, base, "pcc,cos", chunk_elements=args.chunk),
        }
        for fn in contenders.values():
            fn()  # warm-up: page cache, allocator, thread pool
        best = {name: float("inf") for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)

        before, peak = rss_of_kinship(base, models, args.chunk)

    read = best["loader read (FileLoader)"]
    print(f"inputs: base + 3 models, {args.dtype}, {total / 4 / 1e6:.0f} MB each, {total / 1e6:.0f} MB in all; "
          f"largest tensor {largest / 1e6:.1f} MB; chunk {args.chunk} elements; threads={torch.get_num_threads()}; "
          f"best of {args.repeats}, "
          "files warm in page cache")
    print(f"{'contender':28} {'best s':>8} {'GB/s':>8} {'ratio to loader read':>21}")
    for name, seconds in best.items():
        print(f"{name:28} {seconds:8.3f} {total / seconds / 1e9:8.2f} {read / seconds:21.2f}")
    print(f"kinship/read throughput ratio (all metrics): {read / best['kinship pcc,cos,ed']:.2f}")
    print(f"kinship in a fresh process: resident {before:.0f} MB after import, peak {peak:.0f} MB during the run "
          f"(+{peak - before:.0f} MB) for {total / 1e6:.0f} MB of weights")


if __name__ == "__main__":
    main()
