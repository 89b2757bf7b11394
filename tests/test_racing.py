"""Exact racing: a candidate stops once it cannot pass its bar, and every
decision, accepted score and final model is the one full scoring gives."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_evolver.config import EvolveConfig, FitnessConfig
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.run import evolve
from mergekit_evolver.scoring import lmeval
from mergekit_evolver.scoring.evaluator import Suite
from mergekit_evolver.scoring.racing import Bar, Order, best_case, confident_best, rounds_of
from toy_world import run_config


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only


def settings(world, tasks, **racing) -> FitnessConfig:
    return FitnessConfig(tasks=tasks, include_path=[str(world.include_path)], device="cpu", racing=racing or {})


def test_chunked_scoring_equals_simple_evaluate(world):
    from lm_eval import simple_evaluate

    model = AutoModelForCausalLM.from_pretrained(world.models[1])
    tokenizer = AutoTokenizer.from_pretrained(world.models[1])
    lm = lmeval.hflm(model, tokenizer, batch_size=64)
    suite = Suite(settings(world, ["toy_dev", "toy_test"], rounds=4).tasks, settings(world, ["toy_dev", "toy_test"], rounds=4))
    assert len(suite.plan) == 4
    chunked = suite.run(lm)
    assert chunked.complete and chunked.documents == (60, 60)
    manager = lmeval.task_manager([str(world.include_path)])
    with lmeval.offline():
        reference = simple_evaluate(model=lm, tasks=["toy_dev", "toy_test"], task_manager=manager,
                                    bootstrap_iters=0, log_samples=False)
    for task in ("toy_dev", "toy_test"):
        assert chunked.scores[task]["acc"] == reference["results"][task]["acc,none"]


def test_rounds_cover_every_document_once_in_a_seeded_order():
    plan = rounds_of({"a": 30, "b": 7}, 4, seed=1)
    for task, n in (("a", 30), ("b", 7)):
        seen = [i for r in plan for i in r.get(task, [])]
        assert sorted(seen) == list(range(n))
    assert rounds_of({"a": 30, "b": 7}, 4, seed=1) == plan != rounds_of({"a": 30, "b": 7}, 4, seed=2)


def walk(plan, task) -> list[int]:
    return [i for r in plan for i in r.get(task, [])]


def test_hardest_first_puts_what_the_members_missed_first_ties_in_the_seeded_order():
    sizes = {"a": 6, "b": 4}
    seeded = rounds_of(sizes, 6, seed=3)  # one document a round: the seeded walk itself
    rows = {"a": [[1, 0, 1, 0, 1, 1], [1, 0, 0, 1, 1, 1]], "b": [[1, 1, 0, 0], [1, 0, 0, 1]]}
    order = Order.hardest_first(rows, {"a": True, "b": False}, sizes, seed=3)
    ranked = lambda docs, task: sorted(docs, key=walk(seeded, task).index)  # noqa: E731
    # a (higher is better), member means [1, 0, .5, .5, 1, 1]: the miss first, the ties as seeded.
    assert list(order.task("a")) == [1, *ranked([2, 3], "a"), *ranked([0, 4, 5], "a")]
    # b (lower is better), means [1, .5, 0, .5]: its worst value, 1, is the hardest.
    assert list(order.task("b")) == [0, *ranked([1, 3], "b"), 2]
    # Round k scores the order's k-th quarter (sorted, as lm-eval walks documents).
    a = order.task("a")
    assert [r["a"] for r in rounds_of(sizes, 4, seed=3, order=order)] == [sorted(a[k * 6 // 4:(k + 1) * 6 // 4]) for k in range(4)]
    # No rows (or rows of another length): the seeded walk.
    assert Order.hardest_first({"a": [[1.0] * 5]}, {"a": True}, sizes, seed=3).task("a") == tuple(walk(seeded, "a"))
    with pytest.raises(ValueError, match="not a permutation of its 6 documents"):
        rounds_of(sizes, 4, seed=3, order=Order((("a", (0, 1, 2, 3, 4, 4)),)))


def test_hardest_first_stops_losers_sooner_with_the_same_decisions(world, monkeypatch):
    """Candidates whose misses follow the documents' difficulty, as merges of
    the same members' do: raced in the hardest-first order they are stopped
    on fewer documents than in the seeded order, and every complete score and
    every decision is full scoring's."""
    config = settings(world, ["toy_dev", "toy_test"], rounds=6)
    seeded, ordered = Suite(config.tasks, config), Suite(config.tasks, config)
    rng = random.Random(5)
    # Most documents easy or hard for every model of the family, as on a real benchmark.
    ease = {t: [rng.choice((0.1, 0.9)) for _ in range(30)] for t in ("toy_dev", "toy_test")}
    draw = lambda skill: {t: [float(rng.random() < min(1.0, e + skill)) for e in ease[t]] for t in ease}  # noqa: E731
    members = [draw(0.0) for _ in range(3)]
    ordered.race_in(ordered.hardest_first(members))
    assert ordered.plan != seeded.plan
    docs = {"seeded": 0, "ordered": 0}
    raced = 0
    for _ in range(200):
        parent, child = draw(rng.uniform(-0.2, 0.2)), draw(rng.uniform(-0.2, 0.2))
        fake_scores(monkeypatch, parent)
        bar = Bar(seeded.fitness(seeded.run(None).scores), strict=True)
        fake_scores(monkeypatch, child)
        full = seeded.run(None)
        for name, suite in (("seeded", seeded), ("ordered", ordered)):
            result = suite.run(None, bar)
            docs[name] += result.documents[0]
            assert result.complete == (result.documents[0] == 60)
            if result.complete:
                assert result.scores == full.scores
            else:
                raced += name == "ordered"
                assert not bar.passed_by(suite.fitness(full.scores))
    assert raced > 30 and docs["ordered"] < 0.95 * docs["seeded"], docs


