"""Candidates streamed into the resident model: scored as a whole state dict
would be, checked for NaN/Inf on the way, and kept with their exact bits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from mergekit.options import MergeOptions

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger, Status
from mergekit_evolver.merging.merge import merge_in_memory, merge_tensors
from mergekit_evolver.population.store import load_state, read_from_files, write_individual
from mergekit_evolver.recipes.candidates import de_recipe
from mergekit_evolver.recipes.parse import parse_merge_config
from mergekit_evolver.run import evolve
from mergekit_evolver.scoring.evaluator import ResidentModel, Suite
from toy_world import run_config

OPTIONS = MergeOptions(quiet=True, device="cpu", random_seed=0)


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only


def offspring(world):
    recipe = de_recipe("de_rand1", world.models[0], world.models[1:4], {"F": 0.7, "CR": 0.6, "seed": 5})
    read_from_files(recipe.referenced_models())
    return recipe


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_streamed_candidate_scores_as_its_whole_state_does(world, dtype):
    config = EvolveConfig.model_validate(run_config(world, fitness__dtype=dtype))
    suite = Suite(config.fitness.tasks, config.fitness)
    resident = ResidentModel(world.models[0], config.fitness)
    recipe = offspring(world)
    whole = merge_in_memory(recipe, OPTIONS)
    resident.load(whole)
    loaded = suite.run(resident.lm)
    resident.load(load_state(world.models[2]))  # something else in between
    streamed = resident.stream(merge_tensors(recipe, OPTIONS))
    assert streamed.non_finite is None and streamed.names == list(whole)
    assert suite.run(resident.lm).scores == loaded.scores
    # The resident copy is the candidate's bits exactly when the dtypes agree.
    assert streamed.exact == (dtype == "float32")
    if streamed.exact:
        kept = resident.state(streamed.names)
        assert all(torch.equal(kept[n].view(torch.uint8), whole[n].view(torch.uint8)) for n in whole)


def test_the_stream_stops_at_the_first_non_finite_tensor_and_names_it(world):
    config = EvolveConfig.model_validate(run_config(world))
    resident = ResidentModel(world.models[0], config.fitness)
    state = load_state(world.models[1])
    names = list(state)
    bad = names[3]
    state[bad] = state[bad].clone()
    state[bad].view(-1)[0] = float("inf")
    taken = []

    def tensors():
        for name in names:
            taken.append(name)
            yield name, state[name]

    streamed = resident.stream(tensors())
    assert streamed.non_finite == bad and streamed.names == names[:3] and taken == names[:4]
    with pytest.raises(ValueError, match=r"weights not in the resident model: \['nope'\]"):
        resident.stream(iter([("nope", state[names[0]])]))
    with pytest.raises(ValueError, match="candidate lacks resident weights"):
        resident.stream(iter([(names[0], state[names[0]])]))


def test_members_kept_from_a_streamed_run_are_their_recipes_bits_at_any_scoring_dtype(world, tmp_path):
    """float32 members scored in bfloat16: the resident copy is not the
    member's bits, so it is merged again to be written, and equals its recipe."""
    config = run_config(world, de__generations=2, fitness__dtype="bfloat16")
    config["report"] = {"tasks": [], "baselines": []}
    evolve(EvolveConfig.model_validate(config), tmp_path / "run", log=lambda _: None)
    kept = [c for c in Ledger(tmp_path / "run").candidates("offspring") if c.status == Status.ACCEPTED]
    assert kept, "nothing was accepted, so nothing was shown"
    for c in kept:
        recipe = parse_merge_config(yaml.safe_load(c.recipe))
        read_from_files(recipe.referenced_models())
        again = merge_in_memory(recipe, MergeOptions(quiet=True, device="cpu", random_seed=config["seed"]))
        stored = load_state(Path(c.member))
        assert set(stored) == set(again)
        assert all(stored[k].dtype == again[k].dtype and torch.equal(stored[k], again[k]) for k in again)


def test_a_member_written_as_its_merge_streams_is_the_whole_states_bits(world, tmp_path):
    """One shard: the same file bytes as writing the whole state, whatever
    order the tensors came in; in shards: mergekit's index, the same tensors,
    each shard under the limit."""
    state = merge_in_memory(offspring(world), OPTIONS)
    like = Path(world.models[0])
    whole = write_individual(state, tmp_path / "whole", like=like)
    streamed = write_individual(iter(reversed(list(state.items()))), tmp_path / "streamed", like=like)
    assert sorted(p.name for p in streamed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert (streamed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    limit = max(t.numel() * t.element_size() for t in state.values()) * 2
    sharded = write_individual(merge_tensors(offspring(world), OPTIONS), tmp_path / "sharded", like=like,
                               shard_bytes=limit)
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    assert all(p.stat().st_size <= limit + 65536 for p in shards)  # + each file's header
    back = load_state(sharded)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
