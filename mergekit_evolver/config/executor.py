"""Where candidates are merged and scored (run/executor.py): in this process,
or on a pool of Ray actors (run/ray/).

It changes no result (run_config.RESULT_NEUTRAL): the driver tells the
strategy every result in the order it asked, and a worker's result is used
only for the exact recipe the driver would have merged itself. So a resume may
switch executors. What the machine it runs on has (GPUs, a reachable cluster)
is checked when the run starts, not here.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from mergekit_evolver.config.base import Strict


class ExecutorConfig(Strict):
    kind: Literal["in_process", "ray"] = "in_process"
    # None: start a local Ray. "auto": the cluster this machine is part of
    # (RAY_ADDRESS or a `ray start --head` here). "host:port" or
    # "ray://host:port": that cluster.
    address: Optional[str] = None
    workers: int = Field(1, ge=1)
    # Fractions share a device: 0.5 puts two workers on each GPU.
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    # Per candidate, from dispatch: over it the candidate is recorded as
    # failed and its worker is restarted.
    timeout_s: float = Field(1800.0, gt=0)
    # How often a candidate whose worker died is tried again before it is
    # recorded as failed.
    max_retries: int = Field(2, ge=0)

    @field_validator("address")
    @classmethod
    def _address(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value == "auto":
            return value
        host, sep, port = value.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address must be auto, host:port or ray://host:port; got {value!r}")
        return value
