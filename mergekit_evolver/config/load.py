"""Reading a run config from a file: our own format, or mergekit-evolve's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import yaml

from mergekit_evolver.config.run_config import EvolveConfig
from mergekit_evolver.errors import UserError


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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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
