"""Runs killed in their first moments, what killed runs leave behind, and run
dirs that cannot be read: each resumes or is refused in one line, and nothing
the user has is changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mergekit_evolver.cli import main
from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import LEDGER_FILE, Ledger
from mergekit_evolver.ledger import store as ledger_store
from mergekit_evolver.run import evolve
from toy_world import run_config


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only


def tiny(world) -> dict:
    config = run_config(world, de__generations=1)
    config["report"] = {"tasks": [], "baselines": []}
    return config


def run(config: dict, out: Path, **kw) -> None:
    evolve(EvolveConfig.model_validate(config), out, log=lambda _: None, **kw)


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    run(tiny(world), out)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    return result.exit_code, lines


def test_a_run_killed_before_its_ledger_was_whole_resumes_to_the_same_model(world, finished, tmp_path, monkeypatch):
    out = tmp_path / "killed"

    def killed(*args):
        raise KeyboardInterrupt  # the kill lands between writing the ledger and renaming it

    monkeypatch.setattr(ledger_store.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny(world), out)
    monkeypatch.undo()
    assert not (out / LEDGER_FILE).exists() and (out / (LEDGER_FILE + ".new")).exists()
    run(tiny(world), out, resume=True)
    model = "model/model.safetensors"
    assert (out / model).read_bytes() == (finished / model).read_bytes()


def test_a_run_dir_whose_run_never_started_is_used_again_without_resume(world, finished, tmp_path):
    out = tmp_path / "debris"
    (out / "scratch").mkdir(parents=True)
    (out / "run.yml").write_text("seed: 99\n")  # an earlier set-up of another config, killed
    run(tiny(world), out)
    assert yaml.safe_load((out / "run.yml").read_text())["seed"] == tiny(world)["seed"]
    assert (out / "model/model.safetensors").read_bytes() == (finished / "model/model.safetensors").read_bytes()


def test_checking_a_run_dir_writes_nothing_into_it(world, finished, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    before = snapshot(copy)
    changed = tiny(world) | {"seed": 11}
    path = tmp_path / "other.yml"
    path.write_text(yaml.safe_dump(changed))
    code, lines = cli("evolve", str(path), "--out", str(copy), "--resume")
    assert code == 2 and len(lines) == 1 and "holds another run" in lines[0]
    assert snapshot(copy) == before


def test_a_resume_removes_what_a_killed_run_left_and_keeps_every_member(world, finished, tmp_path):
    out = tmp_path / "leftovers"
    shutil.copytree(finished, out)
    population = out / "population"
    members = sorted(p.name for p in population.iterdir())
    (population / ".g002_s03.x1y2z3").mkdir(parents=True)  # a write cut short
    (population / ".g002_s03.x1y2z3" / "model.safetensors").write_bytes(b"half")
    (population / "g009_s09").mkdir()  # written, but its row was never committed
    logs: list[str] = []
    evolve(EvolveConfig.model_validate(tiny(world)), out, resume=True, log=logs.append)
    assert sorted(p.name for p in population.iterdir()) == members
    assert sum("left by a killed run" in line for line in logs) == 2
    assert (out / "model/model.safetensors").read_bytes() == (finished / "model/model.safetensors").read_bytes()


def test_a_member_with_nan_weights_is_refused_naming_it(world, tmp_path):
    bad = tmp_path / "nan_model"
    shutil.copytree(world.models[1], bad)
    weights = load_file(str(bad / "model.safetensors"))
    name = sorted(weights)[3]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = tiny(world)
    config["population"]["models"][1] = str(bad)
    path = tmp_path / "nan.yml"
    path.write_text(yaml.safe_dump(config))
    code, lines = cli("evolve", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1
    assert str(bad) in lines[0] and name in lines[0] and "NaN or Inf" in lines[0]
    assert not (tmp_path / "out").exists()  # refused at the door


def test_a_recipe_member_that_merges_to_nan_is_refused_naming_it(world, tmp_path):
    config = tiny(world)
    config["population"]["recipes"] = {"zero": {"merge_method": "linear", "parameters": {"weight": 0.0}}}
    path = tmp_path / "zero.yml"
    path.write_text(yaml.safe_dump(config))
    code, lines = cli("evolve", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and len(lines) == 1  # linear with weights 0 divides 0 by 0
    assert str(tmp_path / "out" / "population" / "recipe_zero") in lines[0] and "NaN or Inf" in lines[0]
    assert not any(c.step == "init/recipe_zero" for c in Ledger(tmp_path / "out").candidates())


@pytest.mark.parametrize("command", ["report", "resume"])
def test_a_corrupt_ledger_is_one_line_and_left_as_it_is(world, tmp_path, command):
    out = tmp_path / "corrupt"
    out.mkdir()
    (out / LEDGER_FILE).write_bytes(b"this is not sqlite " * 50)
    (out / "run.yml").write_text(yaml.safe_dump(tiny(world)))
    before = snapshot(out)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(tiny(world)))
    args = ["report", str(out)] if command == "report" else ["evolve", str(path), "--out", str(out), "--resume"]
    code, lines = cli(*args)
    assert code == 2 and len(lines) == 1
    assert str(out / LEDGER_FILE) in lines[0] and "corrupt" in lines[0]
    assert snapshot(out) == before
