"""Recipe genomes: vector layout -> mergekit recipe, checked tensor by tensor
through mergekit's own planner and executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mergekit.options import MergeOptions

from mergekit_evolver.merging.merge import merge_in_memory
from mergekit_evolver.recipes.parse import parse_merge_config
from mergekit_evolver.recipes.genome import METHOD_PARAMETERS, GenomeError, RecipeGenome
from tiny_models import load_tensors

OPTIONS = MergeOptions(quiet=True, random_seed=7)


@pytest.fixture
def models(shared_world):
    """Four tiny two-layer Llamas and a base, as path strings; read only."""
    return [str(m) for m in shared_world.models], str(shared_world.base)


def merged(genome: RecipeGenome, x) -> dict[str, torch.Tensor]:
    return merge_in_memory(parse_merge_config(genome.recipe(x), where="test"), OPTIONS)


def test_layout_is_group_model_set_parameter_and_reaches_each_tensor(models):
    """task_arithmetic per layer and per filter: each tensor gets the weights of
    its own layer group and filter set, and is base + sum_i w_i (m_i - base)."""
    paths, base = models
    g = RecipeGenome("task_arithmetic", tuple(paths), 2, base_model=base,
                     layer_granularity=1, filters=("self_attn", "mlp"))
    assert g.shape == (2, 4, 3, 1) and g.size == 24
    x = np.random.default_rng(0).uniform(*g.box())
    w = x.reshape(g.shape)[..., 0]  # [group, model, set]
    out = merged(g, x)
    inputs = [load_tensors(Path(p)) for p in paths]
    b = load_tensors(Path(base))
    for name, group, s in (
        ("model.layers.0.self_attn.q_proj.weight", 0, 0),
        ("model.layers.1.self_attn.o_proj.weight", 1, 0),
        ("model.layers.0.mlp.down_proj.weight", 0, 1),
        ("model.layers.1.mlp.up_proj.weight", 1, 1),
        ("model.layers.1.input_layernorm.weight", 1, 2),
    ):
        want = b[name] + sum(w[group, i, s] * (m[name] - b[name]) for i, m in enumerate(inputs))
        torch.testing.assert_close(out[name], want.to(torch.float32), rtol=0, atol=1e-6)


def test_smooth_layout_anchors_a_gradient_at_each_group(models):
    """linear, smooth, two groups over two layers: layer k takes anchor k, and
    linear normalises (mergekit-evolve's default): sum w_i m_i / sum w_i."""
    paths, _ = models
    g = RecipeGenome("linear", tuple(paths), 2, layer_granularity=1, filters=("mlp",), smooth=True)
    x = np.random.default_rng(1).uniform(0.1, 1.0, g.size)
    recipe = g.recipe(x)
    assert "slices" not in recipe and isinstance(recipe["models"][0]["parameters"]["weight"][0]["value"], list)
    w = x.reshape(g.shape)[..., 0]
    out = merged(g, x)
    inputs = [load_tensors(Path(p)) for p in paths]
    for layer in (0, 1):
        for name, s in ((f"model.layers.{layer}.mlp.gate_proj.weight", 0),
                        (f"model.layers.{layer}.self_attn.k_proj.weight", 1)):
            want = sum(w[layer, i, s] * m[name] for i, m in enumerate(inputs)) / w[layer, :, s].sum()
            torch.testing.assert_close(out[name], want.to(torch.float32), rtol=1e-6, atol=1e-6)


def test_two_model_slerp_searches_t_per_group(models):
    paths, _ = models
    g = RecipeGenome("slerp", tuple(paths[:2]), 2, layer_granularity=1)
    assert g.shape == (2, 1, 1, 1)
    out = merged(g, [0.0, 1.0])  # layer 0 is the first model, layer 1 the second
    a, b = load_tensors(Path(paths[0])), load_tensors(Path(paths[1]))
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_slerp_over_more_models_takes_the_best_scored_pair_like_mergekit_evolve(models):
    paths, _ = models
    g = RecipeGenome("slerp", tuple(paths), 2, layer_granularity=1)
    x = np.array([0.5, 3.0, 0.2, 2.0, 1.0, 0.0, 4.0, 0.9])  # [group][model]
    slices = g.recipe(x)["slices"]
    assert [s["base_model"] for s in slices] == [paths[1], paths[2]]
    assert [src["model"] for src in slices[0]["sources"]] == [paths[1], paths[3]]
    assert slices[0]["parameters"]["t"] == pytest.approx(np.exp(2.0) / (np.exp(3.0) + np.exp(2.0)))
    assert slices[1]["parameters"]["t"] == pytest.approx(np.exp(1.0) / (np.exp(4.0) + np.exp(1.0)))


def test_della_epsilon_is_a_share_of_the_largest_valid_one(models):
    paths, base = models
    g = RecipeGenome("della", tuple(paths[:2]), 2, base_model=base)
    x = np.array([0.5, 0.8, 0.5, 0.6, 0.3, 0.99])  # [model][weight, density, epsilon]
    p = [m["parameters"] for m in g.recipe(x)["models"]]
    assert p[0]["epsilon"] == pytest.approx(0.5 * 0.2) and p[1]["epsilon"] == pytest.approx(0.99 * 0.3)
    merged(g, x)  # mergekit accepts it (density +/- epsilon inside (0, 1))


@pytest.mark.parametrize("method", sorted(METHOD_PARAMETERS))
def test_every_method_merges_anywhere_in_its_box(models, method):
    paths, base = models
    g = RecipeGenome(method, tuple(paths), 2, base_model=base, layer_granularity=1)
    lo, hi = g.box()
    merged(g, lo)  # linear at all-zero weights divides 0 by 0: a run rejects it as non-finite
    for x in (hi, np.random.default_rng(2).uniform(lo, hi)):
        out = merged(g, x)
        assert all(torch.isfinite(t).all() for t in out.values())


def test_box_and_default_recipe():
    g = RecipeGenome("ties", ("a", "b", "c", "d"), 4, base_model="z", layer_granularity=2)
    lo, hi = g.box()
    assert lo.tolist() == [0.0] * 16 and hi.tolist() == [1.0] * 16
    assert g.default().reshape(g.shape)[..., 0].tolist() == [[[0.25]] * 4] * 2  # uniform weights
    assert set(g.default().reshape(g.shape)[..., 1].ravel()) == {1.0}
    neg = RecipeGenome("ties", ("a", "b"), 4, base_model="z", allow_negative_weights=True,
                       bounds={"density": (0.2, 0.9)}, start={"density": 0.5})
    lo, hi = neg.box()
    assert lo.tolist() == [-1.0, 0.2, -1.0, 0.2] and hi.tolist() == [1.0, 0.9, 1.0, 0.9]
    assert neg.default().tolist() == [0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(merge_method="nuslerp"), "cannot be searched"),
        (dict(merge_method="ties", base_model=None), "ties needs a base_model"),
        (dict(layer_granularity=3), "does not divide the model's 4 layers"),
        (dict(merge_method="slerp", filters=("mlp",)), "neither filters nor smooth"),
        (dict(smooth=True), "smooth needs layer_granularity > 0"),
        (dict(bounds={"t": (0, 1)}), "bounds for t, which ties does not search"),
        (dict(bounds={"weight": (1, 0)}), "need low < high"),
        (dict(start={"gamma": 0.1}), "start value for gamma"),
    ],
)
def test_bad_genomes_are_refused(kwargs, message):
    settings = dict(merge_method="ties", models=("a", "b", "c"), num_layers=4, base_model="z")
    with pytest.raises(GenomeError, match=message):
        RecipeGenome(**{**settings, **kwargs})
