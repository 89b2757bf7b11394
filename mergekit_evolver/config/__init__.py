"""Run configs (pydantic): all validation of what a user types lives here.

Model paths expand ~ and environment variables (`${TESTBED}/base`), so one
example config serves any testbed location.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergekit_evolver.errors import UserError
from mergekit_evolver.methods.de import OPERATORS, F_RANGE


STATS_METHODS = ("regmean", "fisher")
# EvolveConfig fields that change how a run executes, never what it produces.
RESULT_NEUTRAL = {"merge_ahead"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def expand_path(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def model_path(value: str) -> str:
    """Absolute, so recorded recipes replay from any directory (and mergekit's
    model card never mistakes a relative dir for a hub id)."""
    return os.path.abspath(expand_path(value))


class TaskSpec(Strict):
    """One lm-eval task in a fitness or report suite."""

    name: str
    metric: str = "acc"
    weight: float = Field(1.0, gt=0)
    # None: take it from the task's own metric_list.
    higher_is_better: Optional[bool] = None
    # Report rows average tasks by group (e.g. in_domain, ood).
    group: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class EvalSettings(Strict):
    include_path: list[str] = []
    num_fewshot: Optional[int] = Field(None, ge=0)
    limit: Optional[float] = Field(None, gt=0)
    batch_size: int = Field(64, ge=1)
    apply_chat_template: bool = False
    # Few-shot examples as chat turns (with apply_chat_template), lm-eval's default.
    fewshot_as_multiturn: bool = True
    # Shuffle each task's documents (with a fixed seed) before `limit` takes
    # the first ones, so a limit samples the whole split.
    shuffle: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return [expand_path(v) for v in value] if isinstance(value, list) else value


class FitnessConfig(EvalSettings):
    tasks: list[TaskSpec] = Field(min_length=1)


class ReportConfig(Strict):
    tasks: list[TaskSpec] = []
    baselines: list[
        Literal["average", "task_arithmetic", "ties", "dare_ties", "regmean", "fisher"]
    ] = [
        "average",
        "task_arithmetic",
        "ties",
        "dare_ties",
    ]


class PopulationConfig(Strict):
    models: list[str] = Field(min_length=2)
    base_model: Optional[str] = None
    # Extra individuals made by mergekit recipes over the models, by name.
    # A recipe without `models`/`base_model` gets the population's.
    recipes: dict[str, dict[str, Any]] = {}
    # Statistics dirs (from `mergekit-evolver stats`), one per model, for
    # regmean/fisher mergers and baselines. Slot i keeps model i's statistics
    # as its offspring replace it (Evolver+RegMean). Default: <model>/stats.
    stats: Optional[list[str]] = None

    @field_validator("stats", mode="before")
    @classmethod
    def _stats_paths(cls, value: Any) -> Any:
        return [model_path(v) for v in value] if isinstance(value, list) else value

    def stats_dirs(self) -> list[str]:
        return self.stats or [str(Path(m) / "stats") for m in self.models]

    @field_validator("models", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [model_path(v["model"] if isinstance(v, dict) else v) for v in value]
        return value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base(cls, value: Any) -> Any:
        return model_path(value) if isinstance(value, str) else value


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

    def method_parameters(self, seed: int) -> dict[str, Any]:
        return {
            "F": self.F,
            "CR": self.CR,
            "seed": seed,
            "crossover": self.crossover,
            "granularity": self.granularity,
            "sparsify": self.sparsify,
            "density": self.density,
            "space": self.space,
        }


class SelectionConfig(Strict):
    mode: Literal["individual", "merged"] = "individual"
    # The mergekit recipe that merges the population in `merged` mode (and for
    # `output: merged`); its models are filled in with the current population.
    merger: dict[str, Any] = {"merge_method": "linear", "parameters": {"weight": 1.0}}


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
    # At most this many merged candidates are scored (None: no cap), so the
    # strategy can be compared with others at the same evaluation budget.
    budget: Optional[int] = Field(None, ge=1)

    # Checked at the door rather than at the first merge, after the starting
    # members were already scored: merged members carry no Gram/Fisher
    # statistics, and a typo in the method name should not cost an evaluation.
    @field_validator("merge_method")
    @classmethod
    def _pair_method(cls, value: str) -> str:
        from mergekit import merge_methods

        if value in STATS_METHODS:
            raise ValueError(f"{value} needs per-model statistics, which merged members do not have")
        try:
            contract = merge_methods.get(value).spec.contract
        except RuntimeError:
            raise ValueError(f"unknown merge method: {value}") from None
        if contract.max_inputs is not None and contract.max_inputs < 2:
            raise ValueError(f"{value} cannot merge two models")
        return value


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


class OutputConfig(Strict):
    kind: Literal["best", "merged"] = "best"


class EvolveConfig(Strict):
    seed: int = Field(0, ge=0)
    # evolver: DE over whole models; kinship_greedy: top-k greedy pair merging;
    # recipe: DE or CMA-ES over a mergekit recipe's parameters.
    strategy: Literal["evolver", "kinship_greedy", "recipe"] = "evolver"
    population: PopulationConfig
    de: DEConfig = DEConfig()
    selection: SelectionConfig = SelectionConfig()
    fitness: FitnessConfig
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()
    kinship: KinshipConfig = KinshipConfig()
    greedy: GreedyConfig = GreedyConfig()
    search: SearchConfig = SearchConfig()
    # Merge the next candidate in a worker process while this one is scored
    # (merge_ahead.py). It changes no result, only where the merge runs. It
    # pays where the scoring leaves a CPU core idle; where the forward passes
    # already fill every core, the worker slows them down by more than it saves.
    merge_ahead: bool = False

    @model_validator(mode="after")
    def _enough_members(self) -> "EvolveConfig":
        if self.strategy == "kinship_greedy" and not self.population.base_model:
            raise ValueError("strategy kinship_greedy needs population.base_model (for kinship)")
        if self.kinship.needed and not self.population.base_model:
            raise ValueError("kinship needs population.base_model (kinship compares deltas from it)")
        needed = len(OPERATORS[self.de.operator][0]) + 1
        size = len(self.population.models) + len(self.population.recipes)
        weight_space = self.strategy == "evolver" or (self.strategy == "recipe" and self.search.hybrid)
        if self.strategy == "recipe":
            size += 1  # the hybrid's best-recipe member
            weightless = not self.search.hybrid
            if weightless and (self.selection.mode == "merged" or self.output.kind == "merged"):
                raise ValueError(
                    "strategy recipe returns the best recipe; merged selection and output "
                    "are for a weight-space population (set search.hybrid)"
                )
            if self.population.recipes and not self.search.hybrid:
                raise ValueError(
                    "population.recipes adds weight-space members; strategy recipe "
                    "searches over population.models (set search.hybrid to evolve both)"
                )
        if weight_space and size < needed:
            raise ValueError(
                f"de.operator {self.de.operator} needs a population of at least "
                f"{needed} (x and {needed - 1} distinct donors); got {size}"
            )
        pop = self.population
        if pop.stats is not None and len(pop.stats) != len(pop.models):
            raise ValueError(
                f"population.stats needs one dir per model: {len(pop.models)} models, "
                f"{len(pop.stats)} dirs"
            )
        if self.selection.merger.get("merge_method") in STATS_METHODS and pop.recipes:
            raise ValueError(
                "a regmean/fisher merger needs statistics for every slot; "
                "population.recipes members have none"
            )
        if self.de.space == "task_vectors" and not self.population.base_model:
            raise ValueError("de.space task_vectors needs population.base_model (the reference)")
        if self.selection.mode == "merged" or self.output.kind == "merged":
            if "models" in self.selection.merger:
                raise ValueError("selection.merger must not list models: the population fills them")
        return self

    def digest(self) -> str:
        """Identity of a run: what a resume must agree with. Settings that
        change no result (merge_ahead) are left out, so a resume may change them."""
        text = yaml.safe_dump(self.model_dump(mode="json", exclude=RESULT_NEUTRAL), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_evolve_config(path: str | os.PathLike, evolve_flags: Optional[dict] = None) -> EvolveConfig:
    """A run config, or a mergekit-evolve config mapped onto one; evolve_flags
    are mergekit-evolve's command-line options (for its configs only)."""
    from mergekit_evolver.recipes.evolve_compat import (
        apply_evolve_flags,
        from_mergekit_evolve,
        is_mergekit_evolve_config,
    )

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config must be a YAML mapping")
    flags = {k: v for k, v in (evolve_flags or {}).items() if v not in (None, (), False)}
    if is_mergekit_evolve_config(data):
        allow = bool(flags.pop("allow_benchmarks", False))
        mapped = from_mergekit_evolve(data, where=str(path), allow_benchmarks=allow)
        data = apply_evolve_flags(mapped, flags)
    elif flags:
        names = ", ".join("--" + k.replace("_", "-") for k in sorted(flags))
        raise UserError(f"{names}: mergekit-evolve options, for mergekit-evolve configs only")
    return EvolveConfig.model_validate(data)
