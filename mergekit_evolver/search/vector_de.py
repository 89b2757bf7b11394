"""Differential evolution over parameter vectors (for recipe-space search).

The optimizer knows nothing of models: it proposes vectors (ask) and learns
from their fitness (tell), higher is better. Strategies, in the DE
literature's names:

    rand/1/bin             v = x_r1 + F*(x_r2 - x_r3)
    best/1/bin             v = x_best + F*(x_r1 - x_r2)
    current-to-best/1/bin  v = x_i + F*(x_best - x_i) + F*(x_r1 - x_r2)

then binomial crossover with one forced coordinate (j_rand), and the trial is
brought back into the box (reflect or clip). Selection is classic one-to-one:
the trial replaces its target if it is at least as fit.

`jde=True` is jDE (Brest et al. 2006): each individual carries its own F and
CR; before building its trial, F is redrawn from U(0.1, 1.0) with probability
0.1 and CR from U(0, 1) with probability 0.1, and the drawn values survive only
with the trial.

`generational` mode builds a whole generation from one snapshot and replaces at
the end; `steady` mode builds each trial from the population as it stands and
replaces at once, so trials can be evaluated asynchronously, in any number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

from mergekit_evolver.search.bounds import Handling, repair

Strategy = Literal["rand/1/bin", "best/1/bin", "current-to-best/1/bin"]
_DONORS = {"rand/1/bin": 3, "best/1/bin": 2, "current-to-best/1/bin": 2}


@dataclass(frozen=True)
class Trial:
    x: np.ndarray
    slot: int  # the population member it is scored for (or competes with)
    initial: bool = False  # a member of the initial population, not a trial
    donors: tuple[int, ...] = ()  # r1, r2[, r3] then best where the strategy uses it
    F: float = 0.0
    CR: float = 0.0


class VectorDE:
    def __init__(
        self,
        lo: Sequence[float],
        hi: Sequence[float],
        *,
        population_size: int = 10,
        strategy: Strategy = "rand/1/bin",
        F: float = 0.5,
        CR: float = 0.9,
        jde: bool = False,
        mode: Literal["generational", "steady"] = "generational",
        bounds: Handling = "reflect",
        seed: int = 0,
        x0: Optional[Sequence[float]] = None,
    ):
        self.lo, self.hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
        if self.lo.shape != self.hi.shape or np.any(self.hi <= self.lo):
            raise ValueError("bounds need lo < hi in every coordinate")
        if population_size < _DONORS[strategy] + 2:
            raise ValueError(f"{strategy} needs a population of at least {_DONORS[strategy] + 2}")
        if not (0 <= F <= 2 and 0 <= CR <= 1):
            raise ValueError(f"F must be in [0, 2] and CR in [0, 1]; got F={F}, CR={CR}")
        self.strategy, self.mode, self.bounds = strategy, mode, bounds
        self.rng = np.random.default_rng(seed)
        n, d = population_size, self.lo.size
        init = self.lo + self.rng.random((n, d)) * (self.hi - self.lo)
        if x0 is not None:
            init[0] = repair(np.asarray(x0, dtype=float), self.lo, self.hi, bounds)
        self.pop = init
        self.fit = np.full(n, -np.inf)
        self.F = np.full(n, float(F))
        self.CR = np.full(n, float(CR))
        self.jde = jde
        self._unscored = list(range(n))  # the initial population is asked first
        self._next_target = 0

    @property
    def best(self) -> tuple[np.ndarray, float]:
        i = int(np.argmax(self.fit))
        return self.pop[i].copy(), float(self.fit[i])

    def ask(self) -> list[Trial]:
        """The next vectors to score: the initial population, then one trial per
        target (generational) or a single trial (steady)."""
        if self._unscored:
            return [Trial(self.pop[i].copy(), i, initial=True) for i in self._unscored]
        if self.mode == "steady":
            i = self._next_target
            self._next_target = (i + 1) % len(self.pop)
            return [self._trial(i, self.pop)]
        snapshot = self.pop.copy()
        return [self._trial(i, snapshot) for i in range(len(self.pop))]

    def tell(self, trials: Sequence[Trial], fitness: Sequence[float]) -> list[bool]:
        """Record fitness (NaN counts as worst); returns which trials were kept."""
        kept = []
        for trial, f in zip(trials, fitness, strict=True):
            f = -np.inf if f is None or np.isnan(f) else float(f)
            i = trial.slot
            if trial.initial:
                self.fit[i] = f
                self._unscored.remove(i)
                kept.append(True)
                continue
            accept = f >= self.fit[i]
            if accept:
                self.pop[i], self.fit[i] = trial.x, f
                self.F[i], self.CR[i] = trial.F, trial.CR
            kept.append(bool(accept))
        return kept

    def _trial(self, i: int, pop: np.ndarray) -> Trial:
        F, CR = self.F[i], self.CR[i]
        if self.jde:
            if self.rng.random() < 0.1:
                F = 0.1 + 0.9 * self.rng.random()
            if self.rng.random() < 0.1:
                CR = self.rng.random()
        others = [j for j in range(len(pop)) if j != i]
        r = self.rng.choice(others, size=_DONORS[self.strategy], replace=False)
        best = int(np.argmax(self.fit))
        x = pop[i]
        if self.strategy == "rand/1/bin":
            v = pop[r[0]] + F * (pop[r[1]] - pop[r[2]])
        elif self.strategy == "best/1/bin":
            v = pop[best] + F * (pop[r[0]] - pop[r[1]])
        else:
            v = x + F * (pop[best] - x) + F * (pop[r[0]] - pop[r[1]])
        mask = self.rng.random(x.size) < CR
        mask[self.rng.integers(x.size)] = True  # j_rand: the trial always moves
        u = repair(np.where(mask, v, x), self.lo, self.hi, self.bounds)
        donors = tuple(int(j) for j in r) + ((best,) if self.strategy != "rand/1/bin" else ())
        return Trial(u, i, donors=donors, F=float(F), CR=float(CR))
