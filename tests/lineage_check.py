"""The lineage check shared by strategy tests: every recipe replays to its tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner

from mergekit_evolver.cli import main
from mergekit_evolver.ledger import Ledger
from tiny_models import load_tensors


def same_tensors(a: Path, b: Path) -> bool:
    got, want = load_tensors(a), load_tensors(b)
    return set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def assert_lineage_replays(run_dir: Path, scratch: Path) -> None:
    """Replay each lineage recipe with `mergekit-evolver yaml` (in this process:
    a fresh interpreter per recipe cost seconds of imports each); each must
    give the stored member's tensors (the last one, the final model's)."""
    lineage = sorted((run_dir / "lineage").glob("*.yml"))
    assert len(lineage) >= 2, "a real chain, not the final recipe alone"
    made = {c.recipe: c.member for c in Ledger(run_dir).candidates() if c.member and c.recipe}
    for recipe in lineage:
        replay = scratch / recipe.stem
        done = CliRunner().invoke(main, ["yaml", str(recipe), str(replay), "--quiet"])
        assert done.exit_code == 0, done.output
        expected = run_dir / "model" if recipe.stem.endswith("final") else Path(made[recipe.read_text()])
        assert same_tensors(replay, expected), recipe.name
