"""Statistical racing paired with a reference: the bound by hand, its
decisions against full scoring over many candidates near their parents, and
the references a run keeps (bounded, the right model's, resumed after kill -9)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist

import pytest
import yaml

from mergekit_evolver.config import EvolveConfig, FitnessConfig
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.run import evolve
from mergekit_evolver.run.context import REFERENCE
from mergekit_evolver.scoring import lmeval
from mergekit_evolver.scoring.evaluator import Suite
from mergekit_evolver.scoring.racing import Bar, Reference, look_z, paired_best
from de_run import wait_for_offspring
from toy_world import run_config

CLI = str(Path(sys.executable).with_name("mergekit-evolver"))


def test_the_paired_bound_by_hand():
    ref = Reference.of({"a": [1, 0, 1, 1, 0, 0, 1, 0, 1, 1], "b": [0, 0, 0, 0, 1]})
    assert ref.task("a") == (1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0)
    seen = {"a": {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0}, "b": {4: 0.0, 0: 0.0}}
    # Each task's seen differences, with the two pseudo-documents -1 and +1.
    pad_a = [-1, 0, 0, 0, -1, 1]
    pad_b = [0, -1, -1, 1]
    var = lambda xs: sum((x - sum(xs) / len(xs)) ** 2 for x in xs) / (len(xs) - 1)  # noqa: E731
    # Weights 1 (a, higher is better) and 3 (b, lower is better): the
    # reference's fitness plus each task's seen mean difference, -1/4 and -1/2.
    c = {"a": 0.25, "b": -0.75}
    fitness = 0.25 * (0.6 - 0.25) - 0.75 * (0.2 - 0.5)
    spread = 0.25**2 * var(pad_a) / 4 * (1 - 4 / 10) + 0.75**2 * var(pad_b) / 2 * (1 - 2 / 5)
    z = look_z(0.95, 5)
    assert z == pytest.approx(NormalDist().inv_cdf(1 - 0.05 / 4))
    got = paired_best(seen, ref, {"a": 10, "b": 5}, c, {"a": 1.0, "b": 1.0}, z)
    assert got == pytest.approx(fitness + z * math.sqrt(spread))
    # Every document seen: no spread left, the exact difference.
    full = {"a": dict(enumerate([1.0] * 10)), "b": dict(enumerate([0.0] * 5))}
    assert paired_best(full, ref, {"a": 10, "b": 5}, c, {"a": 1.0, "b": 1.0}, z) == pytest.approx(0.25 * 1.0)
    assert paired_best({"a": {}, "b": {0: 1.0}}, ref, {"a": 10, "b": 5}, c, {"a": 1.0, "b": 1.0}, z) is None
    with pytest.raises(ValueError, match="the reference has 10 documents of a, the task 12"):
        paired_best(seen, ref, {"a": 12, "b": 5}, c, {"a": 1.0, "b": 1.0}, z)


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only


def suite(world, tasks, **racing) -> Suite:
    config = FitnessConfig(tasks=tasks, include_path=[str(world.include_path)], device="cpu", racing=racing)
    return Suite(config.tasks, config)


def near_parents(monkeypatch, full_suite, rng, trials=300):
    """Parents of random skill on 30 documents a task, and offspring that each
    change a few of the parent's answers, a little more often one way: what
    DE with a small F makes. Yields the offspring's full score, its fitness,
    the parent's fitness and the parent's per-document values."""
    tasks = ("toy_dev", "toy_test")
    for _ in range(trials):
        p, flip, lean = rng.random(), rng.uniform(0.02, 0.3), rng.uniform(0.2, 0.8)
        parent = {t: [float(rng.random() < p) for _ in range(30)] for t in tasks}
        child = {
            t: [float(rng.random() < lean) if rng.random() < flip else v for v in vs] for t, vs in parent.items()
        }
        monkeypatch.setattr(lmeval, "score_documents", fake(parent))
        parent_full = full_suite.run(None)
        monkeypatch.setattr(lmeval, "score_documents", fake(child))
        full = full_suite.run(None)
        yield child, full, full_suite.fitness(full.scores), full_suite.fitness(parent_full.scores), parent_full.per_document


def fake(outcomes):
    def score_documents(lm, loaded, samples, **kw):
        return {t: {i: {"acc": outcomes[t][i]} for i in docs} for t, docs in samples.items()}

    return score_documents


@pytest.mark.parametrize("case", ["one task", "lower is better", "weighted tasks"])
def test_pairing_with_the_parent_stops_sooner_and_errs_rarely(world, monkeypatch, case):
    """Against the parent's bar: pairing scores fewer documents than the
    unpaired bound, stops a candidate only when its bound cannot pass, keeps
    every complete score equal to full scoring's, and wrongly stops well
    under 1 - confidence of the offspring that would have passed."""
    tasks = {
        "one task": ["toy_dev"],
        "lower is better": [{"name": "toy_dev", "higher_is_better": False}],
        "weighted tasks": [{"name": "toy_dev", "weight": 1.0}, {"name": "toy_test", "weight": 3.0}],
    }[case]
    full_suite = suite(world, tasks, rounds=5)
    stat = suite(world, tasks, rounds=5, mode="statistical", confidence=0.95)
    docs = {"paired": 0, "unpaired": 0}
    wrong = passing = raced = 0
    for child, full, fitness, parent_fitness, parent_docs in near_parents(monkeypatch, full_suite, random.Random(5)):
        monkeypatch.setattr(lmeval, "score_documents", fake(child))
        paired = stat.run(None, Bar(parent_fitness, True, Reference.of(parent_docs)))
        unpaired = stat.run(None, Bar(parent_fitness, True))
        docs["paired"] += paired.documents[0]
        docs["unpaired"] += unpaired.documents[0]
        bar = Bar(parent_fitness)
        if paired.complete:
            assert paired.scores == full.scores
        else:
            raced += 1
            assert not bar.passed_by(paired.best)
        if bar.passed_by(fitness):
            passing += 1
            wrong += not paired.complete
    assert raced > 30, raced  # the pairing was exercised
    assert docs["paired"] < docs["unpaired"], docs
    assert passing > 30 and wrong / passing < 0.05, (wrong, passing)


STATISTICAL = dict(de__generations=3, fitness__racing={"mode": "statistical", "rounds": 5, "confidence": 0.9})


@pytest.fixture(scope="module")
def paired_run(shared_world, tmp_path_factory):
    config = run_config(shared_world, **STATISTICAL)
    config["report"] = {"tasks": [], "baselines": []}
    out = tmp_path_factory.mktemp("paired") / "run"
    evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
    return config, out


def test_a_run_keeps_one_reference_per_member_each_the_members_own(paired_run):
    config, out = paired_run
    ledger = Ledger(out)
    keys = ledger.meta_keys(REFERENCE)
    # Bounded: one per member of the final population, whose parents' went.
    final = ledger.generations()[-1]["members"]
    assert sorted(keys) == sorted(REFERENCE + m for m in final)
    accepted = {
        (r.step[len("init/"):] if r.step.startswith("init/") else Path(r.member).name): r
        for r in ledger.candidates() if r.status == Status.ACCEPTED
    }
    for key in keys:
        values = json.loads(ledger.get_meta(key))["toy_dev"]
        assert len(values) == 30
        # The member's own documents: their mean is its recorded dev score.
        assert sum(values) / 30 == pytest.approx(accepted[key[len(REFERENCE):]].dev["toy_dev"]["acc"])
    assert any(not k.startswith(REFERENCE + "m") for k in keys), "no offspring was accepted, so nothing was shown"
    ledger.close()


def test_a_paired_run_resumes_after_kill_9_to_the_same_model(paired_run, tmp_path):
    config, out = paired_run
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([CLI, "evolve", str(path), "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_offspring(proc, run_dir, 6)  # mid generation 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([CLI, "evolve", str(path), "--out", str(run_dir), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = "model/model.safetensors"
    assert (run_dir / model).read_bytes() == (out / model).read_bytes()
    rows = lambda d: [(r.step, r.status, r.fitness) for r in Ledger(d).candidates()]  # noqa: E731
    assert rows(run_dir) == rows(out)
    # Replaying the generations' ends kept every reference the killed run had added since.
    kept = lambda d: {k: Ledger(d).get_meta(k) for k in Ledger(d).meta_keys(REFERENCE)}  # noqa: E731
    assert kept(run_dir) == kept(out)
