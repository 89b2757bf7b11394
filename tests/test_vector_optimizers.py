"""DE and CMA-ES over parameter vectors: bounds, formulas, selection, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from mergekit_evolver.search.bounds import clip, reflect
from mergekit_evolver.search.cmaes import CMAES
from mergekit_evolver.search.vector_de import VectorDE

LO, HI = np.zeros(5), np.ones(5)


def sphere(x: np.ndarray) -> float:
    return -float(np.sum((x - 0.3) ** 2))  # higher is better; optimum 0 at 0.3


def run(opt, evaluations: int) -> float:
    used = 0
    while used < evaluations:
        batch = opt.ask()
        opt.tell(batch, [sphere(t.x) for t in batch])
        used += len(batch)
    return opt.best[1]


def test_reflect_folds_back_across_the_bound_it_crossed():
    lo, hi = np.array([0.0]), np.array([1.0])
    for x, want in ((1.2, 0.8), (-0.3, 0.3), (2.4, 0.4), (-1.25, 0.75), (0.5, 0.5)):
        assert reflect(np.array([x]), lo, hi)[0] == pytest.approx(want)
    assert clip(np.array([1.2, -3.0]), np.zeros(2), np.ones(2)).tolist() == [1.0, 0.0]
    # Not an abs() trick: on a box away from 0 the fold is about the crossed bound.
    assert reflect(np.array([-1.0]), np.array([-2.0]), np.array([2.0]))[0] == -1.0
    assert reflect(np.array([-2.5]), np.array([-2.0]), np.array([2.0]))[0] == pytest.approx(-1.5)


@pytest.mark.parametrize("strategy", ["rand/1/bin", "best/1/bin", "current-to-best/1/bin"])
def test_trials_follow_the_formula_then_crossover_then_reflection(strategy):
    de = VectorDE(LO - 2, HI + 2, population_size=8, strategy=strategy, F=0.7, CR=1.0, seed=3)
    first = de.ask()
    assert all(t.initial for t in first) and len(first) == 8
    de.tell(first, [sphere(t.x) for t in first])
    pop = de.pop.copy()
    for t in de.ask():
        r, x = t.donors, pop[t.slot]
        if strategy == "rand/1/bin":
            v = pop[r[0]] + 0.7 * (pop[r[1]] - pop[r[2]])
        elif strategy == "best/1/bin":
            v = pop[r[-1]] + 0.7 * (pop[r[0]] - pop[r[1]])
        else:
            v = x + 0.7 * (pop[r[-1]] - x) + 0.7 * (pop[r[0]] - pop[r[1]])
        assert np.allclose(t.x, reflect(v, LO - 2, HI + 2))  # CR = 1: every coordinate from v
        assert t.slot not in r[: 3 if strategy == "rand/1/bin" else 2]


def test_binomial_crossover_keeps_the_target_elsewhere_and_moves_at_least_one_coordinate():
    de = VectorDE(np.zeros(20), np.ones(20), population_size=6, CR=0.0, seed=1)
    init = de.ask()
    de.tell(init, [0.0] * 6)
    for t in de.ask():
        assert int(np.sum(t.x != de.pop[t.slot])) == 1  # j_rand only


def test_selection_keeps_trials_at_least_as_fit_as_their_target():
    de = VectorDE(LO, HI, population_size=5, seed=2)
    init = de.ask()
    de.tell(init, [0.5] * 5)
    trials = de.ask()
    kept = de.tell(trials, [0.4, 0.5, 0.6, float("nan"), 0.49])
    assert kept == [False, True, True, False, False]
    assert de.fit.tolist() == [0.5, 0.5, 0.6, 0.5, 0.5]
    assert np.array_equal(de.pop[2], trials[2].x)


def test_steady_mode_replaces_at_once_so_the_next_trial_sees_it():
    de = VectorDE(LO, HI, population_size=5, mode="steady", seed=4)
    de.tell(de.ask(), [0.0] * 5)
    (t,) = de.ask()
    de.tell([t], [1.0])
    assert np.array_equal(de.pop[t.slot], t.x) and de.best[1] == 1.0


def test_de_and_jde_find_the_optimum_of_a_sphere_reproducibly():
    for jde in (False, True):
        results = [run(VectorDE(LO, HI, population_size=12, F=0.6, CR=0.9, jde=jde, seed=7), 2400) for _ in range(2)]
        assert results[0] == results[1]  # same seed, same search
        assert results[0] > -1e-4
    de = VectorDE(LO, HI, population_size=12, jde=True, seed=7)
    run(de, 1200)
    assert np.all((de.F >= 0.1) & (de.F <= 1.0)) and np.all((de.CR >= 0) & (de.CR <= 1))


@pytest.mark.filterwarnings("error")  # e.g. pycma's InjectionWarning when told copies
def test_cma_es_is_seeded_bounded_and_finds_the_optimum():
    runs = []
    for _ in range(2):
        es = CMAES(np.zeros(8), np.ones(8), seed=5, x0=[0.1] * 8, population_size=4)
        seen = []
        for _ in range(120):
            trials = es.ask()
            seen.extend(t.x for t in trials)
            np.random.seed(len(seen))  # others' use of numpy's global RNG changes nothing
            es.tell(trials, [sphere(t.x) for t in trials])
        runs.append(es.best[1])
        assert all(np.all((x >= 0) & (x <= 1)) for x in seen)
    assert runs[0] == runs[1] and runs[0] > -1e-6
    other = CMAES(LO, HI, seed=6)
    assert not np.array_equal(other.ask()[0].x, CMAES(LO, HI, seed=5).ask()[0].x)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lo < hi"):
        VectorDE([0, 1], [1, 1])
    with pytest.raises(ValueError, match="population of at least 5"):
        VectorDE(LO, HI, population_size=4)
    with pytest.raises(ValueError, match="CR in"):
        VectorDE(LO, HI, CR=1.5)
