"""Paths as a user types them: ~ and environment variables (`${TESTBED}/base`)
expand, so one example config serves any testbed location."""

from __future__ import annotations

import os


def expand_path(value: str) -> str:
    return os.path.expanduser(os.path.expandvars(value))


def model_path(value: str) -> str:
    """Absolute, so recorded recipes replay from any directory (and mergekit's
    model card never mistakes a relative dir for a hub id)."""
    return os.path.abspath(expand_path(value))
