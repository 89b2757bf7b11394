"""Kinship-guided top-k greedy merging: the strategy's semantics without models,
then whole runs on the toy world (ledger, population, lineage, determinism, resume)."""

from __future__ import annotations

import zlib
from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_evolver.search.kinship_greedy import KinshipGreedy, pair_key
from mergekit_evolver.search.protocol import Result

# ---------------------------------------------------------------- pure strategy


def strategy(fitness=(0.5, 0.2, 0.8, 0.4), **kw) -> KinshipGreedy:
    kw = {"top_k": 3, "max_rounds": 6, **kw}
    return KinshipGreedy([f"m{i}" for i in range(len(fitness))], list(fitness), **kw)


def table(value=0.0, **pairs) -> "Kinship":
    """Kinship `value` for every pair but the named ones: a__b=0.9."""
    return Kinship(value, {tuple(k.split("__")): v for k, v in pairs.items()})


class Kinship:
    """A fake kinship source: given values for named pairs, `default` otherwise."""

    def __init__(self, default: float, values: dict):
        self.default = default
        self.values = {pair_key(*k): v for k, v in values.items()}
        self.asked: list[list] = []

    def __call__(self, pairs):
        self.asked.append(list(pairs))
        return {p: self.values.get(p, self.default) for p in pairs}


def drive(s: KinshipGreedy, fit, kinship=None, rounds=None) -> list:
    """Run the protocol; `fit(proposal)` gives a child's fitness. Returns the
    proposals in order. Stops after `rounds` end_round() calls if given."""
    kinship = kinship or table()
    proposals, ended = [], 0
    while not s.done:
        need = s.kinship_needed()
        if need:
            s.add_kinship(kinship(need))
        elif s.round_over:
            s.end_round()
            ended += 1
            if rounds is not None and ended >= rounds:
                break
        else:
            p = s.ask()
            proposals.append(p)
            s.tell(p, Result(fit(p)))
    return proposals


def test_round_one_merges_every_starting_pair_fitter_parent_first():
    s = strategy()
    s.add_kinship(table()(s.kinship_needed()))
    start = s.end_round()
    assert start.round == 0 and start.members == ("m2", "m0", "m3", "m1")  # all of them, ranked
    asked = []
    while (p := s.ask()) is not None:
        asked.append(p)
        s.tell(p, Result(0.1))
    assert [(p.base, p.other) for p in asked] == list(combinations(["m2", "m0", "m3", "m1"], 2))
    assert [p.step for p in asked] == [f"greedy/r001/p{i:02d}" for i in range(6)]
    assert [p.child for p in asked] == [f"r001_p{i:02d}" for i in range(6)]
    assert all(s.fitness[p.base] >= s.fitness[p.other] for p in asked)


def test_top_k_keeps_exactly_the_k_best_of_members_and_children():
    s = strategy(top_k=3)
    children = {0: 0.9, 1: 0.1, 2: 0.6, 3: 0.45, 4: 0.3, 5: 0.7}
    drive(s, lambda p: children[p.index], rounds=2)
    r1 = s.history[1]
    pool = {"m0": 0.5, "m1": 0.2, "m2": 0.8, "m3": 0.4, **{f"r001_p{i:02d}": f for i, f in children.items()}}
    best3 = sorted(pool, key=lambda m: -pool[m])[:3]
    assert list(r1.members) == best3 == ["r001_p00", "m2", "r001_p05"]
    assert r1.fitness == (0.9, 0.8, 0.7) and r1.kept == 2 and r1.evaluated == 6
    # r001_p02 (0.6) entered the top 3 when told, then r001_p05 pushed it out.
    assert r1.displaced == ("r001_p02",)
    assert "r001_p01" not in s.pool and "r001_p02" not in s.pool
    assert set(s.pool) == {"m0", "m1", "m2", "m3", "r001_p00", "r001_p05"}


def test_a_child_worse_than_every_kept_member_is_not_kept():
    s = strategy(top_k=2)
    drive(s, lambda p: 0.01, rounds=1)
    p = s.ask()
    assert not s.accepts(p, 0.01) and not s.tell(p, Result(0.01))
    assert s.accepts(p, 0.6)  # beats the 2nd best (0.5)


