"""How a run searches: the Evolver (de, selection, kinship), kinship-guided
greedy merging (greedy), recipe-space search (search), and what it returns
(output). Each rule that ties a section to the rest of the config sits beside
its section, as a check EvolveConfig runs (base.rule)."""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from mergekit_evolver.config.base import RunConfig, Strict
from mergekit_evolver.config.paths import expand_path
from mergekit_evolver.config.recipe_template import RecipeTemplate, known_method
from mergekit_evolver.methods.de import F_RANGE, OPERATORS
from mergekit_evolver.methods.regmean import STATS_METHOD_NAMES



# ------------------------------------------------------------------- de


class DEConfig(Strict):
    operator: Literal[tuple(OPERATORS)] = "de_current_to_rand1"  # type: ignore[valid-type]
    F: float = Field(0.5, ge=F_RANGE[0], le=F_RANGE[1])
    CR: float = Field(0.5, ge=0.0, le=1.0)
    crossover: Literal["binomial", "exponential"] = "binomial"
    granularity: Literal["element", "row", "tensor"] = "element"
    sparsify: Literal["none", "dare", "magnitude"] = "none"
    density: float = Field(1.0, gt=0.0, le=1.0)
    # task_vectors: mutate theta - base_model; with `sparsify`, each member's
    # task vector is thinned (DARE/TIES-style) instead of each difference.
    space: Literal["weights", "task_vectors"] = "weights"
    generations: int = Field(5, ge=1)
    # The donor of de_current_to_rand1 without a merger. uniform: a random other
    # member. annealed_best: as the Evolver's authors' code, a random other
    # member with probability p = 0.5/(T - t) + 0.5 (t the 0-based generation,
    # T the generation count), otherwise the fittest other member.
    donor: Literal["uniform", "annealed_best"] = "uniform"
    # Tensors left out of mutation (regexes searched in the tensor name, e.g. a
    # classifier head): an excluded tensor keeps the target's own weights.
    exclude: list[str] = []

    @field_validator("exclude")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a regular expression: {pattern!r} ({e})") from None
        return value

    def method_parameters(self, seed: int) -> dict[str, Any]:
        parameters = {
            "F": self.F,
            "CR": self.CR,
            "seed": seed,
            "crossover": self.crossover,
            "granularity": self.granularity,
            "sparsify": self.sparsify,
            "density": self.density,
            "space": self.space,
        }
        if self.exclude:  # left out otherwise, so recipes without it read as before
            parameters["exclude"] = "|".join(f"(?:{p})" for p in self.exclude)
        return parameters


def annealed_donor_is_the_papers_setting(config: RunConfig) -> None:
    """The authors anneal the donor of their one operator, without a merger."""
    if config.de.donor != "annealed_best":
        return
    if config.de.operator != "de_current_to_rand1" or config.selection.mode != "individual":
        raise ValueError(
            "de.donor annealed_best is for de.operator de_current_to_rand1 with "
            "selection.mode individual (the authors' Evolver without a merger)"
        )


def population_fills_de_operator(config: RunConfig) -> None:
    """A weight-space population holds the target and every distinct donor."""
    hybrid = config.strategy == "recipe" and config.search.hybrid
    if config.strategy != "evolver" and not hybrid:
        return
    needed = len(OPERATORS[config.de.operator][0]) + 1
    size = len(config.population.models) + len(config.population.recipes)
    if hybrid:
        size += 1  # the best recipe's merged model joins the population
    if size < needed:
        raise ValueError(
            f"de.operator {config.de.operator} needs a population of at least "
            f"{needed} (x and {needed - 1} distinct donors); got {size}"
        )


def task_vectors_need_base_model(config: RunConfig) -> None:
    if config.de.space == "task_vectors" and not config.population.base_model:
        raise ValueError("de.space task_vectors needs population.base_model (the reference)")


# ------------------------------------------------------------- selection


class SelectionConfig(Strict):
    mode: Literal["individual", "merged"] = "individual"
    # When an accepted offspring replaces its parent in individual selection:
    # at the generation's end (synchronous DE), or at once, so later slots of
    # the same generation see it (the authors' code). Merged selection is
    # always immediate.
    update: Literal["generation", "immediate"] = "generation"
    # The order slots are visited in each generation: 0, 1, ..., or a fresh
    # seeded permutation per generation (the authors' merged selection).
    slot_order: Literal["fixed", "permuted"] = "fixed"
    # The mergekit recipe that merges the population in `merged` mode (and for
    # `output: merged`); its models are filled in with the current population.
    merger: RecipeTemplate = RecipeTemplate(merge_method="linear", parameters={"weight": 1.0})


def stats_merger_has_no_recipe_members(config: RunConfig) -> None:
    if config.selection.merger.merge_method in STATS_METHOD_NAMES and config.population.recipes:
        raise ValueError(
            "a regmean/fisher merger needs statistics for every slot; "
            "population.recipes members have none"
        )


def merger_leaves_models_to_population(config: RunConfig) -> None:
    merges = config.selection.mode == "merged" or config.output.kind == "merged"
    if merges and "models" in config.selection.merger.model_fields_set:
        raise ValueError("selection.merger must not list models: the population fills them")


# --------------------------------------------------------------- kinship


class KinshipConfig(Strict):
    """Kinship (similarity of members' deltas from population.base_model) in
    weight-space evolution (Hu et al. 2024)."""

    track: bool = False  # log the population's mean pairwise kinship per generation
    metric: Literal["pcc", "cos"] = "pcc"
    # Stop when the population's mean kinship reaches this (merging saturates).
    stop_above: Optional[float] = Field(None, ge=-1.0, le=1.0)
    # Pick donors with probability falling with their kinship to the target.
    diverse_donors: bool = False

    @property
    def needed(self) -> bool:
        return self.track or self.stop_above is not None or self.diverse_donors


