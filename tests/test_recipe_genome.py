"""Recipe genomes: vector layout -> mergekit recipe, checked tensor by tensor
through mergekit's own planner and executor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from mergekit.options import MergeOptions

from mergekit_evolver.merging.merge import merge_in_memory
from mergekit_evolver.recipes.parse import parse_merge_config
from mergekit_evolver.recipes.genome import (
    DEFAULT_BOUNDS,
    METHOD_PARAMETERS,
    METHODS_NEEDING_BASE,
    METHODS_WITH_BASE,
    GenomeError,
    RecipeGenome,
)
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


# Every method with a base, and the optional-base ones also without one.
BOX_CASES = [(m, m in METHODS_WITH_BASE) for m in sorted(METHOD_PARAMETERS)] + [
    (m, False) for m in sorted(METHODS_WITH_BASE - METHODS_NEEDING_BASE)
]


def inputs(method: str, paths: list[str], with_base: bool) -> tuple[str, ...]:
    if method in ("nuslerp", "nearswap"):
        return tuple(paths[:2])
    if method == "multislerp" and with_base:
        # mergekit 0.1.5's multislerp refuses a tensor no model changed from
        # the base (the norms here) over more than two models; over two it
        # falls back to linear.
        return tuple(paths[:2])
    return tuple(paths)


@pytest.mark.parametrize("method, with_base", BOX_CASES)
def test_every_method_merges_anywhere_in_its_box(models, method, with_base):
    paths, base = models
    g = RecipeGenome(method, inputs(method, paths, with_base), 2,
                     base_model=base if with_base else None, layer_granularity=1)
    lo, hi = g.box()
    merged(g, lo)  # linear at all-zero weights divides 0 by 0: a run rejects it as non-finite
    for x in (hi, np.random.default_rng(2).uniform(lo, hi)):
        out = merged(g, x)
        assert all(torch.isfinite(t).all() for t in out.values())


@pytest.mark.parametrize("layout", [dict(filters=("mlp",)), dict(layer_granularity=1, filters=("mlp",), smooth=True)])
@pytest.mark.parametrize("method, with_base", BOX_CASES)
def test_every_method_merges_in_the_other_layouts(models, method, with_base, layout):
    """One group per filter set, and gradients: the box test covers slices."""
    paths, base = models
    chosen = inputs(method, paths, with_base)
    g = RecipeGenome(method, chosen[:2] if method == "slerp" else chosen, 2,
                     base_model=base if with_base else None, **layout)
    out = merged(g, np.random.default_rng(3).uniform(*g.box()))
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
        (dict(merge_method="karcher"), r"'karcher' cannot be searched \(its only parameters are"),
        (dict(merge_method="model_stock"), "filter_wise"),
        (dict(merge_method="nuslerp"), r"nuslerp interpolates exactly two models; got 3 \(multislerp"),
        (dict(merge_method="nuslerp", models=("a", "z")), "base_model cannot be one of the two models"),
        (dict(merge_method="nearswap"), "nearswap merges exactly two models"),
        (dict(merge_method="sce", base_model=None), "sce needs a base_model"),
        (dict(merge_method="ram", base_model=None), "ram needs a base_model"),
        (dict(merge_method="nearswap", models=("a", "b"), bounds={"t": (0, 1)}),
         "bounds for t, which nearswap does not search"),
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


# -- the methods beyond mergekit-evolve's ----------------------------------------


def direct(method: str, tensors, base=None, **parameters) -> torch.Tensor:
    """mergekit's own method on one tensor: what the recipe's merge must give."""
    group = TensorGroup.from_tensors(
        ([base] if base is not None else []) + list(tensors),
        base_index=0 if base is not None else None,
    )
    return registry.get(method)([group], parameters=parameters)[0]


def loaded(paths, base):
    return [load_tensors(Path(p)) for p in paths], load_tensors(Path(base))


@pytest.mark.parametrize("smooth", [False, True])
def test_sce_select_topk_is_shared_per_group_and_filter(models, smooth):
    """sce has no per-model parameter: select_topk is one value per layer group
    and set, a slice parameter (or a gradient anchor with smooth) that reaches
    each tensor."""
    paths, base = models
    g = RecipeGenome("sce", tuple(paths), 2, base_model=base, layer_granularity=1,
                     filters=("mlp",), smooth=smooth)
    assert g.shape == (2, 1, 2, 1)
    x = np.array([0.3, 1.0, 0.0, 0.6])  # [group][mlp, rest]
    out = merged(g, x)
    inputs_, b = loaded(paths, base)
    for name, topk in (("model.layers.0.mlp.down_proj.weight", 0.3),
                       ("model.layers.0.self_attn.q_proj.weight", 1.0),
                       ("model.layers.1.mlp.up_proj.weight", 0.0),
                       ("model.layers.1.self_attn.v_proj.weight", 0.6)):
        ts = [m[name] for m in inputs_]
        want = direct("sce", ts, b[name], select_topk=topk, int8_mask=True)
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
        if topk < 1:  # the value matters: mergekit's default (1.0) gives another tensor
            assert not torch.allclose(want, direct("sce", ts, b[name], select_topk=1.0))
    # topk 0 keeps no element of any task vector: the base itself
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_multislerp_weights_are_per_model_and_change_the_merge(models):
    paths, base = models
    g = RecipeGenome("multislerp", tuple(paths), 2, filters=("self_attn",))
    assert g.shape == (1, 4, 2, 1) and "base_model" not in g.recipe(g.default())
    x = np.array([0.9, 0.2, 0.1, 0.5, 0.4, 0.4, 0.7, 0.1])  # [model][self_attn, rest]
    w = x.reshape(g.shape)[0, :, :, 0]
    out = merged(g, x)
    inputs_, _ = loaded(paths, base)
    for name, s in (("model.layers.1.self_attn.k_proj.weight", 0), ("model.layers.0.mlp.gate_proj.weight", 1)):
        want = direct("multislerp", [m[name] for m in inputs_], weight=w[:, s].tolist())
        torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
    y = x.copy()
    y[2] = 0.9  # the second model's weight on the self_attn tensors
    moved = merged(g, y)
    assert not torch.allclose(moved["model.layers.1.self_attn.k_proj.weight"], out["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(moved["model.layers.0.mlp.gate_proj.weight"], out["model.layers.0.mlp.gate_proj.weight"])


def test_multislerp_with_a_base_interpolates_task_vectors(models):
    paths, base = models
    g = RecipeGenome("multislerp", tuple(paths[:2]), 2, base_model=base, normalize=False)
    recipe = g.recipe([0.3, 0.6])
    assert recipe["base_model"] == base and recipe["parameters"] == {"normalize_weights": False}
    out = merged(g, [0.3, 0.6])
    (a, b2), b = loaded(paths[:2], base)
    name = "model.layers.0.self_attn.o_proj.weight"
    want = direct("multislerp", [a[name], b2[name]], b[name], weight=[0.3, 0.6], normalize_weights=False)
    torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_searches_t_and_the_recipe_holds_weights_1_minus_t_and_t(models, with_base):
    paths, base = models
    g = RecipeGenome("nuslerp", tuple(paths[:2]), 2, base_model=base if with_base else None,
                     layer_granularity=1)
    assert g.shape == (2, 1, 1, 1) and g.parameters == ("t",)
    recipe = g.recipe([0.0, 0.3])
    assert [s["parameters"]["weight"] for s in recipe["slices"][1]["sources"][:2]] == [pytest.approx(0.7), pytest.approx(0.3)]
    assert ("base_model" in recipe) == with_base
    out = merged(g, [0.0, 0.3])
    (a, b2), b = loaded(paths[:2], base)
    name = "model.layers.1.mlp.down_proj.weight"
    want = direct("nuslerp", [a[name], b2[name]], b[name] if with_base else None, weight=[0.7, 0.3])
    torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
    first = "model.layers.0.mlp.down_proj.weight"  # t = 0: the first model
    torch.testing.assert_close(out[first], a[first], rtol=1e-5, atol=1e-6)


def test_nearswap_searches_log10_t_over_a_pair_the_first_as_base(models):
    paths, _ = models
    g = RecipeGenome("nearswap", tuple(paths[:2]), 2, layer_granularity=1, filters=("mlp",))
    assert g.shape == (2, 1, 2, 1)
    x = np.array([-6.0, -1.5, -1.0, -2.0])  # [group][mlp, rest]
    recipe = g.recipe(x)
    assert [s["base_model"] for s in recipe["slices"]] == [paths[0]] * 2
    assert recipe["slices"][0]["parameters"]["t"][1]["value"] == pytest.approx(10 ** -1.5)
    out = merged(g, x)
    a, b = (load_tensors(Path(p)) for p in paths[:2])
    for name, t in (("model.layers.0.mlp.up_proj.weight", 1e-6),
                    ("model.layers.0.self_attn.q_proj.weight", 10 ** -1.5),
                    ("model.layers.1.mlp.up_proj.weight", 0.1),
                    ("model.layers.1.self_attn.q_proj.weight", 0.01)):
        w = (t / (a[name] - b[name]).abs().clamp(min=1e-6)).clamp(0, 1)
        torch.testing.assert_close(out[name], w * b[name] + (1 - w) * a[name], rtol=1e-5, atol=1e-6)
    # the box spans nearly the first model to nearly the second
    lo = merged(g, g.box()[0])["model.layers.0.mlp.up_proj.weight"]
    hi = merged(g, g.box()[1])["model.layers.0.mlp.up_proj.weight"]
    name = "model.layers.0.mlp.up_proj.weight"
    assert (lo - a[name]).abs().max() < 1e-3 < (hi - a[name]).abs().max()


@pytest.mark.parametrize("method, x, settings", [
    ("ram", [-1.8], dict(epsilon=10 ** -1.8)),
    ("ramplus_tl", [0.8, 0.5, -1.8], dict(r=0.8, alpha=0.5, epsilon=10 ** -1.8)),
])
def test_ram_parameters_are_shared_and_epsilon_is_searched_in_log10(models, method, x, settings):
    paths, base = models
    g = RecipeGenome(method, tuple(paths), 2, base_model=base)
    assert g.shape == (1, 1, 1, len(x))
    assert g.recipe(x)["parameters"] == pytest.approx(settings)
    out = merged(g, x)
    inputs_, b = loaded(paths, base)
    name = "model.layers.1.self_attn.q_proj.weight"
    ts = [m[name] for m in inputs_]
    want = direct(method, ts, b[name], **settings)
    torch.testing.assert_close(out[name], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, direct(method, ts, b[name]))  # mergekit's defaults
    if method == "ramplus_tl":  # r and alpha matter, not only epsilon
        assert not torch.allclose(want, direct(method, ts, b[name], epsilon=settings["epsilon"]))


@pytest.mark.parametrize("method, start", [
    ("sce", [1.0]), ("nuslerp", [0.5]), ("nearswap", [-4.0]), ("ram", [-5.0]),
    ("ramplus_tl", [0.1, 0.2, -5.0]), ("multislerp", [0.5, 0.5]),
])
def test_new_methods_default_recipe_and_box(method, start):
    g = RecipeGenome(method, ("a", "b"), 2, base_model="z")
    assert g.default().tolist() == pytest.approx(start)
    lo, hi = g.box()
    per_model = method == "multislerp"
    names = METHOD_PARAMETERS[method] * (2 if per_model else 1)
    assert lo.tolist() == [DEFAULT_BOUNDS[n][0] for n in names]
    assert hi.tolist() == [DEFAULT_BOUNDS[n][1] for n in names]