def test_a_tie_with_the_kth_member_goes_to_the_earlier_born():
    s = strategy(top_k=2)
    drive(s, lambda p: 0.5 if p.index == 0 else 0.0, rounds=2)
    assert s.history[1].members == ("m2", "m0")  # r001_p00 also has 0.5, born later
    assert s.history[1].kept == 0


def test_later_rounds_merge_only_pairs_not_merged_before():
    s = strategy(top_k=3)
    # Round 1: one child beats everyone; m2 and m0 stay in the top 3.
    drive(s, lambda p: 0.95 if p.index == 3 else 0.0, rounds=2)
    assert s.population == ["r001_p03", "m2", "m0"]
    r2 = []
    while (p := s.ask()) is not None:
        r2.append(p)
        s.tell(p, Result(0.0))
    # (m2, m0) was merged in round 1: only the new child's pairs remain.
    assert [(p.base, p.other) for p in r2] == [("r001_p03", "m2"), ("r001_p03", "m0")]
    assert s.used == 8


def test_a_stall_explores_with_the_lowest_kinship_partner_and_goes_on_if_it_improves():
    s = strategy(top_k=2, stop_kinship=None)
    # Round 1: r001_p00 (m2 x m0) becomes the best; round 2 does not improve.
    fits = {"greedy/r001/p00": 0.9}
    kinship = table(0.5, r001_p00__m1=-0.2, r001_p00__m3=0.1, r001_p00__m2=0.95)
    proposals = drive(s, lambda p: fits.get(p.step, 0.0), kinship, rounds=3)
    assert [h.kind for h in s.history] == ["start", "pair", "pair"]
    assert s.history[2].improved is False and s.history[2].next == "explore"
    # Partners: every individual that was a member, except the best itself and
    # those it was merged with (m2 in round 2); discarded children are not among them.
    assert s.explore_partners() == ["m0", "m1", "m3"]
    assert set(s.kinship_needed()) <= {pair_key("r001_p00", c) for c in ("m0", "m1", "m3")}
    s.add_kinship(kinship(s.kinship_needed()))
    p = s.ask()
    assert (p.kind, p.step, p.base, p.other, p.kinship) == ("explore", "greedy/r003/explore", "r001_p00", "m1", -0.2)
    assert s.ask() is None
    s.tell(p, Result(0.97))
    s.add_kinship(kinship(s.kinship_needed()))
    r3 = s.end_round()
    assert r3.improved and r3.members[0] == "r003_explore" and r3.next == "pair"
    assert not s.done and s.ask().step == "greedy/r004/p00"
    assert len(proposals) == 6 + 1  # round 1's six pairs, round 2's one new pair


def test_a_failed_exploration_stops_the_search():
    s = strategy(top_k=2, stop_kinship=None)
    drive(s, lambda p: 0.9 if p.step == "greedy/r001/p00" else 0.0)
    kinds = [h.kind for h in s.history]
    assert kinds == ["start", "pair", "pair", "explore"]
    assert s.stopped.startswith("no improvement")
    assert s.history[-1].stopped == s.stopped and s.history[-1].next is None


def test_without_exploration_the_first_stall_stops_the_search():
    s = strategy(top_k=2, stop_kinship=None, explore=False)
    proposals = drive(s, lambda p: 0.9 if p.step == "greedy/r001/p00" else 0.0)
    assert [h.kind for h in s.history] == ["start", "pair", "pair"]
    assert s.stopped == "no improvement (exploration is off)"
    assert not any(p.kind == "explore" for p in proposals)


def test_a_stall_in_round_one_stops_when_the_best_was_merged_with_everyone():
    # Round 1 merged the best starting member with every other one, and no
    # child survived: nothing is left to explore with.
    s = strategy(top_k=2, stop_kinship=None)
    drive(s, lambda p: 0.0)
    assert [h.kind for h in s.history] == ["start", "pair"]
    assert s.population == ["m2", "m0"] and s.explore_partners() == []
    assert s.stopped.startswith("no improvement, and the best has no unmerged partner")


