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
    from mergekit_evolver.config.load import load_yaml

    return parse_merge_config(load_yaml(source, str(path)), where=str(path)), source


def parse_merge_config(data: object, where: str = "merge config") -> MergeConfiguration:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a merge config must be a YAML mapping")
    _check_known_keys(data)
    config = MergeConfiguration.model_validate(data)
    _check_dtypes(config, where)
    _check_local_models(config)
    _check_parameters(config, where)
    # The plugin's own checks first: they name DE donor roles and statistics.
    check_recipe(config)
    check_stats_recipe(config)
    _check_input_count(config, where)
    return config


def _check_dtypes(config: MergeConfiguration, where: str) -> None:
    from mergekit.common import dtype_from_name

    for field in ("dtype", "out_dtype"):
        name = getattr(config, field)
        try:
            dtype_from_name(name)
        except RuntimeError:
            raise UserError(
                f"{where}: unknown {field} {name!r} (one of bfloat16, float16, float32, float64)"
            ) from None


def _method_spec(config: MergeConfiguration):
    from mergekit import merge_methods

    try:
        return merge_methods.get(config.merge_method).spec
    except RuntimeError:
        return None  # an unknown method: mergekit names it


def _check_parameters(config: MergeConfiguration, where: str) -> None:
    """mergekit ignores a parameter its method does not take, so a misspelt
    `crossver:` would merge with the default; refuse it, naming what it takes."""
    spec = _method_spec(config)
    if spec is None:
        return
    given = set(config.parameters or {})
    for model in config.models or []:
        given |= set(model.parameters or {})
    for piece in config.slices or []:
        given |= set(piece.parameters or {})
        for source in piece.sources:
            given |= set(source.parameters or {})
    known = [p.name for p in spec.parameters]
    unknown = sorted(given - set(known))
    if unknown:
        raise UserError(
            f"{where}: {config.merge_method} takes no parameter {', '.join(unknown)} "
            f"(it takes: {', '.join(known) or 'none'})"
        )


def _check_input_count(config: MergeConfiguration, where: str) -> None:
    """How many models the method merges, checked before mergekit plans it:
    mergekit says so only per slice, without naming the recipe."""
    spec = _method_spec(config)
    if spec is None or not config.models:
        return
    inputs = {str(m.model) for m in config.models}
    if config.base_model is not None:
        inputs.add(str(config.base_model))
    low, high = spec.contract.min_inputs, spec.contract.max_inputs
    if len(inputs) < (low or 0) or (high is not None and len(inputs) > high):
        span = f"exactly {low}" if low == high else f"{low} to {high}" if high is not None else f"at least {low}"
        raise UserError(
            f"{where}: {config.merge_method} merges {span} models (base_model included); "
            f"this recipe gives it {len(inputs)}"
        )


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
