"""Session-wide model worlds, built once and shared by every module that only
reads them. A test that writes (a merge output, stats, a copy to damage) writes
under its own tmp_path, never into these dirs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_model  # noqa: E402

if TYPE_CHECKING:
    from toy_world import ToyWorld


@pytest.fixture(scope="session")
def population(tmp_path_factory) -> list[Path]:
    """Five tiny models of one architecture: x and four donors."""
    root = tmp_path_factory.mktemp("population")
    return [make_model(root / f"m{i}", seed=100 + i) for i in range(5)]


@pytest.fixture(scope="session")
def shared_world(tmp_path_factory) -> ToyWorld:
    """toy_world.make_world's four models, base and tasks (tiny Llamas with the
    testbed tokenizer)."""
    # Imported here: toy_world pulls in mergekit, which cheap modules never need.
    from toy_world import make_world

    return make_world(tmp_path_factory.mktemp("shared_world"))


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory):
    """The TINY testbed (trained models, lm-eval tasks, score table)."""
    # Imported here, like make_world above, so that modules without it skip mergekit's import.
    from mergekit_evolver.testbed import TINY, build_testbed

    return build_testbed(tmp_path_factory.mktemp("tiny_testbed"), TINY, log=None)
