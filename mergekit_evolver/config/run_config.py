"""The whole run config, the rules across its sections, and its digest."""

from __future__ import annotations

import hashlib
from typing import Optional

import yaml
from pydantic import Field, field_validator

from mergekit_evolver.config.base import Strict, rule
from mergekit_evolver.config.evaluation import FitnessConfig, ReportConfig
from mergekit_evolver.config.executor import ExecutorConfig
from mergekit_evolver.config.fuse_section import FuseSection, fused_model_joins_population
from mergekit_evolver.config.logging import LoggingConfig
from mergekit_evolver.config.population import PopulationConfig, stats_dir_per_model
from mergekit_evolver.config.strategies import (
    DEConfig,
    GreedyConfig,
    KinshipConfig,
    OutputConfig,
    SearchConfig,
    SelectionConfig,
    annealed_donor_is_the_papers_setting,
    kinship_greedy_needs_base_model,
    kinship_needs_base_model,
    merger_leaves_models_to_population,
    population_fills_de_operator,
    recipe_search_merges_only_hybrid,
    recipe_search_takes_recipes_only_hybrid,
    stats_merger_has_no_recipe_members,
    task_vectors_need_base_model,
)

# EvolveConfig fields that change how a run executes, never what it produces.
RESULT_NEUTRAL = {"merge_ahead", "logging", "executor"}


class EvolveConfig(Strict):
    seed: int = Field(0, ge=0)
    # A name in search/registry.py: evolver (DE over whole models),
    # kinship_greedy (top-k greedy pair merging), recipe (DE or CMA-ES over a
    # mergekit recipe's parameters), random (random search over that recipe).
    strategy: str = "evolver"
    population: PopulationConfig
    # Fuse first (config/fuse_section.py): the fused target joins the models.
    fuse: Optional[FuseSection] = None
    de: DEConfig = DEConfig()
    selection: SelectionConfig = SelectionConfig()
    fitness: FitnessConfig
    report: ReportConfig = ReportConfig()
    output: OutputConfig = OutputConfig()
    kinship: KinshipConfig = KinshipConfig()
    greedy: GreedyConfig = GreedyConfig()
    search: SearchConfig = SearchConfig()
    # Experiment loggers (wandb, tensorboard); they only watch the run.
    logging: LoggingConfig = LoggingConfig()
    # Merge the next candidate in a worker process while this one is scored
    # (merge_ahead.py). It changes no result, only where the merge runs. It
    # pays where the scoring leaves a CPU core idle; where the forward passes
    # already fill every core, the worker slows them down by more than it saves.
    merge_ahead: bool = False
    # Where candidates are merged and scored: here, or on Ray actors. It
    # changes no result either (config/executor.py).
    executor: ExecutorConfig = ExecutorConfig()

    @field_validator("strategy")
    @classmethod
    def _registered(cls, value: str) -> str:
        from mergekit_evolver.search.registry import STRATEGIES

        if value not in STRATEGIES:
            raise ValueError(f"unknown strategy {value!r}; choose one of {', '.join(STRATEGIES)}")
        return value

    # Before the rules, so that they see the population with its fused model.
    _fused_model_joins_population = rule(fused_model_joins_population)

    # Rules across sections, each defined beside its section. The first
    # broken one is reported, so this order decides which message a config
    # breaking several of them gets.
    _kinship_greedy_needs_base_model = rule(kinship_greedy_needs_base_model)
    _kinship_needs_base_model = rule(kinship_needs_base_model)
    _recipe_search_merges_only_hybrid = rule(recipe_search_merges_only_hybrid)
    _recipe_search_takes_recipes_only_hybrid = rule(recipe_search_takes_recipes_only_hybrid)
    _population_fills_de_operator = rule(population_fills_de_operator)
    _stats_dir_per_model = rule(stats_dir_per_model)
    _stats_merger_has_no_recipe_members = rule(stats_merger_has_no_recipe_members)
    _task_vectors_need_base_model = rule(task_vectors_need_base_model)
    _merger_leaves_models_to_population = rule(merger_leaves_models_to_population)
    _annealed_donor_is_the_papers_setting = rule(annealed_donor_is_the_papers_setting)

    def digest(self) -> str:
        """Identity of a run: what a resume must agree with. Settings that
        change no result (merge_ahead, logging, executor) are left out, so a resume may
        change them. So are settings at their defaults: a setting added in a
        later version leaves the runs that never set it their identity."""
        dumped = self.model_dump(mode="json", exclude=RESULT_NEUTRAL, exclude_defaults=True)
        text = yaml.safe_dump(dumped, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
