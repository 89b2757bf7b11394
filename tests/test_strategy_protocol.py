"""The search protocol seen from outside: a strategy registered in one line
runs through the one candidate loop, and strategies import no run machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger, Role, Status
from mergekit_evolver.run import evolve
from mergekit_evolver.search.protocol import Strategy
from mergekit_evolver.search.registry import STRATEGIES
from lineage_check import same_tensors
from toy_world import run_config

PACKAGE = Path(__file__).resolve().parent.parent / "mergekit_evolver"


@pytest.fixture(scope="module")
def world(shared_world):
    return shared_world  # read only: runs write under their own tmp dirs


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_strategies_import_nothing_from_the_run_scoring_or_merging():
    for path in sorted((PACKAGE / "search").glob("*.py")):
        bad = {m for m in imported_modules(path)
               if m.startswith(("mergekit_evolver.run", "mergekit_evolver.scoring", "mergekit_evolver.merging"))}
        assert not bad, f"{path.name} imports {bad}"


def test_no_module_outside_run_drives_candidates():
    """The candidate loop's calls (strategy ask/tell, ledger records) live in run/ only."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name in ("run", "search", "ledger"):
            continue
        text = path.read_text(encoding="utf-8")
        assert ".record(" not in text and "strategy.ask(" not in text, path


def test_every_registered_strategy_speaks_the_protocol(world):
    from mergekit_evolver.search.protocol import Start

    config = EvolveConfig.model_validate(run_config(world, strategy="kinship_greedy"))
    start = Start(config, ("m0", "m1", "m2", "m3"), (0.1, 0.2, 0.3, 0.4), tuple(map(str, world.models)), num_layers=2)
    for name, build in STRATEGIES.items():
        assert isinstance(build(start), Strategy), name


def test_the_example_random_search_runs_resumes_and_exports(world, tmp_path):
    config = run_config(world, strategy="random", search={"merge_method": "task_arithmetic", "budget": 5})
    out = tmp_path / "random"
    evolve(EvolveConfig.model_validate(config), out, log=lambda _: None)
    rows = Ledger(out).candidates(Role.SEARCH)
    assert [r.step for r in rows] == [f"random/e{k:04d}" for k in range(5)]
    assert all(r.status == Status.SCORED and r.content_hash for r in rows)
    assert len({r.recipe for r in rows}) == 5  # five different draws
    best = max(rows, key=lambda r: (r.fitness, -rows.index(r)))
    exported = yaml.safe_load((out / "best_recipe.yml").read_text())
    assert exported == yaml.safe_load(best.recipe)
    assert [g["generation"] for g in Ledger(out).generations()] == list(range(5))
    # The same seed gives the same draws and model; a finished run replays.
    again = tmp_path / "again"
    evolve(EvolveConfig.model_validate(config), again, log=lambda _: None)
    assert [r.recipe for r in Ledger(again).candidates(Role.SEARCH)] == [r.recipe for r in rows]
    assert same_tensors(out / "model", again / "model")
    evolve(EvolveConfig.model_validate(config), out, resume=True, log=lambda _: None)
    assert len(Ledger(out).candidates(Role.SEARCH)) == 5


def test_an_unknown_strategy_is_refused_with_the_known_ones(world):
    with pytest.raises(Exception, match="unknown strategy 'nope'; choose one of evolver, kinship_greedy, recipe, random"):
        EvolveConfig.model_validate(run_config(world, strategy="nope"))