def fake_scores(monkeypatch, outcomes: dict[str, list[float]]):
    """lm-eval's per-document values replaced by the given 0/1 outcomes, so the
    race's bookkeeping is tested over many outcomes without a model."""
    def score_documents(lm, loaded, samples, **kw):
        return {t: {i: {"acc": outcomes[t][i]} for i in docs} for t, docs in samples.items()}

    monkeypatch.setattr(lmeval, "score_documents", score_documents)


def random_candidates(monkeypatch, suite, rng, trials=300):
    """Candidates of random skill on 30 documents a task, each with its full
    score, its fitness and a random bar near it (strict or not)."""
    for _ in range(trials):
        p = rng.random()
        fake_scores(monkeypatch, {t: [float(rng.random() < p) for _ in range(30)] for t in ("toy_dev", "toy_test")})
        full = suite.run(None)
        fitness = suite.fitness(full.scores)
        yield full, fitness, Bar(fitness + rng.uniform(-0.3, 0.3), strict=rng.random() < 0.5)


@pytest.mark.parametrize("case", ["one task", "lower is better", "weighted tasks"])
def test_a_candidate_that_could_still_pass_is_never_raced_out(world, monkeypatch, case):
    tasks = {
        "one task": ["toy_dev"],
        "lower is better": [{"name": "toy_dev", "higher_is_better": False}],
        "weighted tasks": [{"name": "toy_dev", "weight": 1.0}, {"name": "toy_test", "weight": 3.0}],
    }[case]
    config = settings(world, tasks, rounds=5)
    suite = Suite(config.tasks, config)
    raced = 0
    for trial, (full, fitness, bar) in enumerate(random_candidates(monkeypatch, suite, random.Random(7))):
        result = suite.run(None, bar)
        if bar.passed_by(fitness):
            assert result.complete and result.scores == full.scores, (trial, bar, fitness)
        if not result.complete:
            raced += 1
            assert not bar.passed_by(fitness) and not bar.passed_by(result.best)
            assert result.best >= fitness  # an upper bound on what it would have scored
            assert result.documents[0] < result.documents[1]
    assert raced > 30  # the property above was exercised, not vacuous


def test_statistical_bound_is_serfling_and_never_looser_than_exact():
    from lm_eval.api.metrics import mean

    values = [1.0] * 30 + [0.0] * 70  # 100 of 400 seen, mean 0.3
    eps = (1 - 99 / 400) ** 0.5 * (__import__("math").log(1 / 0.05) / 200) ** 0.5
    assert confident_best(values, 400, True, "acc", mean, 0.05) == pytest.approx(0.3 + eps)
    assert confident_best(values, 400, False, "acc", mean, 0.05) == pytest.approx(0.3 - eps)
    # Near the end the exact best case is tighter, and is taken.
    late = [0.0] * 398
    assert confident_best(late, 400, True, "acc", mean, 0.05) == best_case(late, 400, True, "acc", mean)
    assert confident_best([], 400, True, "acc", mean, 0.05) == 1.0
    assert confident_best([1.0] * 400, 400, True, "acc", mean, 0.05) == 1.0