def kinship_needs_base_model(config: RunConfig) -> None:
    if config.kinship.needed and not config.population.base_model:
        raise ValueError("kinship needs population.base_model (kinship compares deltas from it)")


# ---------------------------------------------------------------- greedy


class GreedyConfig(Strict):
    """Kinship-guided top-k greedy merging (Hu et al. 2024): merge pairs of
    members, keep the k best by dev fitness, repeat; when the best stalls, merge
    it with its least related member; stop when nothing improves or the
    population's kinship passes `stop_kinship`."""

    merge_method: str = "slerp"
    parameters: dict[str, Any] = {"t": 0.5}
    top_k: int = Field(3, ge=2)
    max_rounds: int = Field(6, ge=1)
    metric: Literal["pcc", "cos"] = "pcc"
    stop_kinship: Optional[float] = Field(0.9, ge=-1.0, le=1.0)
    # The exploration round after a stall (merge the best with its least
    # related member); false stops at the first stall instead.
    explore: bool = True
    # At most this many merged candidates are scored (None: no cap), so the
    # strategy can be compared with others at the same evaluation budget.
    budget: Optional[int] = Field(None, ge=1)

    # Checked at the door rather than at the first merge, after the starting
    # members were already scored: merged members carry no Gram/Fisher
    # statistics, and a typo in the method name should not cost an evaluation.
    @field_validator("merge_method")
    @classmethod
    def _merges_a_pair(cls, value: str) -> str:
        if value in STATS_METHOD_NAMES:
            raise ValueError(f"{value} needs per-model statistics, which merged members do not have")
        contract = known_method(value).spec.contract
        if contract.max_inputs is not None and contract.max_inputs < 2:
            raise ValueError(f"{value} cannot merge two models")
        return value


def kinship_greedy_needs_base_model(config: RunConfig) -> None:
    if config.strategy == "kinship_greedy" and not config.population.base_model:
        raise ValueError("strategy kinship_greedy needs population.base_model (for kinship)")


# ---------------------------------------------------------------- search


class SearchConfig(Strict):
    """Recipe-space search (strategy: recipe): an optimizer over the parameters
    of one mergekit recipe over population.models (recipe_genome.py), the
    working successor of mergekit-evolve."""

    merge_method: str = "task_arithmetic"
    # Layers per group with their own values (0: one group for all layers).
    layer_granularity: int = Field(0, ge=0)
    # Tensor-name filters with their own values (e.g. self_attn, mlp); the
    # rest of the tensors get one more set.
    filters: list[str] = []
    # Values anchored at the groups and interpolated across the layers.
    smooth: bool = False
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    # Per-parameter box, e.g. {weight: [0, 2]}; defaults in recipe_genome.
    bounds: dict[str, tuple[float, float]] = {}
    # The default recipe's values (weight defaults to 1/models).
    start: dict[str, float] = {}
    # Start from a random point of the box (mergekit-evolve's random_init),
    # not from the default recipe.
    random_start: bool = False
    tokenizer_source: Optional[str] = None
    optimizer: Literal["de", "cmaes"] = "de"
    # Candidates scored by the search (the starting population included).
    budget: int = Field(60, ge=1)
    # DE: 10 if unset; CMA-ES: pycma's 4 + 3 ln(dimensions) if unset.
    population_size: Optional[int] = Field(None, ge=2)
    de_strategy: Literal["rand/1/bin", "best/1/bin", "current-to-best/1/bin"] = "rand/1/bin"
    F: float = Field(0.5, ge=0.0, le=2.0)
    CR: float = Field(0.9, ge=0.0, le=1.0)
    jde: bool = False
    # steady: each DE trial is built from the population as it stands and
    # replaces its target at once (no generation barrier).
    mode: Literal["generational", "steady"] = "generational"
    boundary: Literal["reflect", "clip"] = "reflect"
    sigma0: float = Field(1 / 6, gt=0)
    # Then run the weight-space Evolver (de:) over population.models plus
    # the best recipe's merged model.
    hybrid: bool = False

    @field_validator("merge_method")
    @classmethod
    def _searchable(cls, value: str) -> str:
        from mergekit_evolver.recipes.genome import METHOD_PARAMETERS

        if value not in METHOD_PARAMETERS:
            raise ValueError(f"cannot search {value}; choose one of {', '.join(METHOD_PARAMETERS)}")
        return value

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _tokenizer(cls, value: Any) -> Any:
        return expand_path(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _steady_is_de(self) -> "SearchConfig":
        if self.mode == "steady" and self.optimizer != "de":
            raise ValueError("mode steady is for optimizer de (CMA-ES learns from whole generations)")
        return self


def recipe_search_merges_only_hybrid(config: RunConfig) -> None:
    """Without hybrid, strategy recipe has no weight-space population to merge."""
    if config.strategy != "recipe" or config.search.hybrid:
        return
    if config.selection.mode == "merged" or config.output.kind == "merged":
        raise ValueError(
            "strategy recipe returns the best recipe; merged selection and output "
            "are for a weight-space population (set search.hybrid)"
        )


def recipe_search_takes_recipes_only_hybrid(config: RunConfig) -> None:
    if config.strategy == "recipe" and config.population.recipes and not config.search.hybrid:
        raise ValueError(
            "population.recipes adds weight-space members; strategy recipe "
            "searches over population.models (set search.hybrid to evolve both)"
        )


# ---------------------------------------------------------------- output


class OutputConfig(Strict):
    kind: Literal["best", "merged"] = "best"
