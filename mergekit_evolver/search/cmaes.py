"""CMA-ES through the `cma` package (pycma), behind the same ask/tell as DE.

Higher fitness is better (pycma minimises, so it is told -f). Bounds use
pycma's own BoundTransform, a smooth reflection into the box, so every asked
vector is inside it. mergekit-evolve never seeded its optimizer; here the seed
is always set (pycma reads seed 0 as "from the clock", so it gets seed + 1).

pycma samples from numpy's global generator, which mergekit (set_seed before a
seeded merge) and others also use. Each ask runs on this optimizer's own saved
global state, and the caller's is put back, so the samples depend on the seed
and the told fitness only.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from mergekit_evolver.search.vector_de import Trial


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
        outer = np.random.get_state()
        try:
            self.es = cma.CMAEvolutionStrategy(start.tolist(), sigma0 * scale, options)
            self._rng_state = np.random.get_state()
        finally:
            np.random.set_state(outer)
        self._best: tuple[Optional[np.ndarray], float] = (None, -np.inf)

    @property
    def population_size(self) -> int:
        return int(self.es.popsize)

    @property
    def best(self) -> tuple[Optional[np.ndarray], float]:
        return self._best

    def ask(self) -> list[Trial]:
        outer = np.random.get_state()
        try:
            np.random.set_state(self._rng_state)
            xs = self.es.ask()
            self._rng_state = np.random.get_state()
        finally:
            np.random.set_state(outer)
        return [Trial(np.asarray(x, dtype=float), i) for i, x in enumerate(xs)]

    def tell(self, trials: Sequence[Trial], fitness: Sequence[float]) -> None:
        """A whole generation's fitness (NaN or None: worse than any other)."""
        values = [(-np.inf if f is None or np.isnan(f) else float(f)) for f in fitness]
        for t, f in zip(trials, values, strict=True):
            if f > self._best[1]:
                self._best = (t.x.copy(), f)
        # A failed candidate is the worst possible, not a hole in the generation.
        worst = min((f for f in values if np.isfinite(f)), default=0.0)
        # The asked arrays themselves: pycma recognises the solutions it injected
        # (its mean-shift samples) by their data, and a list is not matched.
        self.es.tell([t.x for t in trials], [-(f if np.isfinite(f) else worst - 1.0) for f in values])
