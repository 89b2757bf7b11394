"""Recipe-space runs (strategy: recipe) on the toy world: export, resume,
hybrid, mergekit-evolve configs and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolver.cli import main
from mergekit_evolver.config import EvolveConfig, load_evolve_config
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.run import evolve
from lineage_check import assert_lineage_replays, same_tensors
from toy_world import run_config

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only: runs write under their own tmp dirs


def run(config: dict, out: Path) -> str:
    return evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)


def recipe_config(world, **search) -> dict:
    settings = {"merge_method": "dare_ties", "layer_granularity": 1, "filters": ["mlp"],
                "budget": 12, "population_size": 5, **search}
    return run_config(world, strategy="recipe", search=settings)


def search_rows(run_dir: Path):
    return [c for c in Ledger(run_dir).candidates("search")]


@pytest.fixture(scope="module")
def de_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "de"
    run(recipe_config(world), out)
    return out


def test_de_searches_from_the_default_recipe_and_keeps_the_best(de_run):
    rows = search_rows(de_run)
    assert [r.step for r in rows] == [f"search/e{k:04d}" for k in range(12)]
    first = yaml.safe_load(rows[0].recipe)
    weights = {src["parameters"]["weight"][1]["value"] for s in first["slices"] for src in s["sources"][:4]}
    assert weights == {0.25}  # the default recipe is the first candidate
    best = max(rows, key=lambda r: r.fitness)  # the earliest of the fittest
    exported = (de_run / "best_recipe.yml").read_text()
    assert yaml.safe_load(exported) == yaml.safe_load(best.recipe)
    assert f"({best.step})" in exported
    gens = [g for g in Ledger(de_run).generations()]
    assert [g["evaluated"] for g in gens] == [5, 5, 2] and gens[-1]["best"] == best.fitness


def test_plain_mergekit_yaml_reproduces_the_model_from_the_exported_recipe(de_run, tmp_path):
    """No plugin: mergekit's own CLI, with the seed the recipe's header names
    (dare_ties draws its masks from it)."""
    recipe = de_run / "best_recipe.yml"
    assert "--random-seed 3" in recipe.read_text()
    done = subprocess.run([str(BIN / "mergekit-yaml"), str(recipe), str(tmp_path / "plain"), "--random-seed", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert same_tensors(tmp_path / "plain", de_run / "model")


def test_the_scored_candidate_is_the_exported_model(de_run):
    """The in-memory merge that was scored draws the same DARE masks as the
    written model: re-scoring the model gives the best candidate's dev scores."""
    from mergekit_evolver.scoring.evaluator import Evaluator, Suite
    from mergekit_evolver.population.store import load_state

    config = EvolveConfig.model_validate(yaml.safe_load((de_run / "run.yml").read_text()))
    suite = Suite(config.fitness.tasks, config.fitness)
    ledger = Ledger(de_run)
    best = max(search_rows(de_run), key=lambda r: r.fitness)
    scored = Evaluator(Path(config.population.models[0]), config.fitness, ledger).score(load_state(de_run / "model"), suite)
    assert scored.cached and scored.scores == best.dev


