"""mergekit-evolve configs, accepted unchanged and mapped onto a recipe run.

A mergekit-evolve config (genome:, tasks:, limit, num_fewshot, shuffle,
random_init, apply_chat_template, fewshot_as_multiturn) is validated by
mergekit's own EvolMergeConfiguration, so it means here what it meant there,
and becomes `strategy: recipe` with CMA-ES, the optimizer mergekit-evolve ran.
What mergekit-evolve took from its command line gets that command line's
defaults: --max-fevals 100 (search.budget), --sigma0 1/6, --random-seed 0.

Differences, all deliberate:
- the seed is always set and the search resumes (mergekit-evolve had neither);
- higher_is_better is honoured per task metric;
- `shuffle` shuffles each task's documents with a fixed seed (mergekit-evolve
  shuffled unseeded, so two runs scored different samples);
- candidates merge in float32 on the CPU (mergekit-evolve merged in bfloat16
  on a GPU); the exported best recipe says so.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mergekit_evolver.errors import UserError, one_line

MAX_FEVALS = 100  # mergekit-evolve's --max-fevals default
SIGMA0 = 1 / 6  # its --sigma0 default
RANDOM_SEED = 0  # its --random-seed default


def is_mergekit_evolve_config(data: dict) -> bool:
    return "genome" in data


def from_mergekit_evolve(data: dict, where: str, allow_benchmarks: bool = False) -> dict[str, Any]:
    """The run config a mergekit-evolve config stands for."""
    from mergekit.evo.config import EvolMergeConfiguration, check_for_naughty_config

    _check_known_keys(data, where)
    try:
        source = EvolMergeConfiguration.model_validate(data)
    except (ValidationError, AssertionError) as e:
        raise UserError(f"{where}: not a valid mergekit-evolve config: {one_line(e)}") from None
    if not allow_benchmarks:
        # mergekit-evolve's guard against selecting on public benchmarks' test data.
        try:
            check_for_naughty_config(source)
        except ValueError as e:
            raise UserError(str(e)) from None
    genome = source.genome
    for model in [*genome.models, *([genome.base_model] if genome.base_model else [])]:
        if model.lora is not None or model.override_architecture is not None:
            raise UserError(f"{where}: model {model} uses a LoRA or architecture override, which a search cannot merge")
    population: dict[str, Any] = {"models": [m.model.path for m in genome.models]}
    if genome.base_model is not None:
        population["base_model"] = genome.base_model.model.path
    search: dict[str, Any] = {
        "merge_method": genome.merge_method,
        "layer_granularity": max(genome.layer_granularity, 0),
        "filters": list(genome.filters or []),
        "smooth": genome.smooth,
        "normalize": genome.normalize,
        "allow_negative_weights": genome.allow_negative_weights,
        "optimizer": "cmaes",
        "budget": MAX_FEVALS,
        "sigma0": SIGMA0,
        "random_start": source.random_init,
    }
    if genome.tokenizer_source is not None:
        search["tokenizer_source"] = genome.tokenizer_source
    fitness: dict[str, Any] = {
        "tasks": [{"name": t.name, "metric": t.metric, "weight": t.weight} for t in source.tasks],
        "apply_chat_template": source.apply_chat_template,
        "fewshot_as_multiturn": source.fewshot_as_multiturn,
        "shuffle": source.shuffle,
    }
    if source.limit is not None:
        fitness["limit"] = source.limit
    if source.num_fewshot is not None:
        fitness["num_fewshot"] = source.num_fewshot
    return {
        "seed": RANDOM_SEED,
        "strategy": "recipe",
        "population": population,
        "search": search,
        "fitness": fitness,
    }


def _check_known_keys(data: dict, where: str) -> None:
    """mergekit's EvolMergeConfiguration drops unknown keys, so a typo such
    as `layer_granulrity:` would search with the default; refuse it instead."""
    from mergekit.evo.config import EvolMergeConfiguration, TaskConfiguration
    from mergekit.evo.genome import ModelGenomeDefinition

    from mergekit_evolver.recipes.parse import refuse_unknown

    refuse_unknown(data, EvolMergeConfiguration, where)
    if isinstance(data.get("genome"), dict):
        refuse_unknown(data["genome"], ModelGenomeDefinition, f"genome of {where}")
    tasks = data.get("tasks")
    for i, task in enumerate(tasks if isinstance(tasks, list) else []):
        if isinstance(task, dict):
            refuse_unknown(task, TaskConfiguration, f"tasks[{i}] of {where}")


def apply_evolve_flags(config: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """mergekit-evolve's command-line options, where they mean something here."""
    if "max_fevals" in flags:
        config["search"]["budget"] = flags["max_fevals"]
    if "sigma0" in flags:
        config["search"]["sigma0"] = flags["sigma0"]
    if "random_seed" in flags:
        config["seed"] = flags["random_seed"]
    if "batch_size" in flags:
        config["fitness"]["batch_size"] = flags["batch_size"]
    if "task_search_path" in flags:
        config["fitness"]["include_path"] = list(flags["task_search_path"])
    return config
