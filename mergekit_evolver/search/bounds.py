"""Keeping parameter vectors inside their box, the way DE and CMA-ES users expect.

`reflect` folds a coordinate back across the bound it crossed, as often as
needed (x = hi + d becomes hi - d), so no mass piles up on the bound and no
sign is thrown away (an abs() trick would send lo - d to lo + d for every d,
whatever the box). `clip` puts it on the bound.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Handling = Literal["reflect", "clip"]


def reflect(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    width = hi - lo
    # Fold onto a period of 2*width, then mirror the upper half.
    t = np.mod(x - lo, 2 * width)
    return lo + np.where(t > width, 2 * width - t, t)


def clip(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.clip(x, lo, hi)


def repair(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, handling: Handling) -> np.ndarray:
    return reflect(x, lo, hi) if handling == "reflect" else clip(x, lo, hi)
