"""CMA-ES through the `cma` package (pycma), behind the same ask/tell as DE.

Higher fitness is better (pycma minimises, so it is told -f). Bounds use
pycma's own BoundTransform, a smooth reflection into the box, so every asked
vector is inside it. mergekit-evolve never seeded its optimizer; here the seed
is always set (pycma reads seed 0 as "from the clock", so it gets seed + 1).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class CMAES:
    def __init__(
        self,
        lo: Sequence[float],
        hi: Sequence[float],
        *,
        x0: Optional[Sequence[float]] = None,
        sigma0: float = 1 / 6,
        population_size: Optional[int] = None,
        seed: int = 0,
    ):
        import cma

        self.lo, self.hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        if self.lo.shape != self.hi.shape or np.any(self.hi <= self.lo):
            raise ValueError("bounds need lo < hi in every coordinate")
        start = (self.lo + self.hi) / 2 if x0 is None else np.asarray(x0, dtype=float)
        options = {
            "bounds": [self.lo.tolist(), self.hi.tolist()],
            "seed": int(seed) + 1,
            "verbose": -9,
        }
        if population_size:
            options["popsize"] = int(population_size)
        # sigma0 is relative to the box width, as mergekit-evolve's 1/6 of [0, 1].
        scale = float(np.max(self.hi - self.lo))
        self.es = cma.CMAEvolutionStrategy(start.tolist(), sigma0 * scale, options)
        self._best: tuple[Optional[np.ndarray], float] = (None, -np.inf)

    @property
    def best(self) -> tuple[Optional[np.ndarray], float]:
        return self._best

    def ask(self) -> list[np.ndarray]:
        return [np.asarray(x, dtype=float) for x in self.es.ask()]

    def tell(self, xs: Sequence[np.ndarray], fitness: Sequence[float]) -> None:
        values = [(-np.inf if f is None or np.isnan(f) else float(f)) for f in fitness]
        for x, f in zip(xs, values, strict=True):
            if f > self._best[1]:
                self._best = (np.asarray(x).copy(), f)
        # A failed candidate is the worst possible, not a hole in the generation.
        worst = min((f for f in values if np.isfinite(f)), default=0.0)
        self.es.tell([list(x) for x in xs], [-(f if np.isfinite(f) else worst - 1.0) for f in values])
