"""Individuals on disk and in memory, as mergekit reads them."""

from __future__ import annotations

import torch
from mergekit.options import MergeOptions

from mergekit_evolver.merging.fingerprint import content_hash
from mergekit_evolver.merging.merge import merge_in_memory
from mergekit_evolver.population.store import (
    FileLoader,
    MemorySlot,
    load_state,
    model_ref,
    read_from_files,
    write_individual,
)
from mergekit_evolver.recipes.candidates import de_recipe
from tiny_models import make_model


def test_file_loader_reads_every_tensor_exactly(tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(tmp_path / str(dtype), seed=1, dtype=dtype)
        expected = load_state(model)
        loader = FileLoader(model)
        for name, tensor in expected.items():
            got = loader.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name


def test_file_loader_reads_sharded_models(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(tmp_path / "one", seed=2)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(sharded, max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    loader, expected = FileLoader(sharded), load_state(model)
    assert set(loader.index.tensor_paths) == set(expected)
    assert all(torch.equal(loader.get_tensor(k), v) for k, v in expected.items())


def test_merges_read_through_file_loaders_match_mergekits_own(tmp_path, population):
    recipe = de_recipe("de_rand1", population[0], population[1:4], {"seed": 5, "CR": 0.3})
    options = MergeOptions(quiet=True)
    plain = merge_in_memory(recipe, options)
    read_from_files(recipe.referenced_models())
    pread = merge_in_memory(recipe, options)
    assert all(torch.equal(plain[k], pread[k]) for k in plain)


def test_in_memory_individual_merges_like_its_disk_twin(tmp_path, population):
    state = load_state(population[1])
    slot = MemorySlot(tmp_path / "scratch", like=population[1])
    ref = slot.serve(state)
    options = MergeOptions(quiet=True)
    on_disk = merge_in_memory(de_recipe("de_current_to_rand1", population[0], [population[1]], {"seed": 1}), options)
    in_memory = merge_in_memory(de_recipe("de_current_to_rand1", population[0], [ref.model.path], {"seed": 1}), options)
    slot.clear()
    assert all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
    assert not (slot.path / "model.safetensors").exists()  # nothing written to score it


def test_write_individual_is_atomic_and_complete(tmp_path, population):
    state = load_state(population[0])
    dest = write_individual(state, tmp_path / "pop" / "g001_s00", like=population[0])
    assert sorted(p.name for p in (tmp_path / "pop").iterdir()) == ["g001_s00"]  # no temp left
    assert (dest / "config.json").is_file()
    assert content_hash(load_state(dest)) == content_hash(state)
    # A second write (a resume) keeps the first, complete copy.
    before = (dest / "model.safetensors").stat().st_mtime_ns
    write_individual(state, dest, like=population[0])
    assert (dest / "model.safetensors").stat().st_mtime_ns == before


def test_content_hash_sees_every_byte_and_name(population):
    state = load_state(population[0])
    digest = content_hash(state)
    changed = dict(state)
    name = next(iter(state))
    changed[name] = state[name].clone()
    changed[name].view(-1)[0] += 1e-6
    assert content_hash(changed) != digest
    renamed = {("x." + k if k == name else k): v for k, v in state.items()}
    assert content_hash(renamed) != digest
    assert content_hash(dict(reversed(list(state.items())))) == digest
    assert model_ref(population[0]).model.path == str(population[0])
