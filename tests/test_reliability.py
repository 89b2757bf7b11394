"""Reliability: pickled weights are never loaded, broken files are named in
one line, mergekit-evolve typos are refused, odd paths survive recipes, and
plain mergekit sees the plugin's methods."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from de_run import write_config
from tiny_models import load_tensors, make_model
from toy_world import ToyWorld, reverse_items, run_config, save_model, write_task

VENV_BIN = Path(sys.executable).parent
PICKLE_MESSAGE = "no safetensors weights (found pytorch_model.bin); convert it to safetensors first"


def cli(*args: str):
    from mergekit_evolver.cli import main

    return CliRunner().invoke(main, list(args))


def one_error_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("mergekit-evolver: error: ")
    return lines[0]


class _Boom:
    """Unpickling this runs os.mkdir(marker): proof that a loader ran the pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reliability")
    m0 = save_model(root / "m0", seed=1)
    m1 = save_model(root / "m1", seed=2)
    # A complete HF dir (config, tokenizer) whose weights are a hostile pickle.
    pk = root / "pickled"
    shutil.copytree(m0, pk)
    (pk / "model.safetensors").unlink()
    marker = root / "UNPICKLED"
    (pk / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Boom(marker)}))
    tasks = root / "tasks"
    tasks.mkdir()
    write_task(tasks, "toy_dev", reverse_items(1, 6))
    write_task(tasks, "toy_test", reverse_items(2, 6))
    return {"root": root, "m0": m0, "m1": m1, "pickled": pk, "marker": marker, "tasks": tasks}


# ---------------------------------------------------------------- 1. never unpickle

# Runs CLI commands in a fresh interpreter with an audit hook that records
# every open of a .bin file and every global a pickle looks up.
_PROBE = r"""
import json, sys
seen = []
def hook(event, args):
    if event == "open" and args and str(args[0]).endswith(".bin"):
        seen.append(str(args[0]))
    elif event == "pickle.find_class":
        seen.append("pickle:" + ".".join(map(str, args)))
sys.addaudithook(hook)
from click.testing import CliRunner
from mergekit_evolver.cli import main
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    start = len(seen)
    r = CliRunner().invoke(main, argv)
    results[name] = {"exit_code": r.exit_code, "output": r.output, "seen": seen[start:]}
print("PROBE:" + json.dumps(results))
"""


def test_pickled_weights_are_refused_unopened_by_every_command(world, tmp_path):
    pk, m0, m1 = (str(world[k]) for k in ("pickled", "m0", "m1"))
    merge = tmp_path / "merge.yml"
    merge.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": m0, "parameters": {"weight": 0.5}}, {"model": pk, "parameters": {"weight": 0.5}}],
    }))
    data = tmp_path / "data.txt"
    data.write_text("rev:abcd=dcba\nrev:efgh=hgfe\n")
    run = tmp_path / "run.yml"
    toy = ToyWorld(models=[Path(m0), Path(pk)], base=Path(m1), include_path=world["tasks"])
    run.write_text(yaml.safe_dump(run_config(toy)))
    commands = {
        "yaml": ["yaml", str(merge), str(tmp_path / "out_yaml"), "--no-copy-tokenizer", "--quiet"],
        "yaml_lazy": ["yaml", str(merge), str(tmp_path / "out_lazy"), "--lazy-unpickle", "--quiet"],
        "stats": ["stats", pk, "--data", str(data), "--out", str(tmp_path / "out_stats"), "--device", "cpu"],
        "kinship": ["kinship", m0, pk, "--base", m1],
        "kinship_base": ["kinship", m0, m1, "--base", pk],
        "evolve": ["evolve", str(run), "--out", str(tmp_path / "run")],
    }
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(commands)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("PROBE:"))[6:])
    for name, result in results.items():
        lines = result["output"].strip().splitlines()
        assert result["exit_code"] == 2, (name, result["output"][-2000:])
        assert len(lines) == 1, (name, result["output"][-2000:])
        assert f"{pk}: {PICKLE_MESSAGE}" in lines[0], (name, lines[0])
        assert result["seen"] == [], (name, result["seen"])
    assert not world["marker"].exists()
    for out in ("out_yaml", "out_lazy", "out_stats", "run"):
        assert not (tmp_path / out).exists(), out


