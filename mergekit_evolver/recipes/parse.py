"""Recipes as text and back: a mergekit config parsed and checked at the door
(unknown keys, local paths, DE donors, statistics), and written as YAML that
parses back to an equal config."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path

import yaml
from mergekit.config import InputModelDefinition, MergeConfiguration

import mergekit_evolver  # noqa: F401  (the plugin's methods must be registered)
from mergekit_evolver.errors import UserError
from mergekit_evolver.methods.de import check_recipe
from mergekit_evolver.stats.store import check_stats_recipe


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
    refuse_unknown(data, MergeConfiguration, "merge config")
    for i, entry in enumerate(data.get("models") or []):
        if isinstance(entry, dict):
            refuse_unknown(entry, InputModelDefinition, f"models[{i}]")


def refuse_unknown(data: dict, model: type, where: str) -> None:
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


def recipe_yaml(config: MergeConfiguration) -> str:
    """The recipe as mergekit YAML that parses back to an equal config.

    mergekit 0.1.5's to_yaml cannot be used: ModelReference's serializer
    returns the object itself for a path with a space (the dump then fails
    with "Circular reference detected"), and writes '+' and '@' in a path
    unescaped, which read back as a LoRA and a revision. Otherwise the text is
    exactly to_yaml's (same dumper, defaults left out), so recipes recorded by
    earlier runs compare equal."""
    from mergekit.config import ConfigYamlDumper

    return yaml.dump(_plain(config), Dumper=ConfigYamlDumper).rstrip()


def _plain(value):
    """model_dump(exclude_defaults=True, mode="json"), with model references
    written in a form that round-trips."""
    from mergekit.common import ModelPath, ModelReference
    from pydantic import BaseModel

    if isinstance(value, ModelReference):
        return _plain_reference(value)
    if isinstance(value, ModelPath):
        return _plain_path(value)
    if isinstance(value, BaseModel):
        out = {}
        for name, field in type(value).model_fields.items():
            item = getattr(value, name)
            if not field.is_required() and item == field.get_default(call_default_factory=True):
                continue
            out[name] = _plain(item)
        return out
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Enum):
        return value.value
    return value


def _reads_back(cls, text: str, value) -> bool:
    try:
        return cls.model_validate(text) == value
    except (ValueError, RuntimeError):  # mergekit raises RuntimeError on 'a+b+c'
        return False


def _plain_path(path) -> str | dict:
    from mergekit.common import ModelPath

    text = str(path)
    if _reads_back(ModelPath, text, path):
        return text
    out = {"path": path.path}
    if path.revision is not None:
        out["revision"] = path.revision
    return out


def _plain_reference(ref) -> str | dict:
    from mergekit.common import ModelReference

    text = str(ref)
    if ref.override_architecture is None and _reads_back(ModelReference, text, ref):
        return text
    out = {"model": _plain_path(ref.model)}
    if ref.lora is not None:
        out["lora"] = _plain_path(ref.lora)
    if ref.override_architecture is not None:
        out["override_architecture"] = ref.override_architecture
    return out
