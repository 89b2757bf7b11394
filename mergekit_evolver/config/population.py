"""The starting population: models, recipe members over them, statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import Field, field_validator

from mergekit_evolver.config.base import RunConfig, Strict
from mergekit_evolver.config.paths import model_path
from mergekit_evolver.config.recipe_template import RecipeTemplate



class PopulationConfig(Strict):
    models: list[str] = Field(min_length=2)
    base_model: Optional[str] = None
    # Extra individuals made by mergekit recipes over the models, by name.
    # The run always gives a recipe the population's models (any it lists are
    # replaced), and its base_model unless the recipe names one.
    recipes: dict[str, RecipeTemplate] = {}
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


# Checked on the whole config, not as a PopulationConfig validator, so the
# message reads as it always has (without a "population:" location before it).
def stats_dir_per_model(config: RunConfig) -> None:
    pop = config.population
    if pop.stats is not None and len(pop.stats) != len(pop.models):
        raise ValueError(
            f"population.stats needs one dir per model: {len(pop.models)} models, "
            f"{len(pop.stats)} dirs"
        )
