"""The population cache: whole members admitted within the budget, least
recently used out first, the merge's own members never evicted for another;
prefetch; and runs with and without it giving the same bits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.config.executor import ExecutorConfig
from mergekit_evolver.config.load import load_evolve_config
from mergekit_evolver.errors import one_line
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.population import cache as cache_module
from mergekit_evolver.population.cache import POPULATION_CACHE, PopulationCache
from mergekit_evolver.population.store import FileLoader
from mergekit_evolver.run import evolve
from toy_world import run_config


class FakeMember:
    """Two tensors of 4 float32 (16 bytes each), counting reads from 'disk'."""

    def __init__(self, key: str, slow: float = 0.0):
        self.key, self.slow, self.reads = key, slow, []
        self._state = {f"t{i}": torch.full((4,), float(i) + len(key)) for i in range(2)}
        self.nbytes = 32

    def names(self):
        return list(self._state)

    def read(self, name):
        time.sleep(self.slow)
        self.reads.append(name)
        return self._state[name].clone()


def read_all(cache, member):
    return [cache.tensor(member, name) for name in member.names()]


def test_members_are_held_whole_within_the_budget_and_the_least_recently_used_leaves_first():
    cache = PopulationCache(budget=64)  # two members
    a, b, c = FakeMember("a"), FakeMember("b"), FakeMember("c")
    for m in (a, b):
        read_all(cache, m)
    read_all(cache, a)  # a is now the most recently used
    assert len(a.reads) == 2 and cache.hits == 2
    read_all(cache, c)
    assert cache.members() == ["a", "c"] and cache.held == 64
    read_all(cache, b)  # evicted, so read again from its files
    assert len(b.reads) == 4 and cache.held <= cache.budget


def test_the_merges_own_members_are_never_evicted_and_one_that_does_not_fit_is_read_through():
    cache = PopulationCache(budget=64)
    a, b, c = FakeMember("a"), FakeMember("b"), FakeMember("c")
    cache.pin(["a", "b", "c"])
    for name in a.names():  # a merge reads its members interleaved, tensor by tensor
        for m in (a, b, c):
            cache.tensor(m, name)
    assert cache.members() == ["a", "b"]  # c did not fit: a and b are pinned
    for m in (a, b, c):
        read_all(cache, m)
    assert (len(a.reads), len(b.reads), len(c.reads)) == (2, 2, 4)
    big = FakeMember("big")
    big.nbytes = 65
    cache.pin([])
    read_all(cache, big)
    assert "big" not in cache.members() and cache.members() == ["a", "b"]


def test_a_budget_of_zero_reads_every_tensor_from_its_files():
    cache = PopulationCache(budget=0)
    a = FakeMember("a")
    read_all(cache, a)
    read_all(cache, a)
    assert len(a.reads) == 4 and cache.members() == []


def test_forget_lets_a_member_go():
    cache = PopulationCache(budget=64)
    a = FakeMember("a")
    read_all(cache, a)
    cache.forget("a")
    assert cache.members() == [] and cache.held == 0


def test_prefetch_reads_the_next_members_so_the_merge_reads_nothing_and_a_merge_stops_it():
    cache = PopulationCache(budget=96)
    a, b = FakeMember("a"), FakeMember("b")
    cache.prefetch([a, b])
    cache._prefetch.join()
    assert cache.members() == ["a", "b"] and len(a.reads) + len(b.reads) == 4
    for m in (a, b):
        assert [torch.equal(x, y) for x, y in zip(read_all(cache, m), m._state.values())] == [True, True]
    assert len(a.reads) + len(b.reads) == 4
    slow = FakeMember("slow", slow=0.2)
    cache.prefetch([slow])
    cache.pin(["a"])  # the next merge: the prefetch stops at once
    assert cache._prefetch is None and len(slow.reads) <= 1


def test_cache_bytes_is_checked_at_the_door(shared_world):
    with pytest.raises(ValueError, match="cache_bytes must be auto or a number of bytes >= 0; got -1"):
        EvolveConfig.model_validate({**run_config(shared_world), "executor": {"cache_bytes": -1}})
    config = EvolveConfig.model_validate(run_config(shared_world))
    assert config.executor.cache_bytes == "auto"
    # On a CPU run the OS page cache already holds the members' files.
    assert config.executor.cache_device("cpu") == "cpu" and config.executor.cache_budget("cpu") == 0
    assert config.executor.cache_device("cuda:1") == "cuda:1"
    host = config.executor.model_copy(update={"cache_on": "host"})
    assert host.cache_device("cuda:1") == "cpu" and host.cache_budget("cuda:1") == 0
    assert cache_module.auto_budget("cpu") == pytest.approx(cache_module._mem_available() / 4, rel=0.2)


def test_the_auto_budget_on_an_accelerator_is_a_quarter_of_its_free_memory(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (8 << 30, 16 << 30))
    executor = ExecutorConfig()
    assert executor.cache_budget("cuda:1") == 2 << 30 and asked == [torch.device("cuda:1")]


def test_a_run_gives_the_same_bits_with_any_budget_and_keeps_the_cache_within_it(shared_world, tmp_path, monkeypatch):
    world = shared_world
    size = FileLoader(Path(world.models[0])).nbytes
    seen = []
    admitted = PopulationCache._admitted

    def watch(self, member):
        got = admitted(self, member)
        seen.append(self.held)
        return got

    monkeypatch.setattr(PopulationCache, "_admitted", watch)
    prefetched = []
    original_prefetch = PopulationCache.prefetch

    def count(self, members):
        members = list(members)
        prefetched.append(len(members))
        return original_prefetch(self, members)

    monkeypatch.setattr(PopulationCache, "prefetch", count)
    runs = {}
    for budget, prefetch in ((0, "auto"), (int(2.5 * size), "auto"), (10**12, "auto"), (int(2.5 * size), True)):
        seen.clear()
        config = run_config(world, de__generations=2, executor={"cache_bytes": budget, "prefetch": prefetch})
        config["report"] = {"tasks": [], "baselines": []}
        out = tmp_path / f"run{budget}_{prefetch}"
        evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
        runs[budget, prefetch] = out
        # On a CPU run, "auto" does not prefetch: the thread would slow the forward passes.
        assert (sum(prefetched) > 0) == (prefetch is True)
        prefetched.clear()
        if budget == int(2.5 * size):
            assert seen and max(seen) <= budget and max(seen) == 2 * size
    assert POPULATION_CACHE.budget == 0  # a closed run leaves the process's cache off

    def rows(run):
        return [(c.step, (c.recipe or "").replace(str(run), ""), c.status, c.fitness, c.dev, c.member and Path(c.member).name)
                for c in Ledger(run).candidates()]

    base = rows(runs[0, "auto"])
    for run in list(runs.values())[1:]:
        assert rows(run) == base
    final = {b: (r / "model" / "model.safetensors").read_bytes() for b, r in runs.items()}
    assert len(set(final.values())) == 1


def test_a_bad_cache_budget_in_a_run_config_is_one_line_naming_it(shared_world, tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**run_config(shared_world), "executor": {"cache_bytes": "lots"}}))
    with pytest.raises(ValidationError) as info:
        load_evolve_config(path)
    assert one_line(info.value) == "executor.cache_bytes: cache_bytes must be auto or a number of bytes >= 0; got 'lots'"
