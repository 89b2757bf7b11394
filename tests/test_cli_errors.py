"""Bad input: one line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from de_run import run_yaml, write_config
from mergekit_evolver.cli import main

CLI = str(Path(sys.executable).parent / "mergekit-evolver")


def rand1(tmp_path, population, **params):
    params.setdefault("seed", 1)
    return write_config(tmp_path / "c.yml", "de_rand1", population[0], population[1:4], **params)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"F": 3.0}, "F must be in [0.0, 2.0]; got 3.0"),
        ({"F": -0.1}, "F must be in [0.0, 2.0]; got -0.1"),
        ({"CR": 1.5}, "CR must be in [0.0, 1.0]; got 1.5"),
        ({"CR": -0.2}, "CR must be in [0.0, 1.0]; got -0.2"),
        ({"density": 0.0, "sparsify": "dare"}, "density must be in (0.0, 1.0]; got 0.0"),
        ({"seed": -4}, "seed must be a non-negative integer; got -4"),
        ({"crossover": "uniform"}, "crossover must be one of binomial, exponential; got 'uniform'"),
        ({"granularity": "layer"}, "granularity must be one of element, row, tensor; got 'layer'"),
        ({"sparsify": "ties"}, "sparsify must be one of none, dare, magnitude; got 'ties'"),
        ({"seed": None}, "Missing required parameter seed"),
    ],
)
def test_bad_parameter_is_named_before_anything_is_written(tmp_path, population, params, message):
    if params.get("seed", 0) is None:
        params.pop("seed")
        config = write_config(tmp_path / "c.yml", "de_rand1", population[0], population[1:4])
    else:
        config = rand1(tmp_path, population, **params)
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "method, n_donors, message",
    [
        ("de_rand1", 2, "de_rand1 needs exactly 3 donor model(s) (r1, r2, r3) besides base_model; got 2"),
        ("de_best1", 4, "de_best1 needs exactly 3 donor model(s) (best, r1, r2) besides base_model; got 4"),
        ("de_current_to_rand1", 2, "de_current_to_rand1 needs exactly 1 donor model(s) (r) besides base_model; got 2"),
    ],
)
def test_wrong_number_of_donors(tmp_path, population, method, n_donors, message):
    config = write_config(
        tmp_path / "c.yml", method, population[0], population[1 : 1 + n_donors], seed=1
    )
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_missing_base_model_names_the_target(tmp_path, population):
    config = tmp_path / "c.yml"
    config.write_text(
        "merge_method: de_current_to_rand1\nparameters: {seed: 1}\nmodels:\n"
        + "".join(f"  - model: {p}\n" for p in population[:2])
    )
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert "de_current_to_rand1 needs base_model: it is the target individual x" in result.output


@pytest.mark.parametrize(
    "text, message",
    [
        ("merge_method: de_rand1\nmodels: [\n", "malformed YAML"),
        ("- just\n- a list\n", "a merge config must be a YAML mapping"),
        ("merge_method: de_rand1\nbogus_key: 1\nmodels: []\n", "bogus_key"),
        ("merge_method: de_rand1\nbase_model: ./no/such/model\nmodels:\n  - model: ./nope\n",
         "model path not found: ./n"),
        ("merge_method: no_such_method\nmodels:\n  - model: {m}\n", "no_such_method"),
    ],
)
def test_bad_config_files(tmp_path, population, text, message):
    config = tmp_path / "c.yml"
    config.write_text(text.format(m=population[0]))
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_config_file(tmp_path):
    result = run_yaml(tmp_path / "absent.yml", tmp_path / "out")
    assert result.exit_code == 2
    assert "absent.yml" in result.output


def test_console_script_exits_2_without_traceback(tmp_path, population):
    # A real process: the installed script's exit code and its two streams.
    config = rand1(tmp_path, population, CR=7)
    done = subprocess.run(
        [CLI, "yaml", str(config), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "Traceback" not in done.stdout
    assert done.stderr.strip().splitlines()[-1] == (
        "mergekit-evolver: error: CR must be in [0.0, 1.0]; got 7.0"
    )


def test_console_script_has_help():
    done = subprocess.run([CLI, "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "Usage:" in done.stdout


def test_every_subcommand_has_help():
    # In-process: a fresh interpreter per command only repeats the import.
    for command in ([], ["yaml"], ["evolve"], ["report"], ["kinship"], ["stats"], ["testbed"], ["demo"]):
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.stdout


@pytest.mark.parametrize(
    "n_refs, space, message",
    [
        (0, "task_vectors", "de_rand1 with space: task_vectors needs the reference base among its models, marked `reference: true`"),
        (1, "weights", "de_rand1: a model marked reference is only used with space: task_vectors"),
        (2, "task_vectors", "de_rand1: at most one model may be marked reference; got 2"),
    ],
)
def test_task_vector_space_needs_exactly_one_reference(tmp_path, population, n_refs, space, message):
    # Four non-base inputs fit de_rand1's count (3 donors + a reference), so
    # only the reference marking can be wrong here.
    donors, refs = population[1 : 5 - n_refs], population[5 - n_refs : 5]
    config = write_config(
        tmp_path / "c.yml", "de_rand1", population[0], donors, references=tuple(refs), seed=1, space=space
    )
    if n_refs == 0:
        config = write_config(tmp_path / "c.yml", "de_rand1", population[0], population[1:4], seed=1, space=space)
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--kind", "nope"], "Invalid value for '--kind'"),
        (["--width", "100"], "--width must be a multiple of 16, at least 16; got 100"),
        (["--layers", "0"], "--layers must be at least 1; got 0"),
        (["--kind", "fusion", "--width", "128"], "--width and --layers apply to the merge_friendly"),
    ],
)
def test_bad_testbed_options_are_one_line_and_build_nothing(tmp_path, args, message):
    out = tmp_path / "tb"
    result = CliRunner().invoke(main, ["testbed", str(out), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
