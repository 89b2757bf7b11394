"""Keyed random masks for DE crossover and DARE, drawn on the math device.

A mask is a pure function of its key (seed, purpose, tensor name, shape), its
probability and the unit index: draw i of a key is lane i % 4 (16 bits, little
endian, read as int16 s) of splitmix64(key + (i // 4 + 1) * golden), and a unit
is taken when s + 32768 < round(p * 65536). The hash is written with torch int64 adds,
wrapping multiplies, xors and shifts only, so the bits are the same on every
device, thread count, block size and tensor order, and a smaller CR's mask is a
subset of a larger CR's for the same key (only the threshold moves).

Probabilities are resolved to 1/65536: finer than any F/CR a search will tell
apart, and four draws per 64-bit hash keep mask generation near memory speed.

Masks are applied as 32-bit masks of -1/0 (`bits & m`, `x ^ ((x ^ v) & m)`)
rather than as bool masks through `torch.where`/`masked_fill_`: on CPU those are
several times slower than the whole DE arithmetic, and selecting bits gives
exactly the values `where` would.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Optional, Sequence

import torch

Granularity = Literal["element", "row", "tensor"]
CrossoverKind = Literal["binomial", "exponential"]

_LEVELS = 1 << 16
_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# splitmix64's finalizer: (xor-shift right by s, then multiply by m) x 3.
_ROUNDS = ((30, _M1), (27, _M2), (31, None))


def _signed(u: int) -> int:
    """A 64-bit pattern as the int64 torch stores it (torch has no uint64)."""
    u &= _U64
    return u - (1 << 64) if u >> 63 else u


def mix64(u: int) -> int:
    """splitmix64's finalizer in Python integers: the reference the torch
    version is tested against, and the scalar draws (j_rand, run start)."""
    z = u & _U64
    for shift, mult in _ROUNDS:
        z ^= z >> shift
        if mult is not None:
            z = (z * mult) & _U64
    return z


def _mix64_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """mix64 in place on an int64 tensor. An int64 `>>` is arithmetic, so the
    logical shift is emulated by clearing the copied sign bits; multiplies wrap."""
    for shift, mult in _ROUNDS:
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(_signed(mult))
    return z


def key(seed: int, *parts: object) -> int:
    """A stream's 64-bit key for (seed, parts...); parts are hashed by their
    str(), so a tensor name and a shape tuple are enough to tell apart."""
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _draw_index(k: int, n: int) -> int:
    """One uniform index in [0, n) for key k (bias below n / 2**64)."""
    return mix64(k + _GOLDEN) % n


def _draw(k: int, i: int) -> int:
    """Draw i of key k as an int16 value, in Python integers (see Draws.lanes)."""
    lane = (mix64(k + (i // 4 + 1) * _GOLDEN) >> (16 * (i % 4))) & 0xFFFF
    return lane - _LEVELS if lane >> 15 else lane


def _threshold(p: float) -> int:
    return int(round(p * _LEVELS))


class Draws:
    """16-bit uniform draws of keyed streams over index ranges, with scratch
    buffers reused across the blocks of one tensor (block size never changes
    a draw: it depends on the key and index only)."""

    def __init__(self, device: torch.device | str | None = None, block: int = 0):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cap = 0
        self.reserve(block)

    def reserve(self, n: int) -> None:
        """Scratch for blocks of up to n draws (grown on demand)."""
        if n <= self._cap:
            return
        words = n // 4 + 2
        dev = self.device
        # k * golden for k = 0..words-1: each block's counters are one add away.
        self._steps = torch.arange(words, dtype=torch.int64, device=dev).mul_(_signed(_GOLDEN))
        self._z = torch.empty(words, dtype=torch.int64, device=dev)
        self._tmp = torch.empty(words, dtype=torch.int64, device=dev)
        self._mask = torch.empty(n, dtype=torch.int32, device=dev)
        self._cap = n

    def lanes(self, k: int, lo: int, hi: int) -> torch.Tensor:
        """Draws lo..hi-1 of key k as int16, uniform on [-32768, 32768)."""
        self.reserve(hi - lo)
        first, last = lo // 4, (hi + 3) // 4
        words = last - first
        z = self._z[:words]
        torch.add(self._steps[:words], _signed(k + (first + 1) * _GOLDEN), out=z)
        _mix64_(z, self._tmp[:words])
        skip = lo - 4 * first
        return z.view(torch.int16)[skip : skip + hi - lo]

    def scratch(self, n: int, fill: int) -> torch.Tensor:
        """An int32 mask buffer of n units, all set to fill (0 or -1)."""
        self.reserve(n)
        return self._mask[:n].fill_(fill)

    def below(self, k: int, p: float, lo: int, hi: int) -> torch.Tensor:
        """-1 (int32) where draw i of key k is below p, else 0, for i in lo..hi-1.
        The returned view is scratch: valid until the next call."""
        self.reserve(hi - lo)
        t = _threshold(p)
        if t <= 0 or t >= _LEVELS:
            return self.scratch(hi - lo, 0 if t <= 0 else -1)
        m = self._mask[: hi - lo]
        m.copy_(self.lanes(k, lo, hi))
        # s < t - 32768  <=>  the sign of s - (t - 32768), spread by >> 31.
        return m.sub_(t - _LEVELS // 2).bitwise_right_shift_(31)


def unit_count(shape: Sequence[int], granularity: Granularity) -> int:
    if granularity == "tensor" or len(shape) == 0:
        return 1
    if granularity == "row":
        return int(shape[0])
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


class Crossover:
    """One tensor's crossover mask, applied block by block.

    Binomial: each unit independently with probability CR, and one unit
    (j_rand) always, so every tensor moves. Exponential: one cyclic run of units
    from a random start, of length 1 plus the number of consecutive draws below
    CR (the classic 'continue while rand < CR' loop), capped at the unit count.
    A whole-tensor unit is a single Bernoulli(CR) draw in both kinds: forcing it
    (j_rand) or running over one unit would always take the mutant and make CR
    meaningless.
    """

    def __init__(
        self,
        shape: Sequence[int],
        cr: float,
        *,
        seed: int,
        name: str,
        kind: CrossoverKind = "binomial",
        granularity: Granularity = "element",
    ):
        self.shape = tuple(int(s) for s in shape)
        self.cr = cr
        self.kind = kind
        self.whole = granularity == "tensor" or len(self.shape) == 0
        self.granularity: Granularity = "tensor" if self.whole else granularity
        self.units = unit_count(self.shape, self.granularity)
        # Elements per unit: a row's elements are contiguous in a flat block.
        self.unit_size = (
            1 if self.granularity == "element" else unit_count(self.shape[1:], "element")
        )
        parts = ("crossover", kind, self.granularity, name, self.shape)
        self.key = key(seed, *parts, "draws")
        n = self.units
        if self.whole:
            self.take_all = _draw(self.key, 0) < _threshold(cr) - _LEVELS // 2
        elif n == 0:
            self.j_rand, self.start, self.length = -1, 0, 0
        elif kind == "binomial":
            self.j_rand = _draw_index(key(seed, *parts, "j_rand"), n)
        else:
            self.start = _draw_index(key(seed, *parts, "start"), n)
            self.length = _run_length(key(seed, *parts, "run"), n, cr)

    @property
    def identity(self) -> bool:
        """True when every unit takes the mutant (the trial is v itself)."""
        if self.whole:
            return self.take_all
        return self.cr >= 1

    def unit_mask(self, lo: int, hi: int, draws: Draws) -> torch.Tensor:
        """-1 (int32) for units lo..hi-1 that take the mutant, else 0 (scratch)."""
        if self.whole:
            return draws.scratch(hi - lo, -1 if self.take_all else 0)
        if self.kind == "binomial":
            m = draws.below(self.key, self.cr, lo, hi)
            if lo <= self.j_rand < hi:
                m[self.j_rand - lo] = -1
            return m
        m = draws.scratch(hi - lo, 0)
        end = self.start + self.length
        for a, b in ((self.start, min(end, self.units)), (0, end - self.units)):
            a, b = max(a, lo), min(b, hi)
            if a < b:
                m[a - lo : b - lo] = -1
        return m

    def apply_(
        self, v: torch.Tensor, x: torch.Tensor, lo: int = 0, draws: Optional[Draws] = None
    ) -> torch.Tensor:
        """u = where(mask, v, x) into v, for flat float32 blocks v, x holding
        elements lo.. of the tensor (lo and len(v) whole units)."""
        if self.identity or v.numel() == 0:
            return v
        if self.whole:
            return v.copy_(x)
        size = self.unit_size
        first = lo // size
        count = v.numel() // size
        m = self.unit_mask(first, first + count, draws or Draws(v.device))
        vb, xb = _as_bits(v), _as_bits(x)
        if size > 1:
            vb, xb, m = vb.view(count, size), xb.view(count, size), m.view(count, 1)
        vb.bitwise_xor_(xb).bitwise_and_(m).bitwise_xor_(xb)
        return v


def _run_length(k: int, n: int, cr: float) -> int:
    if cr >= 1:
        return n
    # A scalar loop over a few blocks: draws on the CPU are the same bits.
    draws = Draws(block=4096)
    length = 1
    while length < n:
        hi = min(n, length + 4096)
        misses = torch.nonzero(draws.below(k, cr, length, hi) == 0)
        if misses.numel():
            return length + int(misses[0])
        length = hi
    return n


def crossover_mask(
    shape: Sequence[int],
    cr: float,
    *,
    seed: int,
    name: str,
    kind: CrossoverKind = "binomial",
    granularity: Granularity = "element",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Where the trial vector takes the mutant: a bool mask broadcastable to shape
    (see Crossover for the semantics)."""
    shape = tuple(int(s) for s in shape)
    plan = Crossover(shape, cr, seed=seed, name=name, kind=kind, granularity=granularity)
    units = plan.unit_mask(0, plan.units, Draws(device)) != 0
    if plan.whole:
        return units.reshape((1,) * len(shape))
    if plan.granularity == "row":
        return units.reshape((shape[0],) + (1,) * (len(shape) - 1))
    return units.reshape(shape)


