"""Each run-config rule gives its own message; merger and recipe templates are
typed (unknown keys and unknown merge methods refused at load time)."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from mergekit_evolver.config import EvolveConfig, RecipeTemplate
from mergekit_evolver.errors import one_line

BASE = {
    "population": {"models": ["/m/a", "/m/b", "/m/c", "/m/d"], "base_model": "/m/base"},
    "fitness": {"tasks": ["t_dev"]},
}


def config(**sections) -> dict:
    data = copy.deepcopy(BASE)
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return data


def without_base(**sections) -> dict:
    data = config(**sections)
    del data["population"]["base_model"]
    return data


def refused(data: dict) -> str:
    with pytest.raises(ValidationError) as info:
        EvolveConfig.model_validate(data)
    return one_line(info.value)


RECIPE_MEMBER = {"ties": {"merge_method": "ties", "parameters": {"weight": 1.0, "density": 0.5}}}

RULES = {
    "kinship_greedy needs a base model": (
        without_base(strategy="kinship_greedy"),
        "strategy kinship_greedy needs population.base_model (for kinship)",
    ),
    "kinship needs a base model": (
        without_base(kinship={"track": True}),
        "kinship needs population.base_model (kinship compares deltas from it)",
    ),
    "recipe search has no merged selection": (
        config(strategy="recipe", selection={"mode": "merged"}),
        "strategy recipe returns the best recipe; merged selection and output "
        "are for a weight-space population (set search.hybrid)",
    ),
    "recipe search has no merged output": (
        config(strategy="recipe", output={"kind": "merged"}),
        "strategy recipe returns the best recipe; merged selection and output "
        "are for a weight-space population (set search.hybrid)",
    ),
    "recipe search takes recipe members only with hybrid": (
        config(strategy="recipe", population={"recipes": RECIPE_MEMBER}),
        "population.recipes adds weight-space members; strategy recipe "
        "searches over population.models (set search.hybrid to evolve both)",
    ),
    "population too small for the operator": (
        config(de={"operator": "de_rand1"}, population={"models": ["/m/a", "/m/b", "/m/c"]}),
        "de.operator de_rand1 needs a population of at least 4 (x and 3 distinct donors); got 3",
    ),
    "hybrid counts the best recipe's member": (
        config(strategy="recipe", search={"hybrid": True}, de={"operator": "de_rand1"},
               population={"models": ["/m/a", "/m/b"]}),
        "de.operator de_rand1 needs a population of at least 4 (x and 3 distinct donors); got 3",
    ),
    "stats dirs one per model": (
        config(population={"stats": ["/s/a", "/s/b"]}),
        "population.stats needs one dir per model: 4 models, 2 dirs",
    ),
    "statistics merger without recipe members": (
        config(selection={"merger": {"merge_method": "regmean"}}, population={"recipes": RECIPE_MEMBER}),
        "a regmean/fisher merger needs statistics for every slot; population.recipes members have none",
    ),
    "task vectors need a base model": (
        without_base(de={"space": "task_vectors"}),
        "de.space task_vectors needs population.base_model (the reference)",
    ),
    "merged selection's merger lists no models": (
        config(selection={"mode": "merged", "merger": {"merge_method": "linear", "models": ["/m/a"]}}),
        "selection.merger must not list models: the population fills them",
    ),
    "merged output's merger lists no models": (
        config(output={"kind": "merged"}, selection={"merger": {"merge_method": "linear", "models": None}}),
        "selection.merger must not list models: the population fills them",
    ),
}


@pytest.mark.parametrize("case", sorted(RULES))
def test_each_rule_gives_its_message(case):
    data, message = RULES[case]
    assert refused(data) == message


def test_the_first_broken_rule_is_the_one_reported():
    data = without_base(strategy="kinship_greedy", kinship={"track": True}, de={"space": "task_vectors"})
    assert refused(data) == "strategy kinship_greedy needs population.base_model (for kinship)"


def test_an_unused_merger_may_list_models():
    EvolveConfig.model_validate(config(selection={"merger": {"merge_method": "linear", "models": ["/m/a"]}}))


@pytest.mark.parametrize("where, data", [
    ("selection.merger", config(selection={"merger": {"merge_method": "linear", "paramters": {}}})),
    ("population.recipes.ties", config(population={"recipes": {"ties": {"merge_method": "ties", "slices": []}}})),
])
def test_templates_refuse_unknown_keys(where, data):
    key = "paramters" if "merger" in where else "slices"
    assert refused(data) == f"{where}.{key}: Extra inputs are not permitted"


@pytest.mark.parametrize("where, data", [
    ("selection.merger", config(selection={"merger": {"merge_method": "foo"}})),
    ("population.recipes.x", config(population={"recipes": {"x": {"merge_method": "foo"}}})),
])
def test_templates_refuse_unknown_merge_methods(where, data):
    assert refused(data) == f"{where}.merge_method: unknown merge method: foo"


@pytest.mark.parametrize("method", ["linear", "ties", "de_rand1", "regmean", "fisher"])
def test_templates_know_mergekits_and_the_plugins_methods(method):
    assert RecipeTemplate(merge_method=method).merge_method == method


def test_template_is_the_dict_the_user_gave():
    given = {"parameters": {"weight": [0, 1]}, "merge_method": "task_arithmetic", "dtype": None}
    data = config(selection={"merger": given}, population={"recipes": {"ta": given}})
    loaded = EvolveConfig.model_validate(data)
    assert loaded.selection.merger.template() == given
    assert loaded.population.recipes["ta"].template() == given
    dumped = loaded.model_dump(mode="json")
    assert dumped["selection"]["merger"] == given
    assert dumped["population"]["recipes"] == {"ta": given}


def test_default_merger_is_a_plain_linear_average():
    merger = EvolveConfig.model_validate(config()).selection.merger
    assert merger.template() == {"merge_method": "linear", "parameters": {"weight": 1.0}}


def test_a_dumped_config_loads_back_to_the_same_run():
    loaded = EvolveConfig.model_validate(
        config(selection={"mode": "merged", "merger": {"merge_method": "ties", "parameters": {"density": 0.5}}},
               population={"recipes": RECIPE_MEMBER})
    )
    again = EvolveConfig.model_validate(loaded.model_dump(mode="json"))
    assert again == loaded and again.digest() == loaded.digest()


def test_a_setting_left_at_its_default_leaves_the_digest_as_it_was(shared_world):
    """Runs that never set a setting keep their identity when it is added or
    spelt out: only settings that differ from their defaults make a digest."""
    from toy_world import run_config

    plain = EvolveConfig.model_validate(run_config(shared_world))
    spelt = run_config(shared_world)
    spelt["fitness"]["racing"] = {"mode": "exact", "rounds": 4}
    spelt["selection"] = {"mode": "individual", "update": "generation", "slot_order": "fixed"}
    assert EvolveConfig.model_validate(spelt).digest() == plain.digest()
    changed = run_config(shared_world)
    changed["fitness"]["racing"] = {"rounds": 5}
    assert EvolveConfig.model_validate(changed).digest() != plain.digest()
