"""RegMean and Fisher merging through mergekit's real merge path: formulas,
orientation, the stats-location convention, and errors before any write."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions
from transformers import GPT2Config, GPT2LMHeadModel

from de_run import run_yaml
from mergekit_evolver.recipes import parse as parse_module
from mergekit_evolver.merging.merge import merge_in_memory
from mergekit_evolver.recipes.parse import parse_merge_config
from mergekit_evolver.methods.regmean import STATS_METHODS, regmean_merge
from mergekit_evolver.stats.store import StatsError, check_stats_recipe, group_stats, write_stats
from mergekit_evolver.stats.collect import collect_statistics
from tiny_models import load_tensors, make_model


def register() -> None:
    known = {m.spec.name for m in merge_methods.registered_methods()}
    for method in STATS_METHODS:
        if method.spec.name not in known:
            merge_methods.register(method)


register()


def random_grams(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A PSD Gram XᵀX/n for every 2-D weight except the embedding (out×in layout)."""
    g = torch.Generator().manual_seed(seed)
    grams = {}
    for name, w in tensors.items():
        if w.ndim == 2 and "embed" not in name:
            d = w.shape[1]
            x = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
            grams[name] = x.T @ x / (3 * d)
    return grams


def random_fisher(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Positive values with ~30% exact zeros, so the floor matters."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in tensors.items():
        f = torch.rand(w.shape, generator=g) * 1e-2
        out[name] = torch.where(torch.rand(w.shape, generator=g) < 0.3, 0.0, f)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three tiny models. m0, m1 keep stats in <model>/stats (the default);
    m2 is an 'offspring' without stats: its statistics live in another dir."""
    root = tmp_path_factory.mktemp("stats_world")
    models = [make_model(root / f"m{i}", seed=200 + i) for i in range(3)]
    tensors = [load_tensors(m) for m in models]
    grams = [random_grams(t, i) for i, t in enumerate(tensors)]
    fishers = [random_fisher(t, 10 + i) for i, t in enumerate(tensors)]
    dirs = [models[0] / "stats", models[1] / "stats", root / "original_of_m2" / "stats"]
    for model, d, gram, fisher in zip(models, dirs, grams, fishers):
        layouts = {n: "linear" for n in gram}
        write_stats(d, model=str(model), grams=gram, layouts=layouts, fisher=fisher, dtype="float64")
    return dict(root=root, models=models, tensors=tensors, grams=grams, fishers=fishers, dirs=dirs)


def recipe(method: str, models, params=None, per_model=None, **extra):
    per_model = per_model or [{} for _ in models]
    data = {
        "merge_method": method,
        "models": [
            {"model": str(m), **({"parameters": p} if p else {})} for m, p in zip(models, per_model)
        ],
        "parameters": params or {},
        "dtype": "float32",
        **extra,
    }
    return data


def merge(data) -> dict[str, torch.Tensor]:
    config = parse_merge_config(data)
    check_stats_recipe(config)
    return merge_in_memory(config, MergeOptions())


def assert_every_tensor_merged(out, world) -> None:
    # Guards the per-tensor loops below: over an empty merge they would check nothing.
    assert out, "the merge produced no tensors"
    assert set(out) == set(world["tensors"][0])


def with_m2_stats(world, weights=None):
    """Per-model parameters: m2 points at its original's stats (Evolver case)."""
    out = [{} if weights is None else {"weight": w} for w in (weights or [None] * 3)]
    out[2]["stats"] = str(world["dirs"][2])
    return out


def avg(ws, ts):
    return sum(w * t.double() for w, t in zip(ws, ts)) / sum(ws)


def closed_form(ws, ws_grams, alpha):
    """W* = ((Σ w G̃)^-1 Σ w G̃ Wᵀ)ᵀ, G̃ = αG + (1−α)diag(G): an explicit inverse,
    written apart from the method's solve."""
    weights, tensors, grams = zip(*ws_grams)
    tilde = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    total = sum(w * t for w, t in zip(weights, tilde))
    rhs = sum(w * t @ W.double().T for w, t, W in zip(weights, tilde, tensors))
    return (torch.linalg.inv(total) @ rhs).T


@pytest.mark.parametrize("alpha", [0.9, 0.3, 1.0])
def test_regmean_equals_closed_form_tensor_by_tensor(world, alpha):
    ws = [1.0, 2.0, 0.5]
    per = with_m2_stats(world, ws)
    out = merge(recipe("regmean", world["models"], {"alpha": alpha}, per))
    tensors, grams = world["tensors"], world["grams"]
    assert set(out) == set(tensors[0])
    n_regmean = 0
    for name in tensors[0]:
        ts = [t[name] for t in tensors]
        if name in grams[0]:
            expected = closed_form(ws, list(zip(ws, ts, [g[name] for g in grams])), alpha)
            n_regmean += 1
        else:
            expected = avg(ws, ts)
        assert out[name].dtype == torch.float32
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert n_regmean == 15  # 7 projections x 2 layers + lm_head


def test_identical_grams_reduce_to_plain_average(world):
    # Every model reads m0's statistics: the Gram factors cancel.
    shared = str(world["dirs"][0])
    out = merge(recipe("regmean", world["models"], {"alpha": 0.9}, [{"stats": shared}] * 3))
    assert_every_tensor_merged(out, world)
    for name in out:
        expected = avg([1, 1, 1], [t[name] for t in world["tensors"]])
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_alpha_zero_is_per_input_feature_weighted_average(world):
    ws = [1.0, 3.0, 2.0]
    per = with_m2_stats(world, ws)
    out = merge(recipe("regmean", world["models"], {"alpha": 0.0}, per))
    for name in world["grams"][0]:
        diags = [w * torch.diag(g[name]) for w, g in zip(ws, world["grams"])]  # per input feature
        num = sum(d * t[name].double() for d, t in zip(diags, world["tensors"]))  # scales columns
        expected = num / sum(diags)
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("floor", [1e-6, 1e-3])
def test_fisher_equals_formula(world, floor):
    ws = [2.0, 1.0, 1.0]
    per = with_m2_stats(world, ws)
    out = merge(recipe("fisher", world["models"], {"fisher_floor": floor}, per))
    assert_every_tensor_merged(out, world)
    for name in out:
        fs = [w * f[name].double().clamp_min(floor) for w, f in zip(ws, world["fishers"])]
        expected = sum(f * t[name].double() for f, t in zip(fs, world["tensors"])) / sum(fs)
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-7, msg=name)


