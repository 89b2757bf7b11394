"""Keyed random masks for DE crossover and DARE, identical on every device.

A mask depends only on its key (seed, tensor name, shape, purpose) and its
probability. Random bits come from numpy's SFC64 on the CPU, whose raw stream is
fixed for a given seed, so neither the thread count, the order tensors are
processed in, nor the device that later does the arithmetic can change a mask.
Masks are built on the CPU and moved to the math device.

Probabilities are resolved to 1/65536: each unit draws 16 random bits. That is
finer than any F/CR a search will tell apart, and it keeps mask generation at
memory speed (the naive torch.rand path costs several times the DE arithmetic).
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import numpy as np
import torch

Granularity = Literal["element", "row", "tensor"]
CrossoverKind = Literal["binomial", "exponential"]

_LEVELS = 1 << 16


def stream(seed: int, *key: object) -> np.random.SFC64:
    """An independent bit stream for (seed, key...); key parts are hashed by
    their str(), so a tensor name and a shape tuple are enough to tell apart."""
    digest = hashlib.blake2b(
        "\x1f".join(str(part) for part in key).encode(), digest_size=16
    ).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return np.random.SFC64(np.random.SeedSequence([int(seed), *words]))


def _threshold(p: float) -> int:
    return int(round(p * _LEVELS))


def _uniform16(bits: np.random.SFC64, n: int) -> np.ndarray:
    """n uniform integers in [0, 65536), taken four to a 64-bit draw."""
    return bits.random_raw((n + 3) // 4).view(np.uint16)[:n]


def bernoulli_units(bits: np.random.SFC64, n: int, p: float) -> torch.Tensor:
    """n independent draws that are True with probability p (to 1/65536)."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if p >= 1:
        return torch.ones(n, dtype=torch.bool)
    # Shift into int16 because torch has no comparison kernel for uint16 on CPU.
    signed = torch.from_numpy(_uniform16(bits, n).view(np.int16))
    return signed < (_threshold(p) - _LEVELS // 2)


def _uniform_index(bits: np.random.SFC64, n: int) -> int:
    return int(bits.random_raw() % n)


def _run_length(bits: np.random.SFC64, n: int, cr: float) -> int:
    """Exponential crossover's run: 1 plus the number of consecutive draws
    below CR, capped at n (the classic DE 'continue while rand < CR' loop)."""
    if cr >= 1:
        return n
    threshold = _threshold(cr)
    length = 1
    while length < n:
        block = _uniform16(bits, min(4096, n - length))
        misses = np.flatnonzero(block >= threshold)
        if misses.size:
            return length + int(misses[0])
        length += block.size
    return n


def unit_count(shape: Sequence[int], granularity: Granularity) -> int:
    if granularity == "tensor" or len(shape) == 0:
        return 1
    if granularity == "row":
        return int(shape[0])
    return int(np.prod(shape, dtype=np.int64))


def crossover_mask(
    shape: Sequence[int],
    cr: float,
    *,
    seed: int,
    name: str,
    kind: CrossoverKind = "binomial",
    granularity: Granularity = "element",
) -> torch.Tensor:
    """Where the trial vector takes the mutant: a bool mask broadcastable to shape.

    Binomial: each unit independently with probability CR, and one unit
    (j_rand) always, so every tensor moves. Exponential: one cyclic run of units
    from a random start. A whole-tensor unit is a single Bernoulli(CR) draw in
    both kinds: forcing it (j_rand) or running over one unit would always take
    the mutant and make CR meaningless.
    """
    shape = tuple(int(s) for s in shape)
    n = unit_count(shape, granularity)
    bits = stream(seed, "crossover", kind, granularity, name, shape)
    if granularity == "tensor" or len(shape) == 0:
        units = bernoulli_units(bits, 1, cr)
    elif kind == "binomial":
        units = bernoulli_units(bits, n, cr)
        units[_uniform_index(bits, n)] = True
    else:
        start = _uniform_index(bits, n)
        length = _run_length(bits, n, cr)
        units = torch.zeros(n, dtype=torch.bool)
        end = start + length
        units[start : min(end, n)] = True
        if end > n:
            units[: end - n] = True
    return _broadcastable(units, shape, granularity)


def keep_mask(
    shape: Sequence[int], density: float, *, seed: int, name: str, term: int
) -> torch.Tensor:
    """DARE's keep mask for the term-th difference of a tensor: each element
    kept with probability density."""
    shape = tuple(int(s) for s in shape)
    bits = stream(seed, "dare", term, name, shape)
    n = unit_count(shape, "element")
    return bernoulli_units(bits, n, density).reshape(shape)


def _broadcastable(
    units: torch.Tensor, shape: tuple[int, ...], granularity: Granularity
) -> torch.Tensor:
    if granularity == "tensor" or len(shape) == 0:
        return units.reshape((1,) * len(shape))
    if granularity == "row":
        return units.reshape((shape[0],) + (1,) * (len(shape) - 1))
    return units.reshape(shape)
