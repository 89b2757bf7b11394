"""The one merge path: mergekit configs through mergekit's planner and executor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml
from mergekit.config import InputModelDefinition, MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

import mergekit_evolver  # noqa: F401  (the plugin's methods must be registered)
from mergekit_evolver.errors import UserError


def load_merge_config(path: str | os.PathLike) -> tuple[MergeConfiguration, str]:
    """Read and validate a mergekit YAML; returns the config and its source text."""
    source = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(source)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a merge config must be a YAML mapping")
    _check_known_keys(data)
    config = MergeConfiguration.model_validate(data)
    _check_local_models(config, Path(path).parent)
    return config, source


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


def _check_local_models(config: MergeConfiguration, config_dir: Path) -> None:
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
    """Exactly what mergekit-yaml does, with the plugin's methods registered."""
    run_merge(config, str(out_path), options=options, config_source=config_source)
