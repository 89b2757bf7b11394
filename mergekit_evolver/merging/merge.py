"""The one merge path: mergekit configs through mergekit's planner and executor."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

import torch
import transformers
import yaml
from mergekit.architecture import get_architecture_info
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache, ReturnTensor
from mergekit.merge import _model_out_config, run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

import mergekit_evolver  # noqa: F401  (the plugin's methods must be registered)
from mergekit_evolver.errors import UserError
from mergekit_evolver.methods.de import check_recipe
from mergekit_evolver.rng import keep_global_rng
from mergekit_evolver.stats.store import check_stats_recipe

StateDict = dict[str, torch.Tensor]


def load_merge_config(path: str | os.PathLike) -> tuple[MergeConfiguration, str]:
    """Read and validate a mergekit YAML; returns the config and its source text."""
    source = Path(path).read_text(encoding="utf-8")
    return parse_merge_config(yaml.safe_load(source), where=str(path)), source


def parse_merge_config(data: object, where: str = "merge config") -> MergeConfiguration:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a merge config must be a YAML mapping")
    _check_known_keys(data)
    config = MergeConfiguration.model_validate(data)
    _check_local_models(config)
    check_recipe(config)
    check_stats_recipe(config)
    return config


def _check_known_keys(data: dict) -> None:
    """mergekit ignores unknown keys, so a typo such as `paramters:` would
    silently merge with defaults; refuse it instead."""
    _refuse_unknown(data, MergeConfiguration, "merge config")
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict):
            _refuse_unknown(entry, InputModelDefinition, f"models[{i}]")


def _refuse_unknown(data: dict, model: type, where: str) -> None:
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise UserError(
            f"unknown key(s) in {where}: {', '.join(map(str, unknown))} "
            f"(known: {', '.join(model.model_fields)})"
        )


def _check_local_models(config: MergeConfiguration) -> None:
    """A path-like model reference that names no directory is a typo, not a
    hub id; say so before mergekit tries the hub with it."""
    for model in config.referenced_models():
        path = model.model.path
        looks_local = path.startswith((".", "/", "~")) or os.sep + os.sep in path
        if looks_local and not os.path.isdir(os.path.expanduser(path)):
            raise UserError(f"model path not found: {path}")


def merge_to_disk(
    config: MergeConfiguration,
    out_path: str | os.PathLike,
    options: MergeOptions,
    config_source: Optional[str] = None,
) -> None:
    """Exactly what mergekit-yaml does, with the plugin's methods registered.
    mergekit's planner rewrites the config it is given, so it gets a copy."""
    run_merge(
        config.model_copy(deep=True), str(out_path), options=options, config_source=config_source
    )


def _cache_model_configs() -> None:
    """mergekit re-reads a model's config.json (AutoConfig.from_pretrained,
    a few ms) several times per merge; a search merges thousands of times.
    Local configs are cached by path and file mtime, and handed out as copies
    because mergekit edits the one it gets for the output model."""
    from mergekit.common import ModelReference

    if getattr(ModelReference.config, "_cached", False):
        return
    read = ModelReference.config
    cache: dict = {}

    def config(self, trust_remote_code: bool = False):
        path = os.path.join(self.model.path, "config.json")
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            return read(self, trust_remote_code=trust_remote_code)  # hub id: mergekit's way
        key = (self, trust_remote_code, stamp)
        if key not in cache:
            cache[key] = read(self, trust_remote_code=trust_remote_code)
        return copy.deepcopy(cache[key])

    config._cached = True
    ModelReference.config = config


_cache_model_configs()


def merge_in_memory(config: MergeConfiguration, options: MergeOptions) -> StateDict:
    """The merged state dict, through mergekit's planner and executor, with no
    disk write.

    mergekit 0.1.5's MergePlanner.plan_in_memory() raises: pydantic cannot
    validate ReturnTensor's abstract Task[Tensor] field. This is the one place
    that works around it, by planning with the planner's own _plan() and building
    the ReturnTensor targets without that validation. The planner mutates its
    config, so it gets a copy.

    Like run_merge, it seeds the global RNG with options.random_seed first, so a
    randomized method (DARE, DELLA) draws here exactly what `mergekit-yaml
    --random-seed` draws for the same recipe; the caller's RNG state is kept.
    """
    with keep_global_rng():
        if options.random_seed is not None:
            transformers.trainer_utils.set_seed(options.random_seed)
        return _merge_in_memory(config, options)


def _merge_in_memory(config: MergeConfiguration, options: MergeOptions) -> StateDict:
    LoaderCache().setup(options)
    arch_info = get_architecture_info(config, options)
    out_config = _model_out_config(
        config, arch_info, trust_remote_code=options.trust_remote_code
    )
    planner = MergePlanner(
        config.model_copy(deep=True), arch_info, options=options, out_model_config=out_config
    )
    planner._plan()
    targets = [
        ReturnTensor.model_construct(
            weight_info=weight, tensor_task=task, dtype=weight.force_dtype or config.out_dtype
        )
        for weight, task in planner._tensors
    ]
    executor = Executor(targets, math_device=options.device or "cpu", storage_device="cpu")
    return {task.weight_info.name: value for task, value in executor.run(quiet=True)}


def recipe_yaml(config: MergeConfiguration) -> str:
    return config.to_yaml()
