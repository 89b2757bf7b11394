"""Reading a run config from a file: our own format, or mergekit-evolve's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from mergekit_evolver.config.run_config import EvolveConfig
from mergekit_evolver.errors import UserError


class _UniqueKeys(yaml.SafeLoader):
    """A YAML mapping that names a key twice is refused: PyYAML keeps the last
    silently, so a pasted-over setting would be dropped without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str):
    """A user's YAML document; malformed YAML is a UserError naming `where`."""
    try:
        return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: malformed YAML: {problem}{at}") from None


def load_evolve_config(path: str | os.PathLike, evolve_flags: Optional[dict] = None) -> EvolveConfig:
    """A run config, or a mergekit-evolve config mapped onto one; evolve_flags
    are mergekit-evolve's command-line options (for its configs only)."""
    from mergekit_evolver.recipes.evolve_compat import (
        apply_evolve_flags,
        from_mergekit_evolve,
        is_mergekit_evolve_config,
    )

    path = Path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a run config must be a YAML mapping")
    flags = {k: v for k, v in (evolve_flags or {}).items() if v not in (None, (), False)}
    if is_mergekit_evolve_config(data):
        allow = bool(flags.pop("allow_benchmarks", False))
        mapped = from_mergekit_evolve(data, where=str(path), allow_benchmarks=allow)
        data = apply_evolve_flags(mapped, flags)
    elif flags:
        names = ", ".join("--" + k.replace("_", "-") for k in sorted(flags))
        raise UserError(f"{names}: mergekit-evolve options, for mergekit-evolve configs only")
    return EvolveConfig.model_validate(data)