def test_safetensors_beside_a_pickle_is_accepted(world, tmp_path):
    from mergekit_evolver.population.store import require_safetensors

    both = tmp_path / "both"
    shutil.copytree(world["m0"], both)
    shutil.copy(world["pickled"] / "pytorch_model.bin", both / "pytorch_model.bin")
    require_safetensors(both)  # mergekit and transformers read model.safetensors first


def test_an_index_naming_pickled_shards_is_refused(world, tmp_path):
    from mergekit_evolver.errors import UserError
    from mergekit_evolver.population.store import require_safetensors

    sharded = tmp_path / "sharded"
    shutil.copytree(world["pickled"], sharded)
    (sharded / "pytorch_model.bin").rename(sharded / "pytorch_model-00001-of-00001.bin")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "pytorch_model-00001-of-00001.bin"}}
    ))
    with pytest.raises(UserError, match=r"sharded: .*pytorch_model-00001-of-00001\.bin.*never loaded"):
        require_safetensors(sharded)


def test_mergekit_index_reader_refuses_pickles_in_our_process(world):
    """Hub models are downloaded inside mergekit; its index reader is guarded
    too, so a pickle-only snapshot is refused before torch.load."""
    import mergekit_evolver.merging.merge  # noqa: F401  (installs the guard)
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    from mergekit_evolver.errors import UserError

    with pytest.raises(UserError, match="never loaded"):
        ShardedTensorIndex.from_disk(str(world["pickled"]))
    assert not world["marker"].exists()


def test_recipes_over_in_memory_members_still_parse_and_merge(world, tmp_path):
    """A search's recipes name MemorySlot dirs, which hold config.json only:
    the weights check belongs to merges from disk, not to parsing."""
    from mergekit.options import MergeOptions

    from mergekit_evolver.merging.merge import merge_in_memory
    from mergekit_evolver.recipes.parse import parse_merge_config
    from mergekit_evolver.population.store import MemorySlot

    slot = MemorySlot(tmp_path, like=world["m0"])
    recipe = parse_merge_config({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(slot.path), "parameters": {"weight": 0.5}},
                   {"model": str(world["m1"]), "parameters": {"weight": 0.5}}],
    })
    slot.serve(load_tensors(world["m0"]))
    try:
        merged = merge_in_memory(recipe, MergeOptions(device="cpu"))
    finally:
        slot.clear()
    assert merged.keys() == load_tensors(world["m1"]).keys()


# ---------------------------------------------------------------- 2. truncated safetensors


