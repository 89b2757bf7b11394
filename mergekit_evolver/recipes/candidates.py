"""Candidates as mergekit recipes: DE offspring, population mergers, baselines.

Every candidate a run scores is one of these configs, merged by merging/merge.py.
The `*_data` builders are pure: they return mergekit config data over model
references, which search strategies use with member references ("@m0"); the
others parse the same data into a checked MergeConfiguration over paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from mergekit.config import MergeConfiguration

from mergekit_evolver.recipes.parse import parse_merge_config
from mergekit_evolver.methods.regmean import STATS_METHOD_NAMES

MERGE_DTYPE = "float32"

# Baselines, each with a small grid chosen on dev fitness like everything else.
BASELINES: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "average": ("linear", [{"weight": 1.0}]),
    "task_arithmetic": (
        "task_arithmetic",
        [{"weight": w} for w in (0.3, 0.5, 0.7, 1.0)],
    ),
    "ties": (
        "ties",
        [{"weight": 1.0, "density": d} for d in (0.3, 0.5, 0.7)],
    ),
    "dare_ties": (
        "dare_ties",
        [{"weight": 1.0, "density": d} for d in (0.3, 0.5, 0.7)],
    ),
    "regmean": ("regmean", [{"alpha": a} for a in (0.5, 0.9)]),
    "fisher": ("fisher", [{}]),
}
BASELINES_NEED_BASE = {"task_arithmetic", "ties", "dare_ties"}


def takes_base(method: str) -> bool:
    """Whether a method's own input contract wants a base model."""
    from mergekit import merge_methods
    from mergekit.merge_methods import BasePolicy

    try:
        policy = merge_methods.get(method).spec.contract.base
    except RuntimeError:
        return False  # unknown: mergekit will name it when the recipe is planned
    return policy in (BasePolicy.REQUIRED, BasePolicy.OPTIONAL)


def _alias(path: str, taken: set[str]) -> str:
    """mergekit refuses the same model twice in one recipe; a best/1 target that
    is also the best donor gets a second spelling of the same dir."""
    while path in taken:
        path = path.rstrip("/") + "/."
    taken.add(path)
    return path


def de_recipe_data(
    operator: str,
    target: str,
    donors: Sequence[str],
    parameters: dict[str, Any],
    reference: Optional[str] = None,
) -> dict[str, Any]:
    """A DE offspring of target; `reference` is the task-vector space's base."""
    taken: set[str] = set()
    base = _alias(str(target), taken)
    models = [{"model": _alias(str(d), taken)} for d in donors]
    if reference is not None:
        models.append({"model": _alias(str(reference), taken), "parameters": {"reference": True}})
    return {
        "merge_method": operator,
        "base_model": base,
        "models": models,
        "parameters": dict(parameters),
        "dtype": MERGE_DTYPE,
    }


def de_recipe(
    operator: str,
    target: Path,
    donors: Sequence[Path],
    parameters: dict[str, Any],
    reference: Optional[str] = None,
) -> MergeConfiguration:
    data = de_recipe_data(operator, str(target), [str(d) for d in donors], parameters, reference)
    return parse_merge_config(data, where=f"{operator} recipe")


def population_recipe_data(
    template: dict[str, Any],
    members: Sequence[str],
    base_model: Optional[str],
    stats: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """A mergekit config over the given members; `template` supplies the method
    and its parameters, and may name a base_model (else the population's).
    Statistics-based methods get `stats[i]` as member i's statistics."""
    data = dict(template)
    data["models"] = [{"model": str(m)} for m in members]
    if stats is not None and data.get("merge_method") in STATS_METHOD_NAMES:
        for entry, stat in zip(data["models"], stats):
            entry["parameters"] = {"stats": str(stat)}
    if base_model and "base_model" not in data and takes_base(str(data.get("merge_method"))):
        data["base_model"] = base_model
    data.setdefault("dtype", MERGE_DTYPE)
    return data


def population_recipe(
    template: dict[str, Any],
    members: Sequence[Path],
    base_model: Optional[str],
    where: str,
    stats: Optional[Sequence[str]] = None,
) -> MergeConfiguration:
    data = population_recipe_data(template, [str(m) for m in members], base_model, stats)
    return parse_merge_config(data, where=where)


def base_is_a_member(method: str) -> bool:
    """Whether a method merges exactly two models one of which is its base
    (slerp, nearswap, arcee_fusion): the base is then one of the pair, not the
    population's common ancestor."""
    from mergekit import merge_methods
    from mergekit.merge_methods import BasePolicy

    try:
        contract = merge_methods.get(method).spec.contract
    except RuntimeError:
        return False  # unknown: mergekit will name it when the recipe is planned
    return contract.base == BasePolicy.REQUIRED and contract.max_inputs == 2


def pair_recipe_data(
    template: dict[str, Any],
    fitter: str,
    other: str,
    base_model: Optional[str],
) -> dict[str, Any]:
    """A mergekit config over two members (kinship greedy merging), `fitter`
    first. A slerp-like method (`base_is_a_member`) takes `fitter` as its
    base_model, so t interpolates from it towards `other`; any other method
    gets both as models and, when its contract wants a base, the population's
    base_model (task_arithmetic, ties, ...: deltas from the common ancestor)."""
    if base_is_a_member(str(template.get("merge_method"))):
        data = dict(template)
        data["base_model"] = str(fitter)
        data["models"] = [{"model": str(fitter)}, {"model": str(other)}]
        data.setdefault("dtype", MERGE_DTYPE)
        return data
    return population_recipe_data(template, [fitter, other], base_model)


def pair_recipe(
    template: dict[str, Any], fitter: Path, other: Path, base_model: Optional[str], where: str
) -> MergeConfiguration:
    return parse_merge_config(pair_recipe_data(template, str(fitter), str(other), base_model), where=where)


def baseline_recipes(
    name: str,
    members: Sequence[Path],
    base_model: Optional[str],
    stats: Optional[Sequence[str]] = None,
) -> list[MergeConfiguration]:
    method, grid = BASELINES[name]
    return [
        population_recipe(
            {"merge_method": method, "parameters": params},
            members,
            base_model,
            where=f"baseline {name}",
            stats=stats,
        )
        for params in grid
    ]


def single_model_recipe(model: Path) -> MergeConfiguration:
    """The recipe that writes one model unchanged through mergekit's writer."""
    return parse_merge_config(
        {"merge_method": "passthrough", "models": [{"model": str(model)}], "dtype": MERGE_DTYPE},
        where="output",
    )
