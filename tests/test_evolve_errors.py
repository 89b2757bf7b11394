"""Bad input to `evolve`: one line naming it, exit 2, the run dir untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolver.cli import main
from toy_world import run_config, save_model


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only: runs write under their own tmp dirs


def snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def evolve(tmp_path: Path, config, *extra: str, run_dir: Path | None = None):
    path = tmp_path / "run.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    run_dir = run_dir or tmp_path / "out"
    before = snapshot(run_dir)
    result = CliRunner().invoke(main, ["evolve", str(path), "--out", str(run_dir), *extra])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert snapshot(run_dir) == before
    return result.output


def with_(config: dict, section: str, **values) -> dict:
    config[section] = {**config[section], **values}
    return config


CASES = {
    "malformed yaml": (lambda w: "population: [\n", "malformed YAML"),
    "not a mapping": (lambda w: "- a\n- b\n", "a run config must be a YAML mapping"),
    "unknown top key": (lambda w: {**run_config(w), "generations": 3}, "generations: Extra inputs are not permitted"),
    "unknown nested key": (lambda w: with_(run_config(w), "de", Fx=0.5), "de.Fx: Extra inputs are not permitted"),
    "wrong type": (lambda w: with_(run_config(w), "de", generations="many"), "de.generations: Input should be a valid integer"),
    "F out of range": (lambda w: with_(run_config(w), "de", F=2.5), "de.F: Input should be less than or equal to 2"),
    "CR out of range": (lambda w: with_(run_config(w), "de", CR=-0.1), "de.CR: Input should be greater than or equal to 0"),
    "unknown operator": (lambda w: with_(run_config(w), "de", operator="de_rand2"), "de.operator"),
    "population too small": (
        lambda w: with_(run_config(w), "de", operator="de_rand1") | {"population": {"models": [str(m) for m in w.models[:3]]}},
        "de.operator de_rand1 needs a population of at least 4",
    ),
    "task vectors without base": (
        lambda w: with_(run_config(w), "de", space="task_vectors") | {"population": {"models": [str(m) for m in w.models]}},
        "de.space task_vectors needs population.base_model",
    ),
    "missing model": (
        lambda w: with_(run_config(w), "population", models=[str(w.models[0]), "/no/such/model"]),
        "model path not found: /no/such/model",
    ),
    "unknown task": (lambda w: with_(run_config(w), "fitness", tasks=["toy_dev", "nope_task"]), "unknown lm-eval task(s) ['nope_task']"),
    "unknown report task": (lambda w: with_(run_config(w), "report", tasks=["nope_test"]), "unknown lm-eval task(s) ['nope_test']"),
    "unknown metric": (
        lambda w: with_(run_config(w), "fitness", tasks=[{"name": "toy_dev", "metric": "f1"}]),
        "task toy_dev has no metric 'f1' (it has: acc)",
    ),
    "missing include path": (lambda w: with_(run_config(w), "fitness", include_path="/no/tasks"), "include_path '/no/tasks' is not a directory"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config(world, tmp_path, case):
    make, message = CASES[case]
    assert message in evolve(tmp_path, make(world))
    assert not (tmp_path / "out").exists()


def test_models_with_different_shapes(world, tmp_path):
    wide = save_model(tmp_path / "wide", seed=5, hidden=48)
    config = with_(run_config(world), "population", models=[str(world.models[0]), str(wide)])
    message = evolve(tmp_path, config)
    assert "models differ in tensor shape:" in message and "[100, 48] in" in message


def test_models_with_different_architectures(world, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(world.models[1], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(cfg))
    config = with_(run_config(world), "population", models=[str(world.models[0]), str(other)])
    assert "models differ in architecture" in evolve(tmp_path, config)


def test_out_dir_with_another_run_is_refused_untouched(world, tmp_path):
    run_dir = tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "ledger.sqlite").write_bytes(b"")
    from mergekit_evolver.ledger import Ledger

    ledger = Ledger(run_dir)
    ledger.set_meta("config_digest", "someone-else")
    ledger.close()
    assert "holds another run" in evolve(tmp_path, run_config(world), run_dir=run_dir)
    assert "holds another run" in evolve(tmp_path, run_config(world), "--resume", run_dir=run_dir)


def test_non_empty_out_dir_without_a_run_is_refused(world, tmp_path):
    run_dir = tmp_path / "out"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    assert "is not empty and holds no run" in evolve(tmp_path, run_config(world), run_dir=run_dir)
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_resume_without_a_run(world, tmp_path):
    assert "nothing to resume" in evolve(tmp_path, run_config(world), "--resume")