@pytest.mark.parametrize("keep", [5, 40, -64], ids=["size-cut", "header-cut", "data-cut"])
def test_truncated_safetensors_is_one_line_naming_the_file(world, tmp_path, keep):
    broken = tmp_path / "broken"
    shutil.copytree(world["m1"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:keep])
    expected = f"{weights}: not a valid safetensors file (truncated or corrupt)"

    line = one_error_line(cli("kinship", str(world["m0"]), str(broken), "--base", str(world["m1"])))
    assert expected in line

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(world["m0"]), "parameters": {"weight": 0.5}},
                   {"model": str(broken), "parameters": {"weight": 0.5}}],
    }))
    line = one_error_line(cli("yaml", str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"))
    assert expected in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 3. broken config.json


def test_read_json_names_the_file_line_and_column(tmp_path):
    from mergekit_evolver.errors import UserError
    from mergekit_evolver.population.store import read_json

    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(UserError) as error:
        read_json(path)
    assert str(error.value) == f"{path}: not valid JSON (line 2 column 7: Expecting value)"


def test_broken_config_json_is_named_by_evolve_and_yaml(world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(world["m1"], broken)
    (broken / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 32,,\n}')
    expected = f"{broken / 'config.json'}: not valid JSON (line 2 column 21"

    run = tmp_path / "run.yml"
    toy = ToyWorld(models=[world["m0"], broken], base=world["m1"], include_path=world["tasks"])
    run.write_text(yaml.safe_dump(run_config(toy)))
    assert expected in one_error_line(cli("evolve", str(run), "--out", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()

    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(world["m0"]), "parameters": {"weight": 0.5}},
                   {"model": str(broken), "parameters": {"weight": 0.5}}],
    }))
    line = one_error_line(cli("yaml", str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"))
    assert expected in line


# ---------------------------------------------------------------- 4. task YAML that does not parse


def test_unknown_task_names_the_task_file_that_does_not_parse(world, tmp_path):
    from mergekit_evolver.scoring import lmeval

    tasks = tmp_path / "tasks"
    shutil.copytree(world["tasks"], tasks)
    # Valid for lm-eval (its loader knows !function); must not be reported.
    spec = yaml.safe_load((tasks / "toy_dev.yaml").read_text())
    spec["task"] = "toy_fn"
    (tasks / "toy_fn.yaml").write_text(yaml.safe_dump(spec) + "process_docs: !function utils.keep\n")
    (tasks / "utils.py").write_text("def keep(ds):\n    return ds\n")
    (tasks / "sub").mkdir()
    bad = tasks / "sub" / "toy_bad.yaml"
    bad.write_text("task: toy_bad\ndataset_path: json\n  output_type: multiple_choice\n")

    with pytest.raises(ValueError) as error:
        lmeval.resolve_task_manager(["toy_dev", "toy_bad"], tasks, include_defaults=False)
    message = str(error.value)
    assert message.startswith("unknown lm-eval task(s) ['toy_bad']")
    assert f"{bad}: malformed YAML" in message
    assert "line 3" in message
    assert "toy_fn.yaml" not in message
    assert "\n" not in message

    # Nothing to report when every file parses: the message stays as it was.
    bad.unlink()
    lmeval.forget_task_manager(tasks)
    with pytest.raises(ValueError) as error:
        lmeval.resolve_task_manager(["toy_bad"], tasks, include_defaults=False)
    assert "malformed" not in str(error.value)


# ---------------------------------------------------------------- 5. mergekit-evolve unknown keys


def _evolve_config(world, **extra) -> dict:
    config = {
        "genome": {"models": [str(world["m0"]), str(world["m1"])], "merge_method": "linear", "layer_granularity": 1},
        "tasks": [{"name": "toy_dev"}],
        "limit": 4,
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    return config


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"genome__layer_granulrity": 1}, "unknown key(s) in genome of {path}: layer_granulrity (known: models, merge_method, "),
        ({"limt": 5}, "unknown key(s) in {path}: limt (known: genome, tasks, limit, "),
        ({"tasks": [{"name": "toy_dev", "wieght": 2}]}, "unknown key(s) in tasks[0] of {path}: wieght (known: name, weight, metric)"),
    ],
    ids=["genome", "top-level", "task"],
)
def test_mergekit_evolve_config_refuses_unknown_keys(world, tmp_path, extra, message):
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(_evolve_config(world, **extra)))
    run = cli("evolve", str(path), "--out", str(tmp_path / "run"), "--task-search-path", str(world["tasks"]))
    assert message.format(path=path) in one_error_line(run)
    assert not (tmp_path / "run").exists()


def test_known_mergekit_evolve_config_still_maps(world):
    from mergekit_evolver.recipes.evolve_compat import from_mergekit_evolve

    mapped = from_mergekit_evolve(_evolve_config(world), where="c.yml")
    assert mapped["search"]["layer_granularity"] == 1
    assert mapped["fitness"]["limit"] == 4


# ---------------------------------------------------------------- 6. paths with spaces


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("odd") / "my models"
    return [make_model(root / "ünïcode x", seed=1), make_model(root / "plain", seed=2),
            make_model(root / "a+b@c", seed=3)]


