"""The one merge path: mergekit configs through mergekit's planner and executor."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
import transformers
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache, ReturnTensor
from mergekit.merge import _model_out_config, run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

import mergekit_evolver  # noqa: F401  (the plugin's methods must be registered)
from mergekit_evolver.population.store import StateDict, check_same_shapes, read_json, require_safetensors
from mergekit_evolver.recipes.parse import recipe_yaml
from mergekit_evolver.rng import keep_global_rng



def _check_model_files(config: MergeConfiguration) -> None:
    """Every local model (and LoRA) dir the merge reads: weights that are
    safetensors with sound headers, and a config.json that parses. mergekit
    would unpickle a pytorch_model.bin, and trace back on a cut-short file or
    broken JSON. Not part of parsing: a search parses a recipe per candidate,
    over dirs it has checked already."""
    weights = []
    for model in config.referenced_models():
        for part in (model.model, model.lora):
            local = os.path.expanduser(part.path) if part is not None else ""
            if not os.path.isdir(local):
                continue  # a hub id: the index reader's guard covers its download
            # missing_ok: a dir with no weights at all keeps mergekit's own error.
            if require_safetensors(local, missing_ok=True) and part is model.model:
                weights.append(Path(local))
            if os.path.isfile(os.path.join(local, "config.json")):
                read_json(Path(local) / "config.json")
    # A tokenizer setting lets mergekit align vocabulary axes; the rest must match.
    if weights and config.tokenizer_source is None and config.tokenizer is None:
        for other in weights[1:]:
            check_same_shapes(weights[0], other, names_too=False)


def merge_to_disk(
    config: MergeConfiguration,
    out_path: str | os.PathLike,
    options: MergeOptions,
    config_source: Optional[str] = None,
) -> None:
    """Exactly what mergekit-yaml does, with the plugin's methods registered.
    mergekit's planner rewrites the config it is given, so it gets a copy.
    The config written beside the model is recipe_yaml's: mergekit's own
    to_yaml fails on a model path with a space."""
    _check_model_files(config)
    run_merge(
        config.model_copy(deep=True),
        str(out_path),
        options=options,
        config_source=config_source or recipe_yaml(config),
    )


def _guard_index_reader() -> None:
    """mergekit's ShardedTensorIndex.from_disk torch.loads a pytorch_model.bin
    to list its tensors. merge_to_disk checks local dirs up front; this
    covers the dirs it cannot see beforehand (hub snapshots mergekit
    downloads), in every process that merges through this module."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    read = ShardedTensorIndex.from_disk.__func__
    if getattr(read, "_guarded", False):
        return

    def from_disk(cls, base_path: str) -> ShardedTensorIndex:
        # missing_ok: a dir with no weights keeps mergekit's own error.
        require_safetensors(base_path, missing_ok=True)
        return read(cls, base_path)

    from_disk._guarded = True
    ShardedTensorIndex.from_disk = classmethod(from_disk)


_guard_index_reader()


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
    return dict(merge_tensors(config, options))


def merge_tensors(config: MergeConfiguration, options: MergeOptions) -> Iterator[tuple[str, torch.Tensor]]:
    """The merge as mergekit's executor makes it: each output tensor, by name,
    as soon as it is done, so a caller that copies it away (the resident
    model, scoring/evaluator.py) never holds the whole merged model. The
    global RNG is the merge's until the last tensor is out (or the stream is
    closed), then the caller's again."""
    with keep_global_rng():
        if options.random_seed is not None:
            transformers.trainer_utils.set_seed(options.random_seed)
        yield from _merge_stream(config, options)


def _merge_stream(config: MergeConfiguration, options: MergeOptions) -> Iterator[tuple[str, torch.Tensor]]:
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
    for task, value in executor.run(quiet=True):
        yield task.weight_info.name, value
