"""The Evolver's ask/tell semantics, without models: who competes with whom,
and what is kept."""

from __future__ import annotations

import pytest

from mergekit_evolver.search.evolver import Evolver
from mergekit_evolver.search.protocol import Result


def strategy(mode="individual", operator="de_current_to_rand1", fitness=(0.5, 0.2, 0.8, 0.4), **kw):
    s = Evolver(
        [f"m{i}" for i in range(len(fitness))], list(fitness),
        operator=operator, mode=mode, generations=kw.pop("generations", 2), seed=7, **kw,
    )
    s.end_generation()  # generation 0: the starting population
    return s


def tell(s, p, fitness):
    return s.tell(p, Result(fitness))


def every_proposal(s):
    """Every proposal to the end, each generation closed when it is told."""
    while not s.done:
        p = s.ask()
        if p is None:
            s.end_generation()
        else:
            yield p


def test_individual_mode_keeps_only_strictly_better_offspring():
    s = strategy()
    told = {0: 0.6, 1: 0.2, 2: 0.7, 3: None}  # better, equal, worse, invalid
    decisions = {}
    for slot in range(4):
        p = s.ask()
        assert (p.generation, p.slot, p.target) == (1, slot, f"m{slot}")
        decisions[slot] = tell(s, p, told[slot])
    assert decisions == {0: True, 1: False, 2: False, 3: False}
    assert s.members == ["g001_s00", "m1", "m2", "m3"]
    assert s.fitness == [0.6, 0.2, 0.8, 0.4]


def test_individual_mode_is_synchronous_within_a_generation():
    s = strategy()
    first = s.ask()
    tell(s, first, 0.99)  # accepted, but not visible until the generation ends
    rest = []
    for _ in range(3):
        p = s.ask()
        rest.append(p)
        tell(s, p, 0.0)
    assert all("g001_s00" not in p.donors for p in rest)
    assert s.members[0] == "g001_s00"
    s.end_generation()
    nxt = s.ask()
    assert nxt.generation == 2 and nxt.target == "g001_s00"


def test_merged_mode_keeps_offspring_that_beat_best_merged_so_far():
    s = strategy(mode="merged", merged_fitness=0.5)
    p0 = s.ask()
    assert tell(s, p0, 0.55)
    assert s.best_merged == 0.55 and s.members[0] == p0.child
    p1 = s.ask()
    assert "m0" not in p1.donors  # sequential: slot 0 is already "a"
    assert not tell(s, p1, 0.55)  # equal is not better
    assert not tell(s, s.ask(), 0.30)
    assert s.members == [p0.child, "m1", "m2", "m3"]


def test_donors_are_distinct_and_exclude_the_target():
    s = strategy(operator="de_rand1", fitness=(0.1, 0.2, 0.3, 0.4, 0.5), generations=3)
    for p in every_proposal(s):
        assert len(set(p.donors)) == 3 and p.target not in p.donors
        tell(s, p, 0.0)


def test_best_operators_take_the_fittest_member_as_first_donor():
    s = strategy(operator="de_best1", fitness=(0.1, 0.9, 0.3, 0.4, 0.5))
    p = s.ask()
    assert p.donors[0] == "m1"
    tell(s, p, 0.0)
    p = s.ask()  # the best itself is the target: its own best donor
    assert p.target == "m1" and p.donors[0] == "m1" and "m1" not in p.donors[1:]


def test_proposals_are_reproducible_from_the_seed():
    def proposals():
        s, out = strategy(operator="de_rand1", fitness=(0.1, 0.2, 0.3, 0.4, 0.5)), []
        for p in every_proposal(s):
            out.append(p)
            tell(s, p, 0.0)
        return out

    assert proposals() == proposals()


def test_out_of_order_tell_is_refused():
    s = strategy()
    p = s.ask()
    tell(s, p, 0.1)
    with pytest.raises(ValueError, match="out of order"):
        tell(s, p, 0.1)