def test_recipe_with_spaces_and_unicode_round_trips(odd_models):
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from mergekit_evolver.merging.merge import merge_in_memory
    from mergekit_evolver.recipes.parse import recipe_yaml

    odd, plain, symbols = (str(p) for p in odd_models)
    config = MergeConfiguration.model_validate({
        "merge_method": "task_arithmetic", "dtype": "float32",
        "base_model": odd,
        "models": [
            {"model": plain, "parameters": {"weight": [0.2, 0.6]}},
            # '+' and '@' mean LoRA and revision in mergekit's string form.
            {"model": {"model": {"path": symbols}}, "parameters": {"weight": 0.3}},
        ],
    })
    text = recipe_yaml(config)
    again = MergeConfiguration.model_validate(yaml.safe_load(text))
    assert again == config
    assert again.models[1].model.model.path == symbols and again.models[1].model.lora is None
    options = MergeOptions(device="cpu")
    first, second = merge_in_memory(config, options), merge_in_memory(again, options)
    assert first.keys() == second.keys() and len(first) > 0
    assert all((first[k] == second[k]).all() for k in first)


def test_recipe_yaml_text_is_unchanged_for_ordinary_paths(population):
    from mergekit.config import MergeConfiguration

    from mergekit_evolver.recipes.parse import recipe_yaml

    config = MergeConfiguration.model_validate({
        "merge_method": "ties", "dtype": "float32", "base_model": str(population[0]),
        "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": [0.1, 0.9]}} for p in population[1:3]],
    })
    assert recipe_yaml(config) == config.to_yaml()


def test_yaml_command_merges_models_in_odd_paths(odd_models, tmp_path):
    odd, plain, _ = (str(p) for p in odd_models)
    config = tmp_path / "merge config.yml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": odd, "parameters": {"weight": 0.5}}, {"model": plain, "parameters": {"weight": 0.5}}],
    }, allow_unicode=True), encoding="utf-8")
    out = tmp_path / "out dir ü"
    result = cli("yaml", str(config), str(out), "--no-copy-tokenizer", "--quiet")
    assert result.exit_code == 0, result.output
    merged, a, b = load_tensors(out), load_tensors(Path(odd)), load_tensors(Path(plain))
    name = "model.layers.0.mlp.up_proj.weight"
    assert (merged[name] - (a[name] + b[name]) / 2).abs().max() < 1e-6


# ---------------------------------------------------------------- 8. plain mergekit sees our methods


def _site_packages() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def test_autoregister_pth_is_installed_and_imports_nothing_heavy():
    assert (_site_packages() / "mergekit_evolver_autoregister.pth").is_file()
    probe = "import sys; print(sorted(m for m in ('mergekit', 'torch', 'mergekit_evolver') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "order",
    [
        "import mergekit.merge_methods as m; names = {x.spec.name for x in m.registered_methods()}",
        "import mergekit_evolver, mergekit.merge_methods as m; names = {x.spec.name for x in m.registered_methods()}",
        "from mergekit.merge_methods.registry import get; names = {get('de_rand1').spec.name, get('regmean').spec.name, get('fisher').spec.name}",
    ],
    ids=["mergekit-first", "plugin-first", "registry-get"],
)
def test_autoregister_in_any_import_order(order):
    code = order + "; print(sorted({'de_rand1', 'regmean', 'fisher'} & names))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['de_rand1', 'fisher', 'regmean']"


def test_plain_mergekit_yaml_runs_de_rand1_unless_opted_out(population, tmp_path):
    config = write_config(tmp_path / "c.yml", "de_rand1", population[0], population[1:4], seed=1, F=0.5, CR=0.9)
    command = [str(VENV_BIN / "mergekit-yaml"), str(config), str(tmp_path / "out"), "--no-copy-tokenizer", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "MERGEKIT_EVOLVER_NO_AUTOREGISTER"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = load_tensors(tmp_path / "out")
    assert merged.keys() == load_tensors(population[0]).keys()

    env["MERGEKIT_EVOLVER_NO_AUTOREGISTER"] = "1"
    command[2] = str(tmp_path / "out2")
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode != 0
    assert "de_rand1" in refused.stderr
    assert not list((tmp_path / "out2").glob("*.safetensors"))
