"""Where candidates are merged and scored (run/executor.py): in this process,
or on a pool of Ray actors (run/ray/).

It changes no result (run_config.RESULT_NEUTRAL): the driver tells the
strategy every result in the order it asked, and a worker's result is used
only for the exact recipe the driver would have merged itself. So a resume may
switch executors. What the machine it runs on has (GPUs, a reachable cluster)
is checked when the run starts, not here.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

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

    # The population cache (population/cache.py): members' tensors held in
    # memory up to this many bytes, least recently used out first; 0: every
    # merge reads its members from their files. "auto": a quarter of the
    # memory free when the run starts on an accelerator, when the cache lives
    # there; 0 in host memory, where the OS page cache already holds the
    # members' files: on CPU a host cache merged no faster than page-cache
    # reads and more than doubled peak RSS (benchmarks/real_size.py --cache,
    # README). In-process merges only: Ray workers read from files.
    cache_bytes: Union[Literal["auto"], int] = "auto"
    # Where it lives: host memory, or the device the merge math runs on
    # (fitness.device). "auto": the device when it is an accelerator, which
    # saves each merge its host-to-device copies.
    cache_on: Literal["auto", "host", "device"] = "auto"
    # Read the next candidate's members into the cache while this one is
    # scored. "auto": when scoring runs on an accelerator, whose forward passes
    # leave the CPU idle; on a CPU the reading thread slows the forward passes
    # by more than the merge saves (benchmarks/real_size.py).
    prefetch: Union[Literal["auto"], bool] = "auto"

    @field_validator("cache_bytes", mode="before")
    @classmethod
    def _cache_bytes(cls, value):
        # Before the union's own checks, which would answer twice, once per arm.
        if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"cache_bytes must be auto or a number of bytes >= 0; got {value!r}")
        return value

    def cache_device(self, math_device: str) -> str:
        on_device = self.cache_on == "device" or (self.cache_on == "auto" and math_device != "cpu")
        return math_device if on_device else "cpu"

    def prefetches(self, math_device: str) -> bool:
        return math_device != "cpu" if self.prefetch == "auto" else bool(self.prefetch)

    def cache_budget(self, math_device: str) -> int:
        from mergekit_evolver.population.cache import auto_budget

        if self.cache_bytes != "auto":
            return int(self.cache_bytes)
        device = self.cache_device(math_device)
        return 0 if device == "cpu" else auto_budget(device)

    @field_validator("address")
    @classmethod
    def _address(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value == "auto":
            return value
        host, sep, port = value.removeprefix("ray://").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"address must be auto, host:port or ray://host:port; got {value!r}")
        return value
