"""The Ray executor on a local Ray (2 CPUs, no dashboard): the same results as
in-process, whatever the completion order, and the faults it survives.

One Ray instance serves the module; every run starts and stops its own
workers on it, as it would on a user's cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from de_run import wait_for_offspring
import yaml
from click.testing import CliRunner

from mergekit_evolver.cli import main
from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.errors import UserError
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.run import evolve
from mergekit_evolver.run.ray.faults import VARIABLE
from toy_world import run_config

ray = pytest.importorskip("ray")

CLI = str(Path(sys.executable).parent / "mergekit-evolver")


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray; its GCS address, for drivers in other processes."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world


def run(config: dict, out: Path) -> str:
    return evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)


def on_ray(config: dict, **executor) -> dict:
    return {**config, "executor": {"kind": "ray", "workers": 2, "timeout_s": 120, **executor}}


def decisions(run_dir: Path) -> list[tuple]:
    """What the run decided, candidate by candidate, and why (timings aside)."""
    rows = Ledger(run_dir).candidates()
    here = str(run_dir.resolve())
    return [
        (c.step, str(c.status), (c.recipe or "").replace(here, "RUN"), c.fitness, json.dumps(c.dev, sort_keys=True), c.content_hash,
         Path(c.member).name if c.member else None, c.note)
        for c in rows
    ]


def generations(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "seconds"} for g in Ledger(run_dir).generations()]


def model_bytes(run_dir: Path) -> bytes:
    return (run_dir / "model/model.safetensors").read_bytes()


def evolver_config(world) -> dict:
    return run_config(world, de__generations=2)


@pytest.fixture(scope="module")
def evolver_here(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("here") / "evolver"
    run(evolver_config(world), out)
    return out


def test_the_evolver_on_two_workers_with_random_delays_matches_in_process(
    cluster, world, evolver_here, tmp_path, monkeypatch
):
    # Random delays before every candidate: replies come back in any order.
    monkeypatch.setenv(VARIABLE, json.dumps({"delay": 0.4}))
    out = tmp_path / "ray"
    run(on_ray(evolver_config(world)), out)
    assert decisions(out) == decisions(evolver_here)
    assert generations(out) == generations(evolver_here)
    assert model_bytes(out) == model_bytes(evolver_here)
    logs = sorted((out / "logs/workers").iterdir())
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]  # both took candidates
    # Generational: every prediction was right, so no candidate was merged twice.
    evaluated = [line.split()[3].rstrip(":") for p in logs for line in p.read_text().splitlines()
                 if "/offspring: " in line and " wrote " not in line]
    assert sorted(evaluated) == sorted(c.step for c in Ledger(out).candidates("offspring"))


def test_merged_selection_on_ray_matches_in_process(cluster, world, tmp_path):
    # Each offspring is scored inside the merged population, which a worker
    # merges around it from its own memory slot; not generational.
    config = run_config(world, de__generations=2, selection={"mode": "merged"})
    run(config, tmp_path / "here")
    run(on_ray(config), tmp_path / "ray")
    assert decisions(tmp_path / "ray") == decisions(tmp_path / "here")
    assert model_bytes(tmp_path / "ray") == model_bytes(tmp_path / "here")


def test_statistical_racing_paired_on_ray_matches_in_process(cluster, world, tmp_path):
    # Each job carries the reference it is paired with (its parent's
    # per-document values), and a worker's full score brings its own back.
    from mergekit_evolver.run.context import REFERENCE

    config = run_config(world, de__generations=3, fitness__racing={"mode": "statistical", "rounds": 5, "confidence": 0.9})
    run(config, tmp_path / "here")
    run(on_ray(config), tmp_path / "ray")
    assert decisions(tmp_path / "ray") == decisions(tmp_path / "here")
    assert model_bytes(tmp_path / "ray") == model_bytes(tmp_path / "here")
    kept = lambda d: {k: Ledger(d).get_meta(k) for k in Ledger(d).meta_keys(REFERENCE)}  # noqa: E731
    assert kept(tmp_path / "ray") == kept(tmp_path / "here") != {}
    assert any(c.status == "raced" for c in Ledger(tmp_path / "ray").candidates("offspring"))


def recipe_config(world, **search) -> dict:
    settings = {"merge_method": "dare_ties", "layer_granularity": 1, "filters": ["mlp"],
                "budget": 10, "population_size": 5, **search}
    return run_config(world, strategy="recipe", search=settings)


@pytest.mark.parametrize(
    "search, workers",
    [
        ({}, 2),
        ({"optimizer": "cmaes", "merge_method": "ties", "budget": 8, "population_size": 4}, 1),
        # Not generational: a guess made before an acceptance is wrong and
        # computed again, so steady DE is the same too, only less parallel.
        ({"mode": "steady", "budget": 9}, 2),
    ],
    ids=["de", "cmaes", "de-steady"],
)
def test_recipe_searches_on_ray_match_in_process(cluster, world, tmp_path, search, workers):
    config = recipe_config(world, **search)
    run(config, tmp_path / "here")
    run(on_ray(config, workers=workers), tmp_path / "ray")
    assert decisions(tmp_path / "ray") == decisions(tmp_path / "here")
    assert generations(tmp_path / "ray") == generations(tmp_path / "here")
    assert model_bytes(tmp_path / "ray") == model_bytes(tmp_path / "here")


def test_a_worker_killed_mid_candidate_is_restarted_and_the_run_ends_the_same(
    cluster, world, evolver_here, tmp_path, monkeypatch
):
    marks = tmp_path / "marks"
    marks.mkdir()
    killed = ["g001/s02/offspring", "g002/s00/offspring"]
    monkeypatch.setenv(VARIABLE, json.dumps({"marks": str(marks), "exit": killed}))
    out = tmp_path / "ray"
    run(on_ray(evolver_config(world)), out)
    assert sorted(p.name for p in marks.iterdir()) == sorted(f"exit-{s.replace('/', '_')}" for s in killed)
    assert decisions(out) == decisions(evolver_here)
    assert model_bytes(out) == model_bytes(evolver_here)


def test_a_candidate_that_raises_or_hangs_is_recorded_failed_and_the_run_goes_on(
    cluster, world, tmp_path, monkeypatch
):
    monkeypatch.setenv(VARIABLE, json.dumps({"raise": ["g001/s01/offspring"], "hang": ["g002/s03/offspring"]}))
    out = tmp_path / "ray"
    run(on_ray(evolver_config(world), timeout_s=20), out)
    rows = {c.step: c for c in Ledger(out).candidates("offspring")}
    assert len(rows) == 8
    raised, hung = rows["g001/s01/offspring"], rows["g002/s03/offspring"]
    assert (str(raised.status), raised.fitness) == ("failed", None)
    assert raised.note == "failed: RuntimeError: injected fault in g001/s01/offspring"
    assert (str(hung.status), hung.note) == ("failed", "failed: over timeout_s (20 s)")
    others = [c for s, c in rows.items() if s not in ("g001/s01/offspring", "g002/s03/offspring")]
    assert all(str(c.status) in ("accepted", "rejected") for c in others)
    # Failed counts as rejected: the parent keeps its slot.
    assert Ledger(out).generations()[1]["members"][1] == "m1"
    assert (out / "model/model.safetensors").is_file()


def test_driver_killed_and_resumed_ends_with_the_uninterrupted_model(
    cluster, world, evolver_here, tmp_path
):
    config = tmp_path / "run.yml"
    config.write_text(yaml.safe_dump(on_ray(evolver_config(world), address=cluster)))
    run_dir = tmp_path / "killed"
    env = {**os.environ, VARIABLE: json.dumps({"delay": 0.5})}
    proc = subprocess.Popen([CLI, "evolve", str(config), "--out", str(run_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_offspring(proc, run_dir, 5)  # mid generation 2, with candidates of it in flight
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "model").exists()
    done = subprocess.run([CLI, "evolve", str(config), "--out", str(run_dir), "--resume"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert decisions(run_dir) == decisions(evolver_here)
    assert model_bytes(run_dir) == model_bytes(evolver_here)


def test_a_run_dir_the_workers_cannot_read_is_refused_at_start(cluster, world, tmp_path, monkeypatch):
    if os.getuid() != 0:
        pytest.skip("the workers drop to another uid, which only root can")
    # The kernel refuses the workers (uid nobody) the driver's run dir under 0700 tmp dirs.
    monkeypatch.setenv(VARIABLE, json.dumps({"uid": 65534}))
    out = tmp_path / "ray"
    with pytest.raises(UserError) as refused:
        run(on_ray(evolver_config(world), workers=1), out)
    message = str(refused.value)
    assert "Ray worker 0 cannot use the run dir or a model (PermissionError" in message
    assert "must be on storage every worker sees" in message and "\n" not in message
    assert not out.exists()  # refused before anything of the run was written


def refused(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "run.yml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(main, ["evolve", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()
    return result.output.strip()


@pytest.mark.parametrize(
    "executor, message",
    [
        ({"kind": "dask"}, "executor.kind: Input should be 'in_process' or 'ray'"),
        ({"kind": "ray", "workers": -1}, "executor.workers: Input should be greater than or equal to 1"),
        ({"kind": "ray", "address": "nowhere"}, "address must be auto, host:port or ray://host:port"),
        ({"kind": "ray", "address": "127.0.0.1:1"}, "executor.address 127.0.0.1:1: no Ray cluster answers there"),
    ],
)
def test_bad_executor_settings_are_one_line_errors(world, tmp_path, executor, message):
    assert message in refused(tmp_path, {**evolver_config(world), "executor": executor})


def test_gpus_asked_for_where_the_cluster_has_none(cluster, world, tmp_path):
    executor = {"kind": "ray", "gpus_per_worker": 0.5}
    assert "executor.gpus_per_worker is 0.5, but the Ray cluster has no GPU" in refused(
        tmp_path, {**evolver_config(world), "executor": executor}
    )


def test_more_cpus_than_the_cluster_has(cluster, world, tmp_path):
    executor = {"kind": "ray", "workers": 3, "cpus_per_worker": 1}
    assert "executor: 3 workers at 1 cpus_per_worker need 3 CPUs; the Ray cluster has 2" in refused(
        tmp_path, {**evolver_config(world), "executor": executor}
    )
