"""`fuse:` in a run config: fuse first, then merge (FuseChat's order) in one config.

The section names a fusion config (a file `mergekit-evolver fuse` reads, or
the same mapping inline) and the fusion dir. The run fuses before its door
checks, resuming the fusion that dir holds, and the fused target
(`<out>/model`) joins population.models as its last model. The fusion dir
must lie outside the run dir, which a new run needs empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import field_validator

from mergekit_evolver.config.base import Strict
from mergekit_evolver.config.paths import model_path


class FuseSection(Strict):
    config: Union[str, dict[str, Any]]
    out: str

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        return model_path(value)

    @field_validator("config")
    @classmethod
    def _valid(cls, value: Union[str, dict]) -> Union[str, dict]:
        from mergekit_evolver.errors import UserError
        from mergekit_evolver.fusion.config import load_fusion_config, parse_fusion_config

        try:
            if isinstance(value, str):
                value = model_path(value)
                load_fusion_config(value)
            else:
                parse_fusion_config(value, "fuse.config")
        except UserError as error:
            raise ValueError(str(error)) from None
        return value

    def fusion(self):
        from mergekit_evolver.fusion.config import load_fusion_config, parse_fusion_config

        if isinstance(self.config, str):
            return load_fusion_config(self.config)
        return parse_fusion_config(self.config, "fuse.config")

    @property
    def model_dir(self) -> str:
        return str(Path(self.out) / "model")


def fused_model_joins_population(config) -> None:
    """The fused target is the population's last model (added once)."""
    if config.fuse is None:
        return
    fused = config.fuse.model_dir
    if fused not in config.population.models:
        config.population.models.append(fused)
