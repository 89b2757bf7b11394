"""Derived candidate identity: what it names, that a resumed run derives the
same ones (so its cache hits), that a changed parent never hits a stale
entry, and that a resume refuses inputs whose weights changed."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.merging.identity import derived_identity
from mergekit_evolver.run import evolve
from mergekit_evolver.run.context import Run
from mergekit_evolver.run.loop import CandidateLoop
from toy_world import run_config

CLI = str(Path(sys.executable).with_name("mergekit-evolver"))


def test_an_identity_names_the_recipe_the_members_and_what_changes_bits():
    recipe = {"merge_method": "de_rand1", "base_model": "id-a", "models": [{"model": "id-b"}, {"model": "id-c"}],
              "parameters": {"F": 0.5, "seed": 7}, "dtype": "float32"}
    key = derived_identity(recipe, device="cpu", seed=0)
    assert key == derived_identity(dict(reversed(list(recipe.items()))), device="cpu", seed=0)
    assert key.startswith("derived:")
    changed = [
        {**recipe, "base_model": "id-x"},
        {**recipe, "parameters": {"F": 0.5, "seed": 8}},
        {**recipe, "dtype": "bfloat16"},
    ]
    assert len({key, *(derived_identity(r, device="cpu", seed=0) for r in changed)}) == 4
    # The device's kind counts (CPU and CUDA kernels may round differently); which GPU does not.
    assert derived_identity(recipe, device="cuda:0", seed=0) == derived_identity(recipe, device="cuda:1", seed=0) != key
    assert derived_identity(recipe, device="cpu", seed=1) != key


@pytest.fixture(scope="module")
def finished(shared_world, tmp_path_factory):
    config = run_config(shared_world, de__generations=2)
    config["report"] = {"tasks": [], "baselines": []}
    out = tmp_path_factory.mktemp("identity") / "run"
    evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
    return config, out


def first_offspring(run: Run, members):
    strategy = run.strategy("evolver", members)
    proposal = strategy.ask()
    if proposal is None:  # generation 0 (the starting population) ends first, as in the loop
        strategy.end_generation()
        proposal = strategy.ask()
    assert proposal.step == "g001/s00/offspring"
    return proposal


def test_a_resumed_run_derives_the_recorded_identities_and_a_changed_parent_misses(finished):
    config, out = finished
    run = Run(EvolveConfig.model_validate(config), out, resume=True, log=lambda _: None)
    try:
        members = run.initial_members()
        proposal = first_offspring(run, members)
        row = run.ledger.find(proposal.step)
        assert row.status in (Status.ACCEPTED, Status.REJECTED)
        identity = CandidateLoop(run, members).identity(proposal.recipe)
        # What the killed-and-resumed run would derive is what was recorded, and its score is cached under it.
        assert identity == row.content_hash
        assert run.ledger.cached_scores(identity, run.dev.key) == row.dev
        # The same recipe over a parent with other weights (its identity) is another candidate.
        other = [dataclasses.replace(members[0], content_id="0" * 64), *members[1:]]
        stale = CandidateLoop(run, other).identity(proposal.recipe)
        assert stale != identity and run.ledger.cached_scores(stale, run.dev.key) is None
    finally:
        run.close()


def test_a_resume_refuses_an_input_model_whose_weights_changed(shared_world, tmp_path):
    models = []
    for i, model in enumerate(shared_world.models):
        shutil.copytree(model, tmp_path / f"m{i}")
        models.append(str(tmp_path / f"m{i}"))
    config = run_config(shared_world, de__generations=1, population={"models": models, "base_model": str(shared_world.base)})
    config["report"] = {"tasks": [], "baselines": []}
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    done = subprocess.run([CLI, "evolve", str(path), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    weights = tmp_path / "m1" / "model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    before = (out / "ledger.sqlite").read_bytes()
    done = subprocess.run([CLI, "evolve", str(path), "--out", str(out), "--resume"], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'm1'}: its weights changed since this run started" in lines[0], done.stderr
    assert (out / "ledger.sqlite").read_bytes() == before
    assert Ledger(out).find("init/m1").content_hash is not None
