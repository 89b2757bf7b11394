"""Experiment logging (run/observers.py): Weights & Biases and TensorBoard.

Both are optional and change no result, so the whole section is left out of a
run's digest (run_config.RESULT_NEUTRAL): a resume may turn them on or off.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from mergekit_evolver.config.base import Strict
from mergekit_evolver.config.paths import expand_path


class WandbConfig(Strict):
    project: str = Field("mergekit-evolver", min_length=1)
    # None: the run dir's name.
    name: Optional[str] = None
    entity: Optional[str] = None
    # offline by default: a run never needs a login or the network; `wandb
    # sync <run_dir>/logs/wandb/offline-run-*` uploads it later.
    mode: Literal["offline", "online", "disabled"] = "offline"
    tags: list[str] = []


class TensorBoardConfig(Strict):
    # None: <run_dir>/logs/tensorboard. A path given here expands ~ and
    # ${VARS}, and a relative one is taken from the working directory, like
    # every other path in a run config.
    log_dir: Optional[str] = None

    @field_validator("log_dir")
    @classmethod
    def _expand(cls, value: Optional[str]) -> Optional[str]:
        return None if value is None else expand_path(value)


def _switch(value: Any) -> Any:
    # `tensorboard: true` is the short way to ask for the defaults.
    if value is True:
        return {}
    if value is False:
        return None
    return value


class LoggingConfig(Strict):
    # None (the default): that logger is off.
    wandb: Optional[WandbConfig] = None
    tensorboard: Optional[TensorBoardConfig] = None

    @field_validator("wandb", "tensorboard", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return _switch(value)
