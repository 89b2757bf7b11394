"""Seeds derived from the run seed (run -> generation -> slot -> purpose), never global state."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *path: int | str) -> int:
    words = [int(seed)] + [_word(p) for p in path]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0] >> 1)


def derive_rng(seed: int, *path: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *path))


def _word(part: int | str) -> int:
    if isinstance(part, int):
        return part
    return int.from_bytes(part.encode()[:8].ljust(8, b"\0"), "little")
