"""Whole weight-space runs on the toy world: selection, resume, cache, honesty."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from de_run import wait_for_offspring
import torch
import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.scoring.evaluator import Evaluator, Suite
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.population.store import load_state
import mergekit_evolver.run as run_package
from mergekit_evolver.run import evolve
from lineage_check import assert_lineage_replays
from tiny_models import load_tensors
from toy_world import make_world, run_config, save_model, write_task, reverse_items

CLI = str(Path(sys.executable).parent / "mergekit-evolver")


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only: runs write under their own tmp dirs


def run(config: dict, out: Path) -> str:
    return evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    table = run(CONFIG(world), out)
    return out, table


def CONFIG(world) -> dict:
    # A merged output depends on accepted offspring, so its lineage is a real chain.
    return run_config(world, de__generations=3, output={"kind": "merged"})


def fitness_of_members(ledger: Ledger) -> dict[str, float]:
    fit = {}
    for c in ledger.candidates():
        if c.step.startswith("init/m"):
            fit[c.step.split("/")[1]] = c.fitness
        if c.role == "offspring" and c.status == "accepted":
            fit[f"g{c.generation:03d}_s{c.slot:02d}"] = c.fitness
    return fit


def test_a_worse_or_equal_offspring_is_never_kept(finished):
    out, _ = finished
    ledger = Ledger(out)
    fit = fitness_of_members(ledger)
    offspring = ledger.candidates("offspring")
    assert len(offspring) == 3 * 4
    for c in offspring:
        parent = c.parents[0]
        assert (c.status == "accepted") == (c.fitness > fit[parent]), c.step
        assert c.test == {}  # selection rows carry no held-out scores
    accepted = [c for c in offspring if c.status == "accepted"]
    assert accepted, "the toy run should accept something"
    for c in accepted:
        stored = load_state(Path(c.member))
        assert Path(c.member).parent == out / "population"
        assert all(torch.isfinite(t).all() for t in stored.values())


def test_population_fitness_never_decreases(finished):
    out, _ = finished
    gens = Ledger(out).generations()
    assert [g["generation"] for g in gens] == [0, 1, 2, 3]
    for before, after in zip(gens, gens[1:]):
        assert after["best"] >= before["best"] and after["min"] >= before["min"]
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_outputs_model_lineage_report(finished, tmp_path):
    out, table = finished
    for row in ("m0", "m3", "average", "evolved"):
        assert row in table
    model = out / "model"
    assert (model / "model.safetensors").is_file() and (model / "tokenizer.json").is_file()
    assert not list(model.glob("*.bin"))
    assert "Evolved merge" in (model / "README.md").read_text()
    assert (out / "report" / "fitness.png").is_file() and (out / "report" / "scores.png").is_file()
    assert_lineage_replays(out, tmp_path)


def test_the_search_leaves_the_garbage_collector_as_it_found_it(world, finished, tmp_path, monkeypatch):
    assert gc.get_freeze_count() == 0  # after the whole run in `finished`

    def search(run, members):
        assert gc.get_freeze_count() > 0  # the heap built before the search is frozen during it
        raise RuntimeError("stopped mid-search")

    monkeypatch.setattr(run_package, "search", search)
    with pytest.raises(RuntimeError, match="mid-search"):
        run(CONFIG(world), tmp_path / "b")
    assert gc.get_freeze_count() == 0


def test_report_command_reprints_the_table(finished):
    out, table = finished
    done = subprocess.run([CLI, "report", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert table.strip() in done.stdout


def test_same_config_and_seed_give_bit_identical_model(world, finished, tmp_path):
    out, _ = finished
    run(CONFIG(world), tmp_path / "b")
    assert (tmp_path / "b/model/model.safetensors").read_bytes() == (out / "model/model.safetensors").read_bytes()


def test_resume_after_kill_ends_with_the_uninterrupted_model(world, finished, tmp_path):
    out, _ = finished
    config = tmp_path / "run.yml"
    # With the merge-ahead worker, which must not outlive the killed run.
    config.write_text(yaml.safe_dump({**CONFIG(world), "merge_ahead": True}))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([CLI, "evolve", str(config), "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_offspring(proc, run_dir, 6)  # mid generation 2
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert children, "the run started no merge-ahead worker"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and any(alive(int(pid)) for pid in children):
        time.sleep(0.1)
    assert not any(alive(int(pid)) for pid in children), "the worker outlived its run"
    assert not (run_dir / "model").exists()
    done = subprocess.run([CLI, "evolve", str(config), "--out", str(run_dir), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "model/model.safetensors").read_bytes() == (out / "model/model.safetensors").read_bytes()


def test_a_resume_may_switch_merging_ahead(world):
    config = EvolveConfig.model_validate(CONFIG(world))
    assert config.merge_ahead is False
    for ahead in (True, False):
        assert config.model_copy(update={"merge_ahead": ahead}).digest() == config.digest()


def alive(pid: int) -> bool:
    """Running, not exited (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_scores_are_cached_by_content_across_evaluators(world, tmp_path):
    config = EvolveConfig.model_validate(run_config(world))
    suite = Suite(config.fitness.tasks, config.fitness)
    tmp_path.mkdir(exist_ok=True)
    ledger = Ledger(tmp_path)
    calls = []
    real_run = suite.run
    suite.run = lambda lm, bar=None: calls.append(1) or real_run(lm, bar)
    state = load_state(world.models[0])
    first = Evaluator(world.models[0], config.fitness, ledger).score(state, suite)
    again = Evaluator(world.models[1], config.fitness, ledger).score(dict(state), suite)
    other = Evaluator(world.models[1], config.fitness, ledger).score(load_state(world.models[1]), suite)
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert again.scores == first.scores and len(calls) == 2


def test_selection_never_sees_test_data(world, finished, tmp_path):
    """Changing the held-out split changes the report, not the evolved model."""
    out, _ = finished
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, seed in (("toy_dev", 1), ("toy_test", 77)):
        write_task(tasks, name, reverse_items(seed, 30))
    config = CONFIG(world)
    config["fitness"]["include_path"] = str(tasks)
    run(config, tmp_path / "other_test")
    assert (tmp_path / "other_test/model/model.safetensors").read_bytes() == (
        out / "model/model.safetensors"
    ).read_bytes()


def test_non_finite_offspring_is_rejected_and_the_run_goes_on(tmp_path):
    name = "model.norm.weight"
    world = make_world(tmp_path / "w", n_models=0)
    a = save_model(tmp_path / "a", seed=1, scale={name: 3e38})
    b = save_model(tmp_path / "b", seed=2, scale={name: -3e38})
    config = run_config(world, de={"operator": "de_current_to_rand1", "F": 0.5, "CR": 1.0, "generations": 1})
    config["population"]["models"] = [str(a), str(b)]
    logs = []
    evolve(EvolveConfig.model_validate(config), tmp_path / "out", log=logs.append)
    rows = Ledger(tmp_path / "out").candidates("offspring")
    assert [c.status for c in rows] == ["invalid", "invalid"]
    assert all(name in c.note for c in rows)
    assert any("non-finite" in line for line in logs)
    assert (tmp_path / "out/model/model.safetensors").is_file()


def test_merged_selection_keeps_offspring_that_improve_the_merged_population(world, tmp_path):
    config = run_config(world, de__generations=2, selection={"mode": "merged"})
    config["report"] = {"tasks": [], "baselines": []}
    run(config, tmp_path / "merged")
    ledger = Ledger(tmp_path / "merged")
    best = ledger.find("g000/merged").fitness
    offspring = ledger.candidates("offspring")
    assert len(offspring) == 8
    for c in offspring:
        assert (c.status == "accepted") == (c.fitness > best), c.step
        best = max(best, c.fitness)
    written = {p.name for p in (tmp_path / "merged/population").iterdir()}
    assert written == {f"g{c.generation:03d}_s{c.slot:02d}" for c in offspring if c.status == "accepted"}
    assert ledger.generations()[-1]["merged"] == best


def test_recipe_member_is_a_plain_mergekit_merge(world, tmp_path):
    recipe = {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}
    config = run_config(world, de__generations=1)
    config["population"]["recipes"] = {"ties": recipe}
    config["report"] = {"tasks": [], "baselines": []}
    run(config, tmp_path / "r")
    member = tmp_path / "r/population/recipe_ties"
    assert Ledger(tmp_path / "r").find("init/recipe_ties").fitness is not None
    plain = tmp_path / "plain.yml"
    plain.write_text(yaml.safe_dump({
        **recipe, "base_model": str(world.base), "dtype": "float32",
        "models": [{"model": str(m)} for m in world.models],
    }))
    done = subprocess.run([CLI, "yaml", str(plain), str(tmp_path / "plain"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got, want = load_tensors(member), load_tensors(tmp_path / "plain")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_task_vector_space_run_records_replayable_recipes(world, tmp_path):
    config = run_config(world, de={"operator": "de_current_to_rand1", "generations": 1,
                                   "space": "task_vectors", "sparsify": "dare", "density": 0.5})
    config["report"] = {"tasks": [], "baselines": []}
    run(config, tmp_path / "tv")
    from mergekit.options import MergeOptions

    from mergekit_evolver.merging.merge import merge_in_memory
    from mergekit_evolver.recipes.parse import parse_merge_config

    rows = Ledger(tmp_path / "tv").candidates("offspring")
    assert len(rows) == len(world.models)
    options = MergeOptions(quiet=True, device="cpu", random_seed=config.get("seed", 0))
    for c in rows:
        recipe = yaml.safe_load(c.recipe)
        assert recipe["parameters"]["space"] == "task_vectors"
        assert recipe["models"][-1] == {"model": str(world.base), "parameters": {"reference": True}}
        # Replayed from its recorded recipe alone, an accepted offspring is the one the run kept.
        replayed = merge_in_memory(parse_merge_config(recipe), options)
        assert c.content_hash.startswith("derived:")  # its identity names its recipe, not its bytes
        if c.status == "accepted":
            stored = load_state(Path(c.member))
            assert set(stored) == set(replayed) and all(torch.equal(stored[k], replayed[k]) for k in stored)


@pytest.mark.parametrize("merger", ["regmean", "fisher"])
def test_evolver_with_a_statistics_merger_keeps_each_slots_original_stats(world, tmp_path, merger):
    from mergekit_evolver.stats.collect import Source, collect_to_dir

    stats = []
    for i, model in enumerate(world.models):
        out, _ = collect_to_dir(str(model), Source("toy_dev", (str(world.include_path),)),
                                str(tmp_path / f"stats{i}"), kinds=("gram", "fisher"), device="cpu")
        stats.append(str(out))
    config = run_config(world, de__generations=1, selection={"mode": "merged", "merger": {"merge_method": merger}},
                        output={"kind": "merged"})
    config["population"]["stats"] = stats
    config["report"]["baselines"] = [merger]
    run(config, tmp_path / "run")
    ledger = Ledger(tmp_path / "run")
    for c in ledger.candidates():
        if c.recipe and yaml.safe_load(c.recipe)["merge_method"] == merger:
            entries = yaml.safe_load(c.recipe)["models"]
            assert [e["parameters"]["stats"] for e in entries] == stats, c.step
    assert ledger.find("report/evolved") is not None
    assert ledger.find(f"report/{merger}").fitness is not None


def test_kinship_is_tracked_and_can_stop_the_search(world, tmp_path):
    from mergekit_evolver.kinship.metrics import mean_kinship

    config = run_config(world, de__generations=3)
    config["kinship"] = {"track": True, "diverse_donors": True, "stop_above": -1.0}
    config["report"] = {"tasks": [], "baselines": []}
    run(config, tmp_path / "k")
    gens = Ledger(tmp_path / "k").generations()
    # Every population has kinship >= -1, so the search stops after generation 0.
    assert [g["generation"] for g in gens] == [0]
    assert gens[0]["stopped"].startswith("mean kinship")
    expected = mean_kinship(world.models, world.base, metrics=("pcc",))["pcc"]
    assert gens[0]["kinship"] == pytest.approx(expected, rel=1e-9)
    assert Ledger(tmp_path / "k").candidates("offspring") == []
    assert (tmp_path / "k/report/kinship.png").is_file()


def test_diverse_donors_prefer_unrelated_members():
    from mergekit_evolver.search.evolver import Evolver, KinshipUse
    from mergekit_evolver.search.protocol import REJECTED

    s = Evolver(["a", "b", "c", "d"], [0.1] * 4, operator="de_current_to_rand1",
                mode="individual", generations=200, seed=1, kinship=KinshipUse(diverse_donors=True))
    table = {("a", "b"): 0.95, ("a", "c"): 0.0, ("a", "d"): -0.5,
             ("b", "c"): 0.0, ("b", "d"): 0.0, ("c", "d"): 0.0}
    picks = []
    while not s.done:
        if (request := s.needs()) is not None:
            s.give(request, table)
        elif (p := s.ask()) is not None:
            if p.target == "a":
                picks.append(p.donors[0])
            s.tell(p, REJECTED)
        else:
            s.end_generation()
    share = {m: picks.count(m) / len(picks) for m in "bcd"}
    assert share["d"] > share["c"] > share["b"]
    assert share["b"] > 0  # close relatives are unlikely, not excluded


def test_fitness_honours_higher_is_better(world):
    base = run_config(world)
    up = EvolveConfig.model_validate(base)
    down_cfg = run_config(world)
    down_cfg["fitness"]["tasks"] = [{"name": "toy_dev", "higher_is_better": False}]
    down = EvolveConfig.model_validate(down_cfg)
    scores = {"toy_dev": {"acc": 0.3}}
    assert Suite(up.fitness.tasks, up.fitness).fitness(scores) == 0.3
    assert Suite(down.fitness.tasks, down.fitness).fitness(scores) == -0.3
    weighted = run_config(world)
    weighted["fitness"]["tasks"] = [{"name": "toy_dev", "weight": 3.0}, {"name": "toy_test", "weight": 1.0}]
    w = EvolveConfig.model_validate(weighted)
    assert Suite(w.fitness.tasks, w.fitness).fitness(
        {"toy_dev": {"acc": 0.2}, "toy_test": {"acc": 0.6}}) == pytest.approx(0.3)
