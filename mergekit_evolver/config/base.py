"""What every run-config section shares: strictness, and how a rule that spans
sections becomes a validator of the whole run config."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, model_validator

# The whole run config (config/run_config.py EvolveConfig), as the rules beside
# each section see it: named, not imported, so no section imports the config
# that is built from it.
RunConfig = Any


class Strict(BaseModel):
    # Frozen: a run's identity (its digest) is taken once, so nothing may
    # change the config afterwards. Forbid: a misspelt key is an error, never a
    # silently used default.
    model_config = ConfigDict(extra="forbid", frozen=True)


Rule = Callable[[RunConfig], None]


def rule(check: Rule) -> Any:
    """An EvolveConfig validator from `check`, a function that raises
    ValueError when its one rule is broken. The check lives beside the section
    it is about; EvolveConfig lists the rules in the order they are checked."""

    def validate(config: RunConfig) -> RunConfig:
        check(config)
        return config

    validate.__name__ = validate.__qualname__ = check.__name__
    validate.__doc__ = check.__doc__
    return model_validator(mode="after")(validate)