def test_budget_cuts_the_round_to_the_most_promising_pairs_and_stops():
    s = strategy(top_k=2, budget=4)
    proposals = drive(s, lambda p: 0.9 + p.index / 100)
    assert [(p.base, p.other) for p in proposals] == [("m2", "m0"), ("m2", "m3"), ("m2", "m1"), ("m0", "m3")]
    assert s.used == 4 and s.stopped.startswith("budget")
    assert s.population == ["r001_p03", "r001_p02"]  # the cut round still selects


def test_budget_counts_invalid_children_and_never_keeps_them():
    s = strategy(top_k=2, budget=3)
    drive(s, lambda p: None if p.index == 0 else float("nan") if p.index == 1 else 0.99)
    assert s.used == 3 and s.population == ["r001_p02", "m2"]
    assert "r001_p00" not in s.fitness and "r001_p01" not in s.fitness


def test_kinship_threshold_stops_the_search():
    s = strategy(top_k=2, stop_kinship=0.9)
    kinship = table(0.3, r001_p00__m2=0.92)
    drive(s, lambda p: 0.99 if p.index == 0 else 0.0, kinship)
    assert [h.kind for h in s.history] == ["start", "pair"]
    assert s.history[1].members == ("r001_p00", "m2") and s.history[1].kinship == 0.92
    assert s.stopped.startswith("kinship")


def test_kinship_threshold_can_stop_before_any_merge():
    s = strategy(stop_kinship=0.2)
    assert drive(s, lambda p: 1.0, table(0.3)) == []
    assert len(s.history) == 1 and s.history[0].kinship == pytest.approx(0.3)
    assert s.stopped.startswith("kinship") and s.population == ["m2", "m0", "m3", "m1"]


def test_nan_kinship_is_left_out_of_the_mean_and_never_stops():
    s = strategy(fitness=(0.5, 0.2), stop_kinship=0.1, max_rounds=1)
    drive(s, lambda p: 0.9, table(float("nan")))
    assert [h.kinship for h in s.history] == [None, None] and s.stopped.startswith("max_rounds")


def test_max_rounds_stops_the_search():
    s = strategy(top_k=2, max_rounds=2, stop_kinship=None)
    drive(s, lambda p: p.round + 0.01 * p.index)  # every round improves
    assert [h.round for h in s.history] == [0, 1, 2] and s.stopped.startswith("max_rounds")


def test_same_inputs_give_the_same_search():
    def run():
        s = strategy(fitness=(0.3, 0.3, 0.6, 0.1, 0.6), top_k=3, stop_kinship=0.97)
        kinship = table(0.4, m2__m4=0.8, m0__m1=-0.1)
        steps = drive(s, lambda p: (zlib.crc32((p.base + p.other).encode()) % 97) / 100, kinship)
        return steps, s.history

    assert run() == run()


def test_protocol_misuse_is_refused():
    s = strategy()
    with pytest.raises(RuntimeError, match="kinship needed"):
        s.end_round()
    s.add_kinship(table()(s.kinship_needed()))
    s.end_round()
    first, second = s.ask(), s.ask()
    with pytest.raises(ValueError, match="out of order"):
        s.tell(second, Result(0.1))
    s.tell(first, Result(0.1))
    with pytest.raises(RuntimeError, match="before every proposal"):
        s.end_round()
    with pytest.raises(ValueError, match="without a fitness"):
        KinshipGreedy(["a", "b"], [0.1, None], top_k=2, max_rounds=1)


# ---------------------------------------------------------------- recipes and config


