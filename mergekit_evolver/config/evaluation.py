"""What scores a candidate (fitness) and what reports on the result."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from mergekit_evolver.config.base import Strict
from mergekit_evolver.config.paths import expand_path


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
