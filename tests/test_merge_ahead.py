"""The merge-ahead worker: the same tensors as a merge here, or nothing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mergekit.options import MergeOptions

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.merging.merge import merge_in_memory
from mergekit_evolver.recipes.parse import parse_merge_config, recipe_yaml
from mergekit_evolver.merging.ahead import MergeAhead
from mergekit_evolver.population.store import read_from_files
from mergekit_evolver.run import Run, evolve
from toy_world import run_config

OPTIONS = MergeOptions(quiet=True, device="cpu", random_seed=5)
READY_S = 120


@pytest.fixture(scope="module")
def ahead():
    worker = MergeAhead(OPTIONS)
    worker.start()
    assert worker.wait_ready(READY_S), "the worker never became ready"
    yield worker
    worker.close()


def recipes(population: list[Path]) -> dict[str, dict]:
    x, r1, r2, r3, base = (str(p) for p in population)
    return {
        "de_rand1 with DARE": {
            "merge_method": "de_rand1", "base_model": x,
            "models": [{"model": r1}, {"model": r2}, {"model": r3}],
            "parameters": {"seed": 11, "F": 0.7, "CR": 0.6, "sparsify": "dare", "density": 0.5},
            "dtype": "float32",
        },
        # Draws from the global RNG that the merge seeds from options.random_seed.
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": w, "density": 0.4}}
                       for m, w in ((r1, 0.6), (r2, 0.3), (r3, 0.5))],
            "dtype": "bfloat16",
        },
        "slerp": {
            "merge_method": "slerp", "base_model": x, "models": [{"model": x}, {"model": r1}],
            "parameters": {"t": 0.3}, "dtype": "float16",
        },
    }


@pytest.mark.parametrize("name", ["de_rand1 with DARE", "dare_ties", "slerp"])
def test_the_worker_merges_bit_for_bit_what_a_merge_here_gives(ahead, population, name):
    recipe = parse_merge_config(recipes(population)[name])
    text = recipe_yaml(recipe)
    ahead.expect(text)
    got = ahead.take(text)
    assert got is not None, "the worker's result was not taken"
    read_from_files(recipe.referenced_models())
    here = merge_in_memory(recipe, OPTIONS)
    assert list(got.state) == list(here)
    for key, tensor in here.items():
        assert got.state[key].dtype == tensor.dtype and got.state[key].shape == tensor.shape, key
        assert torch.equal(got.state[key].view(torch.uint8), tensor.view(torch.uint8)), key
    assert got.non_finite is None


def test_only_the_expected_recipe_is_taken(ahead, population):
    texts = [recipe_yaml(parse_merge_config(r)) for r in recipes(population).values()]
    a, b, c = texts
    ahead.expect(a)
    assert ahead.take(b) is None  # not what the worker is making: merged here
    assert ahead.take(a) is not None  # the worker's result is still there for a
    assert ahead.take(a) is None  # and taken once
    ahead.expect(a)
    ahead.expect(c)  # a was a wrong guess: dropped
    assert ahead.take(a) is None
    assert ahead.take(c) is not None


def test_a_merge_the_worker_cannot_do_is_merged_here(ahead, population, tmp_path):
    gone = tmp_path / "gone"
    shutil.copytree(population[1], gone)
    recipe = recipes(population)["de_rand1 with DARE"]
    recipe["models"][0] = {"model": str(gone)}
    text = recipe_yaml(parse_merge_config(recipe))
    shutil.rmtree(gone)
    ahead.expect(text)
    assert ahead.take(text) is None
    ok = recipe_yaml(parse_merge_config(recipes(population)["slerp"]))
    ahead.expect(ok)
    assert ahead.take(ok) is not None  # the worker carries on after a failed job


def test_a_dead_worker_means_every_merge_happens_here(population):
    worker = MergeAhead(OPTIONS)
    worker.start()
    assert worker.wait_ready(READY_S)
    worker._process.kill()
    worker._process.wait()
    text = recipe_yaml(parse_merge_config(recipes(population)["slerp"]))
    worker.expect(text)
    assert worker.take(text) is None
    assert not worker.enabled
    worker.close()


def test_disabled_it_starts_no_process():
    worker = MergeAhead(OPTIONS, enabled=False)
    worker.start()
    assert worker._process is None
    worker.expect("anything")
    assert worker.take("anything") is None


def test_the_worker_does_not_run_the_callers_main_module(population, tmp_path):
    """A user's script without a __main__ guard must run once: the worker is a
    fresh interpreter, not a multiprocessing spawn of the caller's module."""
    marks = tmp_path / "marks.txt"
    recipe = recipes(population)["de_rand1 with DARE"]
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from mergekit.options import MergeOptions
        from mergekit_evolver.recipes.parse import parse_merge_config, recipe_yaml
        from mergekit_evolver.merging.ahead import MergeAhead

        with open({str(marks)!r}, "a") as f:
            f.write("ran\\n")
        worker = MergeAhead(MergeOptions(quiet=True, device="cpu", random_seed=5))
        worker.start()
        assert worker.wait_ready({READY_S})
        text = recipe_yaml(parse_merge_config({recipe!r}))
        worker.expect(text)
        assert worker.take(text) is not None
        worker.close()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert marks.read_text() == "ran\n"


STRATEGIES = {
    # A merged output depends on accepted offspring, so the chain is exercised.
    "evolver": dict(de__generations=3, output={"kind": "merged"}),
    # DARE draws from the global RNG seeded per merge; the worker must draw the same.
    "recipe (CMA-ES over dare_ties)": dict(strategy="recipe", search={
        "merge_method": "dare_ties", "layer_granularity": 1, "optimizer": "cmaes", "budget": 10,
        "population_size": 5,
    }),
    "kinship greedy": dict(strategy="kinship_greedy", greedy={"top_k": 2, "max_rounds": 2, "stop_kinship": None}),
}


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only: runs write under their own tmp dirs


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_merging_ahead_changes_no_result(world, tmp_path, monkeypatch, strategy):
    """With the worker ready before the search, it merges most candidates, and
    the run decides and ends exactly as one that merges every candidate here."""
    taken = []
    original = Run.initial_members

    def members_then_a_ready_worker(self):
        members = original(self)
        if self.executor.ahead.enabled:
            assert self.executor.ahead.wait_ready(READY_S), "the merge-ahead worker never became ready"
        taken.append(self.executor.ahead)
        return members

    monkeypatch.setattr(Run, "initial_members", members_then_a_ready_worker)
    rows, models = {}, {}
    for ahead in (True, False):
        out = tmp_path / str(ahead)
        config = {**run_config(world, **STRATEGIES[strategy]), "merge_ahead": ahead}
        evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
        rows[ahead] = [
            (c.step, c.status, c.fitness, c.recipe.replace(str(out), "RUN") if c.recipe else None)
            for c in Ledger(out).candidates()
        ]
        models[ahead] = (out / "model" / "model.safetensors").read_bytes()
    with_worker, without = taken
    scored = sum(1 for step, *_ in rows[True] if step.startswith(("g0", "search/", "greedy/")))
    assert with_worker.taken >= scored // 2, (with_worker.taken, scored)
    assert without.taken == 0 and not without.enabled
    assert rows[True] == rows[False]
    assert models[True] == models[False]
