"""Subset estimators: the stratified subset, its estimate, and a run that
selects on estimates while its members, final model and report get full scores."""

from __future__ import annotations

import json
import random

import pytest

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.run import evolve
from mergekit_evolver.run.context import DOCUMENTS, REFERENCE
from mergekit_evolver.scoring.subset import stratified_subset
from toy_world import run_config


def test_strata_follow_the_members_patterns_and_the_estimate_is_unbiased():
    rng = random.Random(0)
    members = [[float(rng.random() < p) for _ in range(200)] for p in (0.2, 0.5, 0.8)]
    subset = stratified_subset(members, 0.25, seed=3)
    assert list(subset.indices) == sorted(set(subset.indices))
    assert sum(subset.weights) == pytest.approx(1.0)
    assert 40 <= len(subset.indices) <= 60
    # Every pattern of the three members is represented.
    patterns = {tuple(m[d] for m in members) for d in range(200)}
    assert {tuple(m[d] for m in members) for d in subset.indices} == patterns
    # A member itself is estimated exactly: its value is constant within a stratum.
    for m in members:
        assert subset.estimate(dict(enumerate(m))) == pytest.approx(sum(m) / 200)
    # Over many draws, the estimate of another candidate averages to its true mean.
    other = [float(rng.random() < 0.6) for _ in range(200)]
    draws = [stratified_subset(members, 0.25, seed=s).estimate(dict(enumerate(other))) for s in range(300)]
    assert sum(draws) / len(draws) == pytest.approx(sum(other) / 200, abs=0.01)
    assert stratified_subset(members, 0.25, seed=3) == subset != stratified_subset(members, 0.25, seed=4)


def test_the_paired_estimate_is_unbiased_and_tighter_for_a_candidate_near_its_reference():
    """The difference estimator: the reference's full mean plus the stratified
    estimate of the mean difference. Exact for the reference itself; over many
    subsets it averages to the candidate's mean, with a far smaller spread
    than the plain estimate when the candidate differs from its reference on
    few documents (an offspring and its parent)."""
    rng = random.Random(1)
    members = [[float(rng.random() < p) for _ in range(200)] for p in (0.3, 0.5, 0.7)]
    reference = [float(rng.random() < 0.6) for _ in range(200)]
    near = [1.0 - v if rng.random() < 0.05 else v for v in reference]  # flips 5% of the documents
    truth = sum(near) / 200
    plain, paired = [], []
    for seed in range(300):
        subset = stratified_subset(members, 0.25, seed=seed)
        assert subset.estimate(dict(enumerate(reference)), reference) == pytest.approx(sum(reference) / 200)
        plain.append(subset.estimate(dict(enumerate(near))))
        paired.append(subset.estimate(dict(enumerate(near)), reference))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    spread = lambda xs: mean([(x - mean(xs)) ** 2 for x in xs]) ** 0.5  # noqa: E731
    assert mean(paired) == pytest.approx(truth, abs=0.005)
    assert spread(paired) < 0.5 * spread(plain), (spread(paired), spread(plain))


@pytest.fixture(scope="module")
def subset_run(shared_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("subset")
    config = run_config(shared_world, de__generations=4)
    config["fitness"]["subset"] = {"share": 0.3}
    config["report"] = {"tasks": ["toy_test"], "baselines": []}
    evolve(EvolveConfig.model_validate(config), root / "run", log=lambda _: None)
    return config, root


def test_members_and_the_report_get_full_scores_and_losers_estimates(subset_run):
    config, root = subset_run
    ledger = Ledger(root / "run")
    rows = ledger.candidates()
    estimated = [r for r in rows if r.dev.get("toy_dev", {}).get("estimated")]
    assert estimated and all(r.status == Status.REJECTED for r in estimated)
    assert all(r.dev["toy_dev"]["documents"] < r.dev["toy_dev"]["of"] for r in estimated)
    assert all("estimated from" in r.note for r in estimated)
    for r in rows:
        if r.status == Status.ACCEPTED or r.step.startswith("report/"):
            assert "estimated" not in r.dev.get("toy_dev", {}), r.step
    # The strata come from the initial members' per-document values, kept in the ledger.
    kept = [json.loads(ledger.get_meta(DOCUMENTS + m)) for m in ("m0", "m1", "m2", "m3")]
    assert all(len(k["toy_dev"]) == 30 for k in kept)
    # The estimates are paired: references are kept, bounded by the population (4) plus two.
    references = ledger.meta_keys(REFERENCE)
    assert references and len(references) <= 4 + 2
    ledger.close()


def test_a_subset_run_resumes_and_repeats_bit_for_bit(subset_run, tmp_path):
    config, root = subset_run
    again = tmp_path / "again"
    evolve(EvolveConfig.model_validate(config), again, log=lambda _: None)
    assert (again / "model/model.safetensors").read_bytes() == (root / "run/model/model.safetensors").read_bytes()
    # Resuming a finished run replays every step from the ledger, per-document rows included.
    evolve(EvolveConfig.model_validate(config), root / "run", resume=True, log=lambda _: None)
    a = [(r.step, r.status, r.fitness) for r in Ledger(again).candidates()]
    b = [(r.step, r.status, r.fitness) for r in Ledger(root / "run").candidates()]
    assert a == b


def test_recipe_de_targets_get_full_scores_and_its_trials_estimates(shared_world, tmp_path):
    """A DE target's fitness is every later trial's bar in its slot: the
    initial trials are scored in full, as members are; a later trial below
    its bar may be rejected on its estimate."""
    config = run_config(shared_world, strategy="recipe",
                        search={"merge_method": "task_arithmetic", "budget": 14, "population_size": 5})
    config["fitness"]["subset"] = {"share": 0.3}
    config["report"] = {"tasks": [], "baselines": []}
    evolve(EvolveConfig.model_validate(config), tmp_path / "run", log=lambda _: None)
    rows = Ledger(tmp_path / "run").candidates("search")
    initial = [r for r in rows if r.note == "initial"]
    assert len(initial) == 5 and not any(r.dev["toy_dev"].get("estimated") for r in initial)
    assert any(r.dev["toy_dev"].get("estimated") for r in rows if r.note != "initial")


def test_a_subset_needs_bounded_mean_metrics(shared_world, tmp_path):
    from mergekit_evolver.errors import UserError

    config = run_config(shared_world, de__generations=1)
    config["fitness"]["subset"] = {"share": 0.3}
    config["fitness"]["function"] = "statistics:fmean"
    with pytest.raises(UserError, match="fitness.subset needs metrics"):
        evolve(EvolveConfig.model_validate(config), tmp_path / "run", log=lambda _: None)
    assert not (tmp_path / "run").exists()