def test_pair_recipe_slerp_takes_the_fitter_as_base_others_the_common_base(tmp_path):
    from mergekit_evolver.recipes.candidates import pair_recipe
    from tiny_models import make_model

    a, b, base = (make_model(tmp_path / n, seed=i) for i, n in enumerate(("a", "b", "base")))
    slerp = pair_recipe({"merge_method": "slerp", "parameters": {"t": 0.5}}, a, b, str(base), "t")
    assert str(slerp.base_model.model.path) == str(a)
    assert [str(m.model.model.path) for m in slerp.models] == [str(a), str(b)]
    ties = pair_recipe({"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}, a, b, str(base), "t")
    assert str(ties.base_model.model.path) == str(base)
    assert [str(m.model.model.path) for m in ties.models] == [str(a), str(b)]


@pytest.mark.parametrize("method, message", [
    ("regmean", "statistics"), ("fisher", "statistics"), ("slerpp", "unknown merge method"),
    ("passthrough", "cannot merge two"),
])
def test_greedy_config_refuses_methods_that_cannot_merge_a_pair(method, message):
    from pydantic import ValidationError

    from mergekit_evolver.config import GreedyConfig

    with pytest.raises(ValidationError, match=message):
        GreedyConfig(merge_method=method)


# ---------------------------------------------------------------- whole runs

from mergekit_evolver.config import EvolveConfig  # noqa: E402
from mergekit_evolver.ledger import Ledger  # noqa: E402
from mergekit_evolver.run import evolve  # noqa: E402
from lineage_check import assert_lineage_replays  # noqa: E402
from tiny_models import load_tensors  # noqa: E402
from toy_world import ToyWorld, run_config  # noqa: E402



@pytest.fixture(scope="module")
def world(shared_world):
    # The first three of the shared four: make_world(n_models=3) builds the same (read only).
    return ToyWorld(shared_world.models[:3], shared_world.base, shared_world.include_path)


def greedy_config(world, **greedy) -> dict:
    config = run_config(world, strategy="kinship_greedy",
                        greedy={"top_k": 2, "max_rounds": 3, "stop_kinship": None, **greedy})
    config["report"] = {"tasks": [], "baselines": []}
    return config


def run(config: dict, out: Path, **kw) -> str:
    return evolve(EvolveConfig.model_validate(config), out, log=lambda _: None, **kw)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("greedy_runs") / "a"
    run(greedy_config(world), out)
    return out


def greedy_rows(out: Path):
    return [c for c in Ledger(out).candidates() if c.step.startswith("greedy/")]


def test_every_pair_is_a_recorded_slerp_recipe_fitter_parent_as_base(world, finished):
    ledger = Ledger(finished)
    rows = greedy_rows(finished)
    fitness = {c.step.split("/")[1]: c.fitness for c in ledger.candidates() if c.step.startswith("init/")}
    fitness.update({f"r{c.generation:03d}_{c.step.split('/')[2]}": c.fitness for c in rows})
    paths = {f"m{i}": str(m) for i, m in enumerate(world.models)}
    paths.update({f"r{c.generation:03d}_{c.step.split('/')[2]}": c.member for c in rows if c.member})
    round1 = [c for c in rows if c.generation == 1]
    assert sorted(tuple(sorted(c.parents)) for c in round1) == [("m0", "m1"), ("m0", "m2"), ("m1", "m2")]
    for c in rows:
        recipe = yaml.safe_load(c.recipe)
        fitter, other = c.parents
        assert recipe["merge_method"] == "slerp" and recipe["parameters"] == {"t": 0.5}
        assert recipe["base_model"] == paths[fitter]
        assert [m["model"] for m in recipe["models"]] == [paths[fitter], paths[other]]
        assert fitness[fitter] >= fitness[other]
        assert c.role == "offspring" and c.operator == "slerp" and c.fitness is not None
    assert len({tuple(sorted(c.parents)) for c in rows}) == len(rows)  # no pair twice


def test_rounds_are_logged_and_plotted(finished):
    gens = Ledger(finished).generations()
    assert [g["generation"] for g in gens] == list(range(len(gens))) and len(gens) >= 3
    assert gens[0]["kind"] == "start" and len(gens[0]["members"]) == 3
    rows = greedy_rows(finished)
    for g in gens[1:]:
        assert len(g["members"]) == 2
        assert g["evaluated"] == sum(c.generation == g["generation"] for c in rows)
        assert g["best"] >= g["mean"] >= g["min"] and g["kinship"] is not None
    assert [g["best"] for g in gens] == sorted(g["best"] for g in gens)  # never worse
    assert "stopped" in gens[-1]
    assert len((finished / "generations.jsonl").read_text().splitlines()) == len(gens)
    assert (finished / "report/fitness.png").is_file() and (finished / "report/kinship.png").is_file()


def test_population_holds_exactly_the_children_that_were_members(finished):
    gens = Ledger(finished).generations()
    members = {m for g in gens for m in g["members"] if not m.startswith("m")}
    assert {p.name for p in (finished / "population").iterdir()} == members
    for c in greedy_rows(finished):
        if c.status == "accepted" and Path(c.member).name in members:
            assert Path(c.member).parent == finished / "population"


def test_final_model_is_the_best_member_and_its_lineage_replays(finished, tmp_path):
    gens = Ledger(finished).generations()
    best = gens[-1]["members"][0]
    assert not best.startswith("m"), "the toy run should end with a merged best"
    want = load_tensors(finished / "population" / best)
    got = load_tensors(finished / "model")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert_lineage_replays(finished, tmp_path)


def test_same_config_and_seed_give_the_same_search_and_model(world, finished, tmp_path):
    run(greedy_config(world), tmp_path / "b")
    steps = lambda out: [(c.step, c.status, c.fitness, c.parents) for c in greedy_rows(out)]  # noqa: E731
    assert steps(tmp_path / "b") == steps(finished)
    assert (tmp_path / "b/model/model.safetensors").read_bytes() == (finished / "model/model.safetensors").read_bytes()


def test_resuming_a_finished_run_replays_every_step(world, finished, monkeypatch):
    from mergekit_evolver.run import loop
    from mergekit_evolver.run.executor import InProcess
    from mergekit_evolver.scoring.evaluator import Evaluator
    from mergekit_evolver.run.context import Run

    before = [(c.step, c.fitness, c.member) for c in Ledger(finished).candidates()]
    model = (finished / "model/model.safetensors").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was computed again")

    monkeypatch.setattr(Run, "merge", refuse)
    monkeypatch.setattr(Evaluator, "score", refuse)
    monkeypatch.setattr(loop, "pairwise_kinship", refuse)
    monkeypatch.setattr(InProcess, "merge", refuse)  # every candidate merge goes through it
    run(greedy_config(world), finished, resume=True)
    assert [(c.step, c.fitness, c.member) for c in Ledger(finished).candidates()] == before
    assert (finished / "model/model.safetensors").read_bytes() == model


def test_a_run_interrupted_mid_round_resumes_to_the_same_model(world, finished, tmp_path, monkeypatch):
    from mergekit_evolver.run.loop import CandidateLoop

    real, calls = CandidateLoop._compute, []

    def dies_on_the_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(CandidateLoop, "_compute", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run(greedy_config(world), tmp_path / "c")
    assert len(greedy_rows(tmp_path / "c")) == 2 and not (tmp_path / "c/model").exists()
    monkeypatch.setattr(CandidateLoop, "_compute", real)
    run(greedy_config(world), tmp_path / "c", resume=True)
    assert [c.step for c in greedy_rows(tmp_path / "c")] == [c.step for c in greedy_rows(finished)]
    assert (tmp_path / "c/model/model.safetensors").read_bytes() == (finished / "model/model.safetensors").read_bytes()


def test_kinship_threshold_and_budget_stop_a_run(world, tmp_path):
    run(greedy_config(world, stop_kinship=-1.0), tmp_path / "k")
    gens = Ledger(tmp_path / "k").generations()
    assert [g["generation"] for g in gens] == [0] and gens[0]["stopped"].startswith("kinship")
    assert greedy_rows(tmp_path / "k") == []
    best_start = gens[0]["members"][0]
    want = load_tensors(world.models[int(best_start[1:])])
    got = load_tensors(tmp_path / "k/model")
    assert all(torch.equal(got[k], want[k]) for k in want)

    run(greedy_config(world, budget=2), tmp_path / "b")
    assert len(greedy_rows(tmp_path / "b")) == 2
    assert Ledger(tmp_path / "b").generations()[-1]["stopped"].startswith("budget")