@pytest.mark.parametrize("case", ["one task", "lower is better", "weighted tasks"])
def test_statistical_racing_stops_sooner_and_errs_rarely(world, monkeypatch, case):
    """Over many candidates below and above their bars: statistical racing
    scores fewer documents than exact racing, never stops a candidate whose
    seen documents alone pass the bar, and wrongly stops one that would have
    passed in well under 1 - confidence of the cases."""
    tasks = {
        "one task": ["toy_dev"],
        "lower is better": [{"name": "toy_dev", "higher_is_better": False}],
        "weighted tasks": [{"name": "toy_dev", "weight": 1.0}, {"name": "toy_test", "weight": 3.0}],
    }[case]
    exact = Suite(settings(world, tasks, rounds=5).tasks, settings(world, tasks, rounds=5))
    config = settings(world, tasks, rounds=5, mode="statistical", confidence=0.95)
    stat = Suite(config.tasks, config)
    docs = {"exact": 0, "statistical": 0}
    wrong = passing = 0
    for full, fitness, bar in random_candidates(monkeypatch, exact, random.Random(11)):
        docs["exact"] += exact.run(None, bar).documents[0]
        result = stat.run(None, bar)
        docs["statistical"] += result.documents[0]
        if result.complete:
            assert result.scores == full.scores
        else:
            assert not bar.passed_by(result.best)
        if bar.passed_by(fitness):
            passing += 1
            wrong += not result.complete
    assert docs["statistical"] < docs["exact"]
    assert passing > 50 and wrong / passing < 0.05, (wrong, passing)


def test_racing_config_refuses_a_confidence_outside_its_range():
    from pydantic import ValidationError

    from mergekit_evolver.config.evaluation import RacingConfig

    for bad in (0.5, 1.0, 1.5):
        with pytest.raises(ValidationError, match="confidence"):
            RacingConfig(mode="statistical", confidence=bad)


def test_a_metric_without_a_per_document_bound_is_scored_in_full(world, tmp_path):
    from toy_world import reverse_items, write_task
    import yaml

    write_task(tmp_path, "toy_ppl", reverse_items(1, 10))
    spec = yaml.safe_load((tmp_path / "toy_ppl.yaml").read_text())
    spec["metric_list"] = [{"metric": "acc", "aggregation": "median", "higher_is_better": True}]
    (tmp_path / "toy_ppl.yaml").write_text(yaml.safe_dump(spec))
    config = FitnessConfig(tasks=["toy_ppl"], include_path=[str(tmp_path)], device="cpu")
    assert not Suite(config.tasks, config).raceable
    config = settings(world, ["toy_dev"])
    assert Suite(config.tasks, config).raceable


STRATEGIES = {
    "evolver, individual": dict(de__generations=3, fitness__tasks=[{"name": "toy_dev", "higher_is_better": False}]),
    # Lower is better in three: the toy models are near chance, where a bar is
    # rarely out of reach the other way round, and nothing would be raced out.
    "evolver, merged": dict(de__generations=3, selection={"mode": "merged"}, output={"kind": "merged"},
                            fitness__tasks=[{"name": "toy_dev", "higher_is_better": False}]),
    "recipe DE": dict(strategy="recipe", search={"merge_method": "task_arithmetic", "budget": 14, "population_size": 5},
                      fitness__tasks=[{"name": "toy_dev", "higher_is_better": False}]),
    "kinship greedy": dict(strategy="kinship_greedy", greedy={"budget": 8, "stop_kinship": None},
                           fitness__tasks=[{"name": "toy_dev", "higher_is_better": False}]),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_racing_changes_no_decision_and_no_model(world, tmp_path, name):
    rows, models = {}, {}
    for mode in ("off", "exact"):
        config = run_config(world, **STRATEGIES[name])
        config["fitness"]["racing"] = {"mode": mode, "rounds": 5}
        config["report"] = {"tasks": [], "baselines": []}
        out = tmp_path / mode
        evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
        rows[mode] = Ledger(out).candidates()
        models[mode] = (out / "model/model.safetensors").read_bytes()
        if mode == "exact":
            cached = {h for (h,) in Ledger(out).db.execute("SELECT content_hash FROM fitness_cache")}
    assert models["off"] == models["exact"]
    assert [r.step for r in rows["off"]] == [r.step for r in rows["exact"]]
    raced = 0
    for full, race in zip(rows["off"], rows["exact"]):
        if race.status == Status.RACED:
            raced += 1
            assert full.status in (Status.REJECTED, Status.SCORED), full.step
            assert race.fitness >= full.fitness  # its bound
            assert race.content_hash not in cached  # a partial score never enters the cache
            assert race.dev["toy_dev"]["documents"] < race.dev["toy_dev"]["of"] == 30
        else:
            named = lambda r: r.member and Path(r.member).name  # noqa: E731  (run dirs differ)
            assert (race.status, race.fitness, race.dev, named(race)) == (full.status, full.fitness, full.dev, named(full))
    assert raced, "nothing was raced out, so nothing was shown"


def test_cma_es_is_scored_in_full(world, tmp_path):
    config = run_config(world, strategy="recipe", search={"merge_method": "task_arithmetic", "optimizer": "cmaes",
                                                          "budget": 8})
    config["report"] = {"tasks": [], "baselines": []}
    evolve(EvolveConfig.model_validate(config), tmp_path / "cma", log=lambda _: None)
    assert all(r.status == Status.SCORED for r in Ledger(tmp_path / "cma").candidates("search"))