def test_fisher_floor_zero_where_all_fishers_vanish_is_the_average(world, tmp_path):
    zeros = [{n: torch.zeros_like(t) for n, t in ts.items()} for ts in world["tensors"]]
    dirs = []
    for i, z in enumerate(zeros):
        dirs.append(write_stats(tmp_path / f"z{i}", model="x", fisher=z))
    out = merge(recipe("fisher", world["models"], {"fisher_floor": 0.0}, [{"stats": str(d)} for d in dirs]))
    assert_every_tensor_merged(out, world)
    for name in out:
        expected = avg([1, 1, 1], [t[name] for t in world["tensors"]])
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_features_no_input_reaches_take_the_weighted_average():
    g = torch.Generator().manual_seed(0)
    ws, tensors, grams = [1.0, 3.0], [], []
    for _ in ws:
        x = torch.randn(20, 6, generator=g, dtype=torch.float64)
        x[:, 2] = 0  # input feature 2 is never nonzero: row/column 2 of G is 0
        grams.append(x.T @ x / 20)
        tensors.append(torch.randn(4, 6, generator=g))
    out = regmean_merge(tensors, grams, ws, alpha=0.7).double()
    torch.testing.assert_close(out[:, 2], avg(ws, [t[:, 2] for t in tensors]))
    keep = [0, 1, 3, 4, 5]
    reduced = [(w, t[:, keep], gr[keep][:, keep]) for w, t, gr in zip(ws, tensors, grams)]
    torch.testing.assert_close(out[:, keep], closed_form(ws, reduced, 0.7))


def tiny_gpt2(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_conv1d_weights_are_not_transposed_even_when_square(tmp_path):
    """GPT-2 Conv1D stores in×out; attn.c_proj is square, so only the layout
    recorded at collection time can tell the orientation."""
    models, grams = [], []
    for i in range(2):
        path = tiny_gpt2(tmp_path / f"g{i}", seed=i)
        model = GPT2LMHeadModel.from_pretrained(path)
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 64, (4, 12), generator=g)
        collected = collect_statistics(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], ["gram"])
        assert set(collected.layouts.values()) == {"conv1d"}
        assert "transformer.h.0.attn.c_proj.weight" in collected.grams  # 16x16 weight
        write_stats(path / "stats", model=str(path), grams=collected.grams, layouts=collected.layouts)
        models.append(path)
        grams.append(collected.grams)
    out = merge(recipe("regmean", models, {"alpha": 0.5}))
    tensors = [load_tensors(m) for m in models]
    for name, gram0 in grams[0].items():
        tilde = [0.5 * g[name] + 0.5 * torch.diag(torch.diag(g[name])) for g in grams]
        expected = torch.linalg.inv(sum(tilde)) @ sum(t @ ts[name].double() for t, ts in zip(tilde, tensors))
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_yaml_cli_runs_regmean_with_explicit_stats(world, tmp_path):
    data = recipe("regmean", world["models"], {"alpha": 0.9}, with_m2_stats(world))
    config = tmp_path / "regmean.yml"
    config.write_text(yaml.safe_dump(data))
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    written = load_tensors(tmp_path / "out")
    direct = merge(data)
    for name, value in direct.items():
        assert torch.equal(written[name], value), name


# ---------------------------------------------------------------- errors


def expect_error(data, *fragments):
    # Validated as mergekit does, without parse_merge_config's door (which may
    # call check_stats_recipe itself once it is wired in).
    config = MergeConfiguration.model_validate(data)
    with pytest.raises(StatsError) as info:
        check_stats_recipe(config)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def test_missing_stats_names_the_model(world):
    # m2 has no stats of its own; without `stats:` its default dir is missing.
    m2 = str(world["models"][2])
    expect_error(recipe("regmean", world["models"]), f"model {m2}", "no statistics at", f"{m2}/stats")


