"""Run configs (pydantic): all validation of what a user types lives here.

    paths            expand_path, model_path (~ and ${ENV_VARS} expand)
    base             Strict, the base of every section; rule(), a cross-section check as a validator
    recipe_template  RecipeTemplate: selection.merger and population.recipes
    evaluation       TaskSpec, EvalSettings, FitnessConfig (fitness_function), ReportConfig
    executor         ExecutorConfig: in-process or Ray actors
    logging          LoggingConfig: the experiment loggers (wandb, tensorboard)
    population       PopulationConfig
    strategies       DEConfig, SelectionConfig, KinshipConfig, GreedyConfig, SearchConfig, OutputConfig
    run_config       EvolveConfig (its digest identifies a run)
    load             load_evolve_config: a run config or a mergekit-evolve config from a file
"""

from mergekit_evolver.config.base import Strict, rule
from mergekit_evolver.config.evaluation import (
    EvalSettings,
    FitnessConfig,
    ReportConfig,
    TaskSpec,
    fitness_function,
)
from mergekit_evolver.config.executor import ExecutorConfig
from mergekit_evolver.config.logging import LoggingConfig, TensorBoardConfig, WandbConfig
from mergekit_evolver.config.load import load_evolve_config
from mergekit_evolver.config.paths import expand_path, model_path
from mergekit_evolver.config.population import PopulationConfig
from mergekit_evolver.config.recipe_template import RecipeTemplate, known_method
from mergekit_evolver.config.run_config import RESULT_NEUTRAL, EvolveConfig
from mergekit_evolver.config.strategies import (
    DEConfig,
    GreedyConfig,
    KinshipConfig,
    OutputConfig,
    SearchConfig,
    SelectionConfig,
)

__all__ = [
    "RESULT_NEUTRAL",
    "DEConfig",
    "EvalSettings",
    "EvolveConfig",
    "ExecutorConfig",
    "FitnessConfig",
    "GreedyConfig",
    "KinshipConfig",
    "LoggingConfig",
    "OutputConfig",
    "PopulationConfig",
    "RecipeTemplate",
    "ReportConfig",
    "SearchConfig",
    "SelectionConfig",
    "Strict",
    "TaskSpec",
    "TensorBoardConfig",
    "WandbConfig",
    "expand_path",
    "fitness_function",
    "known_method",
    "load_evolve_config",
    "model_path",
    "rule",
]
