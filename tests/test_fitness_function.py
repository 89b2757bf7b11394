"""fitness.function: a user's callable computes the fitness from the per-task
scores. Checked at the door (form, import, attribute, callable), given the
documented arguments, followed by selection, and held to returning a number."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_evolver.cli import main
from mergekit_evolver.config import EvolveConfig, TaskSpec
from mergekit_evolver.ledger import Ledger, Role, Status
from mergekit_evolver.run import evolve
from toy_world import run_config

FUNCTIONS = '''
import math

CALLS = []
not_callable = 0.5


def worse(scores, tasks):
    """Minus the weighted score: the Evolver is to prefer worse models."""
    CALLS.append((scores, tasks))
    total = sum(t.weight * scores[t.name][t.metric] for t in tasks)
    return -total / sum(t.weight for t in tasks)


def vandal(scores, tasks):
    scores.clear()
    return 0.0


def text(scores, tasks):
    return "high"


def nan(scores, tasks):
    return math.nan


def boom(scores, tasks):
    raise KeyError("no_such_task")
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """A fresh module of fitness functions on sys.path; its name is new for
    each test, so no test sees another's import."""
    name = f"fitness_fns_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "fns"
    folder.mkdir()
    (folder / f"{name}.py").write_text(FUNCTIONS)
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


def tiny(world, function, **overrides) -> dict:
    overrides = {"de__generations": 1, "report": {"tasks": [], "baselines": []}, **overrides}
    config = run_config(world, **overrides)
    config["fitness"]["function"] = function
    return config


def cli(config: dict, tmp_path: Path):
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(main, ["evolve", str(path), "--out", str(tmp_path / "out")])


# -- at the door ----------------------------------------------------------------
@pytest.mark.parametrize(
    "function, message",
    [
        ("nocolon", "'nocolon' is not of the form module:callable"),
        ("{module}:", "'{module}:' is not of the form module:callable"),
        ("missing_module_d41d8:f",
         "cannot import module 'missing_module_d41d8': ModuleNotFoundError: No module named 'missing_module_d41d8'"),
        ("{module}:missing", "module '{module}' has no attribute 'missing'"),
        ("{module}:not_callable", "'{module}:not_callable' is not callable (it is a float)"),
    ],
)
def test_a_bad_function_is_one_line_exit_2_and_no_run_dir(shared_world, tmp_path, module, function, message):
    result = cli(tiny(shared_world, function.format(module=module)), tmp_path)
    assert result.exit_code == 2
    assert result.output.strip() == f"mergekit-evolver: error: fitness.function: {message.format(module=module)}"
    assert not (tmp_path / "out").exists()


def test_a_module_that_fails_as_it_imports_is_named(shared_world, tmp_path, monkeypatch):
    folder = tmp_path / "fns"
    folder.mkdir()
    name = f"broken_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text("1 / 0\n")
    monkeypatch.syspath_prepend(str(folder))
    result = cli(tiny(shared_world, f"{name}:f"), tmp_path)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"mergekit-evolver: error: fitness.function: cannot import module {name!r}: "
        "ZeroDivisionError: division by zero"
    )
    assert not (tmp_path / "out").exists()


def test_the_function_is_part_of_the_runs_identity(shared_world, module):
    plain, worse, nan = (
        EvolveConfig.model_validate(tiny(shared_world, function))
        for function in (None, f"{module}:worse", f"{module}:nan")
    )
    assert len({plain.digest(), worse.digest(), nan.digest()}) == 3
    # Without a function a config digests as it did before the field (the
    # digest leaves settings at their defaults out).
    assert "function" not in plain.model_dump(exclude_defaults=True)["fitness"]
    assert worse.model_dump()["fitness"]["function"] == f"{module}:worse"


# -- in a run -------------------------------------------------------------------
def test_selection_follows_the_function(shared_world, tmp_path, module):
    config = tiny(shared_world, f"{module}:worse", report={"tasks": ["toy_test"], "baselines": []})
    config["fitness"]["tasks"] = [{"name": "toy_dev", "metric": "acc,none"}]  # the function sees "acc"
    out = tmp_path / "run"
    table = evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
    ledger = Ledger(out)
    rows = ledger.candidates()
    # Every dev fitness in the ledger is the function's: minus the accuracy.
    for row in rows:
        if row.fitness is not None:
            assert row.fitness == -row.dev["toy_dev"]["acc"]
    members = {int(r.step.removeprefix("init/m")): r for r in rows if r.step.startswith("init/m")}
    offspring = [r for r in rows if r.role == Role.OFFSPRING]
    assert len(members) == 4 and len(offspring) == 4
    for child in offspring:
        worse_than_target = child.dev["toy_dev"]["acc"] < members[child.slot].dev["toy_dev"]["acc"]
        assert (child.status == Status.ACCEPTED) == worse_than_target, child.step
    assert any(c.status == Status.ACCEPTED for c in offspring)
    assert any(c.status == Status.REJECTED for c in offspring)
    # The output is the member the function ranks best: the least accurate one.
    (final,) = [r for r in rows if r.step == "report/evolved"]
    population = [members[i] for i in range(4)]
    for child in offspring:
        if child.status == Status.ACCEPTED:
            population[child.slot] = child
    assert final.dev["toy_dev"]["acc"] == min(m.dev["toy_dev"]["acc"] for m in population)
    assert f"{-final.dev['toy_dev']['acc']:.4f}" in table

    # What the function was given: the ledger's scores and the fitness tasks,
    # their direction filled in; never the report's held-out tasks.
    calls = sys.modules[module].CALLS
    assert calls and all(set(scores) == {"toy_dev"} for scores, _ in calls)
    assert all(tasks == [TaskSpec(name="toy_dev", higher_is_better=True)] for _, tasks in calls)
    dev_rows = [r.dev for r in rows if r.dev]
    assert all(scores in dev_rows for scores, _ in calls)
    assert final.test["toy_test"]["acc"] is not None


def test_what_the_function_does_to_its_arguments_stays_out_of_the_ledger(shared_world, tmp_path, module):
    out = tmp_path / "run"
    evolve(EvolveConfig.model_validate(tiny(shared_world, f"{module}:vandal")), out, log=lambda _: None)
    rows = Ledger(out).candidates()
    assert rows and all(set(r.dev) == {"toy_dev"} for r in rows if r.fitness is not None)
    assert {r.fitness for r in rows if r.fitness is not None} == {0.0}


@pytest.mark.parametrize(
    "name, message",
    [
        ("text", "returned 'high' (str); it must return a float that is not NaN"),
        ("nan", "returned nan (float); it must return a float that is not NaN"),
        ("boom", "raised KeyError: 'no_such_task'"),
    ],
)
def test_a_bad_return_is_one_line_naming_the_function(shared_world, tmp_path, module, name, message):
    result = cli(tiny(shared_world, f"{module}:{name}"), tmp_path)
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"mergekit-evolver: error: fitness.function {module}:{name} {message}"
    assert "Traceback" not in result.output
