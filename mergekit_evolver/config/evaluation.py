"""What scores a candidate (fitness) and what reports on the result."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Literal, Optional

from pydantic import Field, field_validator, model_validator

from mergekit_evolver.config.base import Strict
from mergekit_evolver.config.paths import expand_path, model_path


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


def fitness_function(spec: str) -> Callable[..., Any]:
    """The callable that `fitness.function` names ("package.module:name").
    Raises ValueError naming what is wrong: the form, the import, the name."""
    module_name, colon, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not colon or not module_name or not attr or ":" in attr:
        raise ValueError(f"{spec!r} is not of the form module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a module that fails while it imports is as unusable as a missing one
        raise ValueError(f"cannot import module {module_name!r}: {type(error).__name__}: {error}") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"{spec!r} is not callable (it is a {type(target).__name__})")
    return target


class RacingConfig(Strict):
    """Racing (scoring/racing.py): a candidate is scored in `rounds` chunks
    of each task's documents and stopped once it cannot pass its bar.
    `exact` stops only when no remaining documents could lift it over the bar,
    so it makes the decisions full scoring makes, and takes the documents the
    initial members did worst on first; `off` scores every candidate in full,
    in the same rounds. `statistical` stops once the bar is out of reach with
    probability `confidence` (a paired test against the bar's reference, else
    a Hoeffding-Serfling bound per task), on documents in a seeded random
    order: cheaper, and some decisions may differ."""

    mode: Literal["exact", "off", "statistical"] = "exact"
    rounds: int = Field(4, ge=1)
    confidence: float = Field(0.95, gt=0.5, lt=1.0)


class SubsetConfig(Strict):
    """Subset estimation (scoring/subset.py): candidates are first scored on
    a seeded `share` of each task's documents, stratified by how the initial
    members did on them. A candidate whose estimate cannot pass its bar is
    rejected on it; one that passes is scored in full; one without a bar and
    kept by no one (CMA-ES, random search, a recipe candidate) is ranked on
    its estimate. Members, the final model and the report get full scores."""

    share: float = Field(0.25, gt=0.0, lt=1.0)


class FitnessConfig(EvalSettings):
    tasks: list[TaskSpec] = Field(min_length=1)
    racing: RacingConfig = RacingConfig()
    subset: Optional[SubsetConfig] = None
    # "module:callable", called as function(scores, tasks) -> float, higher is
    # better, instead of the weighted mean of `tasks`' metrics. scores: task
    # name -> {metric: value}, as the ledger keeps them ("acc"; a metric under
    # a filter other than none keeps it: "exact_match,strict"); tasks: these
    # TaskSpecs, metric spelt as that key and higher_is_better filled in.
    function: Optional[str] = None

    @field_validator("function")
    @classmethod
    def _importable(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            fitness_function(value)
        return value


class Reference(Strict):
    """A model scored in the report beside the others, never a member: an upper
    (or lower) bound such as a multi-task fine-tune. Same architecture and
    shapes as the population, since it is scored in the same resident model."""

    name: str = Field(min_length=1)
    model: str

    @field_validator("model")
    @classmethod
    def _path(cls, value: str) -> str:
        return model_path(value)


class ReportConfig(Strict):
    tasks: list[TaskSpec] = []
    references: list[Reference] = []
    baselines: list[
        Literal["average", "task_arithmetic", "ties", "dare_ties", "regmean", "fisher"]
    ] = [
        "average",
        "task_arithmetic",
        "ties",
        "dare_ties",
    ]

    @model_validator(mode="after")
    def _distinct_names(self) -> "ReportConfig":
        names = [r.name for r in self.references]
        taken = sorted({n for n in names if names.count(n) > 1 or n in self.baselines or n == "evolved"})
        if taken:
            raise ValueError(f"report.references: names {taken} are used twice (or by a baseline, or 'evolved')")
        return self
