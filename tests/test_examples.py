"""The shipped example configs stay valid as the config schema moves."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_evolver.config import load_evolve_config

EXAMPLES = Path(__file__).resolve().parent.parent / "mergekit_evolver" / "examples"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yml") if p.name != "fuse.yml"))  # fuse.yml: test_fusion
def test_example_config_loads(name, monkeypatch):
    monkeypatch.setenv("TESTBED", "/testbed")
    config = load_evolve_config(EXAMPLES / name)
    assert all(m.startswith("/testbed/models/spec_") for m in config.population.models)
    if name == "mergekit_evolve.yml":
        assert (config.strategy, config.search.optimizer, config.search.budget) == ("recipe", "cmaes", 100)
