from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_model  # noqa: E402


@pytest.fixture(scope="session")
def population(tmp_path_factory) -> list[Path]:
    """Five tiny models of one architecture: x and four donors."""
    root = tmp_path_factory.mktemp("population")
    return [make_model(root / f"m{i}", seed=100 + i) for i in range(5)]