def test_cma_es_run_killed_and_resumed_ends_with_the_uninterrupted_model(world, tmp_path):
    config = recipe_config(world, optimizer="cmaes", merge_method="ties", budget=16, population_size=4)
    run(config, tmp_path / "whole")
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "mergekit-evolver"), "evolve", str(path), "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = run_dir / "ledger.sqlite"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            n = sqlite3.connect(ledger).execute("SELECT COUNT(*) FROM candidates WHERE role='search'").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= 6:  # inside CMA-ES's second generation
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([str(BIN / "mergekit-evolver"), "evolve", str(path), "--out", str(run_dir), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert [r.recipe for r in search_rows(run_dir)] == [r.recipe for r in search_rows(tmp_path / "whole")]
    assert (run_dir / "model/model.safetensors").read_bytes() == (tmp_path / "whole/model/model.safetensors").read_bytes()
    assert (run_dir / "best_recipe.yml").read_text() == (tmp_path / "whole/best_recipe.yml").read_text()


def test_steady_de_tells_each_trial_at_once(world, tmp_path):
    run(recipe_config(world, merge_method="task_arithmetic", mode="steady", jde=True, budget=9), tmp_path / "s")
    rows = search_rows(tmp_path / "s")
    assert len(rows) == 9 and all(r.operator == "de rand/1/bin jDE steady" for r in rows)
    assert [g["evaluated"] for g in Ledger(tmp_path / "s").generations()] == [5, 4]


def test_hybrid_seeds_the_weight_space_population_with_the_best_recipe(world, tmp_path):
    config = recipe_config(world, merge_method="task_arithmetic", budget=5, hybrid=True)
    config["de"]["generations"] = 2
    run(config, tmp_path / "h")
    ledger = Ledger(tmp_path / "h")
    seed = ledger.find("search/best")
    best = max(search_rows(tmp_path / "h"), key=lambda r: r.fitness)
    assert seed.recipe == best.recipe and seed.fitness == best.fitness
    gens = ledger.generations()
    assert [g.get("phase") for g in gens] == ["recipe", None, None, None]
    assert gens[1]["members"] == ["m0", "m1", "m2", "m3", "search_best"]
    offspring = ledger.candidates("offspring")
    assert len(offspring) == 10 and {c.slot for c in offspring} == set(range(5))
    assert_lineage_replays(tmp_path / "h", tmp_path / "replay")


def mergekit_evolve_config(world, **extra) -> dict:
    """A config in mergekit-evolve's own format, keys and all."""
    return {
        "genome": {
            "models": [str(m) for m in world.models],
            "merge_method": "task_arithmetic",
            "base_model": str(world.base),
            "layer_granularity": 1,
            "filters": ["self_attn"],
            "normalize": False,
        },
        "tasks": [{"name": "toy_dev", "weight": 1.0, "metric": "acc,none"}],
        "limit": 20,
        "num_fewshot": 0,
        "shuffle": True,
        "random_init": False,
        **extra,
    }


def test_a_mergekit_evolve_config_runs_unchanged(world, tmp_path):
    path = tmp_path / "evol.yml"
    path.write_text(yaml.safe_dump(mergekit_evolve_config(world, apply_chat_template=False)))
    flags = dict(max_fevals=6, task_search_path=(str(world.include_path),), random_seed=2)
    mapped = load_evolve_config(path, flags)
    assert (mapped.strategy, mapped.seed, mapped.search.optimizer, mapped.search.budget) == ("recipe", 2, "cmaes", 6)
    assert (mapped.fitness.limit, mapped.fitness.num_fewshot, mapped.fitness.shuffle) == (20, 0, True)
    assert mapped.search.filters == ["self_attn"] and mapped.fitness.tasks[0].metric == "acc,none"
    result = CliRunner().invoke(main, ["evolve", str(path), "--out", str(tmp_path / "r"), "--max-fevals", "6",
                                       "--task-search-path", str(world.include_path), "--random-seed", "2"])
    assert result.exit_code == 0, result.output
    rows = search_rows(tmp_path / "r")
    assert len(rows) == 6 and all(r.operator == "cma-es" for r in rows)
    assert all(set(r.dev) == {"toy_dev"} for r in rows)
    assert yaml.safe_load((tmp_path / "r/best_recipe.yml").read_text())["parameters"]["normalize"] is False


def refused(tmp_path: Path, config: dict, *flags: str) -> str:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["evolve", str(path), "--out", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()
    return result.output.strip()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"merge_method": "karcher"}, "cannot search karcher"),
        ({"layer_granularity": 3}, "layer_granularity 3 does not divide the model's 2 layers"),
        ({"bounds": {"t": [0, 1]}}, "bounds for t, which dare_ties does not search"),
        ({"population_size": 3}, "rand/1/bin needs a population of at least 5"),
        ({"F": 3}, "search.F: Input should be less than or equal to 2"),
        ({"optimizer": "pso"}, "search.optimizer"),
        ({"optimizer": "cmaes", "mode": "steady"}, "mode steady is for optimizer de"),
        ({"output": {"kind": "merged"}}, "merged selection and output are for a weight-space population"),
    ],
)
def test_bad_search_settings(world, tmp_path, change, message):
    config = recipe_config(world)
    change = dict(change)
    top = change.pop("output", None)
    if top:
        config["output"] = top
    config["search"].update(change)
    assert message in refused(tmp_path, config)


def without_chat_template(model: Path, dest: Path) -> Path:
    shutil.copytree(model, dest)
    (dest / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((dest / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    return dest


def test_bad_mergekit_evolve_configs(world, tmp_path):
    flags = ("--task-search-path", str(world.include_path))
    # mergekit-evolve applies chat templates by default; this tokenizer has none.
    plain = mergekit_evolve_config(world)
    plain["genome"]["models"][0] = str(without_chat_template(world.models[0], tmp_path / "nochat"))
    assert "has no chat template" in refused(tmp_path, plain, *flags)
    naughty = mergekit_evolve_config(world, apply_chat_template=False, tasks=["arc_challenge"])
    assert "common benchmark task" in refused(tmp_path, naughty, *flags)
    bad = mergekit_evolve_config(world)
    bad["genome"]["merge_method"] = "della"
    assert "not a valid mergekit-evolve config" in refused(tmp_path, bad)
    native = recipe_config(world)
    assert "--max-fevals: mergekit-evolve options" in refused(tmp_path, native, "--max-fevals", "5")


def test_generations_log_is_json_lines(de_run):
    lines = (de_run / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["phase"] for line in lines] == ["recipe"] * 3