def test_missing_kind_names_the_model(world, tmp_path):
    only_fisher = write_stats(tmp_path / "f", model="x", fisher=world["fishers"][0])
    per = with_m2_stats(world)
    per[1]["stats"] = str(only_fisher)
    expect_error(recipe("regmean", world["models"], per_model=per), f"model {world['models'][1]}", "have no gram")


def test_mismatched_gram_shape_names_model_and_tensor(world, tmp_path):
    grams = dict(world["grams"][1])
    name = "model.layers.1.mlp.down_proj.weight"  # 32x64: takes 64 inputs
    grams[name] = torch.eye(32, dtype=torch.float64)
    bad = write_stats(tmp_path / "bad", model="x", grams=grams, layouts={n: "linear" for n in grams})
    per = with_m2_stats(world)
    per[1]["stats"] = str(bad)
    expect_error(
        recipe("regmean", world["models"], per_model=per),
        f"model {world['models'][1]}", name, "32×32", "32×64",
    )


def test_mismatched_fisher_shape_names_model(world, tmp_path):
    fisher = dict(world["fishers"][0])
    fisher["model.norm.weight"] = torch.ones(7)
    bad = write_stats(tmp_path / "bad", model="x", fisher=fisher)
    per = with_m2_stats(world)
    per[0]["stats"] = str(bad)
    expect_error(recipe("fisher", world["models"], per_model=per), f"model {world['models'][0]}", "model.norm.weight")


def test_stats_of_another_architecture_are_refused(world, tmp_path):
    grams = {"model.layers.5.self_attn.q_proj.weight": torch.eye(32, dtype=torch.float64)}
    other = write_stats(tmp_path / "other", model="x", grams=grams, layouts={n: "linear" for n in grams})
    per = with_m2_stats(world)
    per[0]["stats"] = str(other)
    expect_error(recipe("regmean", world["models"], per_model=per), f"model {world['models'][0]}", "does not have")


def test_stats_covering_fewer_tensors_names_the_model(world, tmp_path):
    grams = dict(world["grams"][2])
    del grams["lm_head.weight"]
    fewer = write_stats(tmp_path / "fewer", model="x", grams=grams, layouts={n: "linear" for n in grams})
    per = [{}, {}, {"stats": str(fewer)}]
    expect_error(
        recipe("regmean", world["models"], per_model=per),
        f"model {world['models'][2]}", "lack gram for 1 tensor", "lm_head.weight",
    )


def test_base_model_is_refused(world):
    data = recipe("fisher", world["models"][:2], base_model=str(world["models"][2]))
    expect_error(data, "fisher takes no base_model")


REMOTE = "some-org/remote-model"
NO_DEFAULT = (
    f"regmean: model {REMOTE}: not a local directory, so its statistics have no default "
    "location; give them with the per-model parameter `stats: DIR`"
)


def test_a_model_that_is_not_a_local_dir_is_named_once(world):
    message = expect_error(recipe("regmean", [REMOTE, *world["models"][:2]]))
    assert message == NO_DEFAULT


def test_the_kernel_names_a_model_that_is_not_a_local_dir_once():
    entry = SimpleNamespace(id=ModelReference.parse(REMOTE), tensor=torch.zeros(4, 4))
    group = SimpleNamespace(metadata=SimpleNamespace(name="lm_head.weight"), entries=[entry])
    with pytest.raises(StatsError) as info:
        group_stats("regmean", "gram", group, None)
    assert str(info.value) == NO_DEFAULT


def test_kernel_also_names_the_model_when_the_recipe_was_not_checked(world):
    config = MergeConfiguration.model_validate(recipe("regmean", world["models"]))
    with pytest.raises(StatsError, match=f"model {world['models'][2]}: no statistics at"):
        merge_in_memory(config, MergeOptions())


@pytest.fixture
def stats_checked_at_the_door(monkeypatch):
    """What parse_merge_config will do once the lead wires check_stats_recipe in
    (calling it twice is harmless)."""
    original = parse_module.check_recipe

    def both(config):
        original(config)
        check_stats_recipe(config)

    monkeypatch.setattr(parse_module, "check_recipe", both)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"alpha": 1.5}, "alpha must be in [0.0, 1.0]; got 1.5"),
        ({"alpha": -0.1}, "alpha must be in [0.0, 1.0]; got -0.1"),
        ({"missing_stats": True}, "no statistics at"),
    ],
)
def test_yaml_cli_bad_input_exits_2_before_anything_is_written(world, tmp_path, stats_checked_at_the_door, params, message):
    per = with_m2_stats(world)
    if params.pop("missing_stats", False):
        per[2] = {}
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(recipe("regmean", world["models"], params, per)))
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_fisher_parameters_are_named(world, tmp_path, stats_checked_at_the_door):
    per = with_m2_stats(world)
    per[0]["weight"] = -1.0
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump(recipe("fisher", world["models"], {"fisher_floor": 1e-6}, per)))
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 2
    assert "weight must be a finite number >= 0; got -1.0" in result.output
    assert not (tmp_path / "out").exists()