class Keep:
    """DARE's keep mask for the term-th difference of a tensor: each element
    kept with probability density, applied block by block."""

    def __init__(
        self,
        shape: Sequence[int],
        density: float,
        *,
        seed: int,
        name: str,
        term: int,
    ):
        self.density = density
        self.key = key(seed, "dare", term, name, tuple(int(s) for s in shape))

    def mask(self, lo: int, hi: int, draws: Draws) -> torch.Tensor:
        """-1 (int32) for kept elements lo..hi-1, else 0 (scratch)."""
        return draws.below(self.key, self.density, lo, hi)

    def apply_(
        self, diff: torch.Tensor, lo: int = 0, draws: Optional[Draws] = None
    ) -> torch.Tensor:
        """where(keep, diff / density, 0) in place on a flat float32 block of
        elements lo..; zeroing by bits gives the +0.0 masked_fill would."""
        m = self.mask(lo, lo + diff.numel(), draws or Draws(diff.device))
        _as_bits(diff).bitwise_and_(m)
        return diff.div_(self.density)


def keep_mask(
    shape: Sequence[int],
    density: float,
    *,
    seed: int,
    name: str,
    term: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """DARE's keep mask as a bool tensor of the given shape."""
    shape = tuple(int(s) for s in shape)
    plan = Keep(shape, density, seed=seed, name=name, term=term)
    return (plan.mask(0, unit_count(shape, "element"), Draws(device)) != 0).reshape(shape)
