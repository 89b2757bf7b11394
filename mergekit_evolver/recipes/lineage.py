"""The final model's lineage: the chain of mergekit recipes that made it.

Each individual in the ancestry has the recipe that produced it, over parent
dirs in the run's population. Written parents-first as plain YAML files, each
replays with `mergekit-evolver yaml` to the same tensors as the stored member.
"""

from __future__ import annotations

from pathlib import Path

import os

import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolver.ledger import Ledger

LINEAGE_DIR = "lineage"


def referenced_paths(recipe: str) -> list[str]:
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe))
    # A best/1 target that is also a donor appears a second time as "dir/.".
    return [os.path.normpath(m.model.path) for m in config.referenced_models()]


def ancestry(final_recipe: str, ledger: Ledger) -> list[tuple[str, str]]:
    """(member path, recipe) of every made individual the final recipe depends
    on, parents before children. Input models (no recipe) end the chain."""
    made = {c.member: c.recipe for c in ledger.candidates() if c.member and c.recipe}
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(recipe: str) -> None:
        for path in referenced_paths(recipe):
            if path in made and path not in seen:
                seen.add(path)
                visit(made[path])
                order.append((path, made[path]))

    visit(final_recipe)
    return order


def write_lineage(run_dir: Path, final_recipe: str, ledger: Ledger) -> Path:
    out = Path(run_dir) / LINEAGE_DIR
    out.mkdir(exist_ok=True)
    chain = ancestry(final_recipe, ledger)
    lines = ["# Replay parents first; each recipe reproduces the member named beside it.", ""]
    for i, (member, recipe) in enumerate(chain):
        name = f"{i:03d}_{Path(member).name}.yml"
        (out / name).write_text(recipe, encoding="utf-8")
        lines.append(f"mergekit-evolver yaml {LINEAGE_DIR}/{name} OUT   # == {member}")
    final_name = f"{len(chain):03d}_final.yml"
    (out / final_name).write_text(final_recipe, encoding="utf-8")
    lines.append(f"mergekit-evolver yaml {LINEAGE_DIR}/{final_name} OUT   # == model/")
    (out / "README.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out
