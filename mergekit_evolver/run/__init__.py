"""A whole run: the starting population, the search through the one candidate
loop, then the baselines, the final model, the report and the lineage."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from pathlib import Path
from typing import Iterator, Optional

from mergekit.config import MergeConfiguration

from mergekit_evolver.ledger import Candidate, Role, Status
from mergekit_evolver.recipes.parse import parse_merge_config, recipe_yaml
from mergekit_evolver.recipes.lineage import write_lineage
from mergekit_evolver.report.render import FINAL, model_card, write_report
from mergekit_evolver.run import finish
from mergekit_evolver.run.context import CONFIG_FILE, Log, Member, Run
from mergekit_evolver.run.loop import CandidateLoop

BEST_RECIPE_FILE = "best_recipe.yml"

__all__ = ["BEST_RECIPE_FILE", "Run", "evolve"]


@contextlib.contextmanager
def _long_lived_heap_frozen() -> Iterator[None]:
    """By the search, the model, tokenizer, lm-eval tasks and their requests
    are built, and they live until it ends: some 570K objects on the testbed,
    which each full cyclic collection walked again while candidates churned
    out garbage (1.7 s of a 25 s search). gc.freeze() keeps the collector off
    them; collected first so no garbage is frozen in, unfrozen afterwards.

    The set-up's whole states (the initial members, read and scored whole,
    and hashed) are freed by then, but glibc keeps freed heap pages mapped,
    and the search's RSS would carry them: 4.1 models' worth before the first
    bf16 1B candidate (benchmarks/real_size.py). malloc_trim gives them back."""
    gc.collect()
    _release_freed_heap()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _release_freed_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator keeps what it keeps


def evolve(config, run_dir: Path, *, resume: bool = False, log: Log = print) -> str:
    """The whole run; returns the result table."""
    if config.fuse is not None:
        fuse_first(config, Path(run_dir), resume, log)
    run = Run(config, run_dir, resume=resume, log=log)
    try:
        return _evolve(run, config, log)
    finally:
        run.close()


def fuse_first(config, run_dir: Path, resume: bool, log: Log) -> Path:
    """The `fuse:` section's fusion, run (or resumed, or found finished) before
    the run's door checks, which then see the fused model among the models."""
    from mergekit_evolver.errors import UserError
    from mergekit_evolver.fusion.run import META_FILE, fuse
    from mergekit_evolver.run.checks import check_run_dir

    out, run_dir = Path(config.fuse.out), Path(run_dir).resolve()
    if out == run_dir or run_dir in out.parents:
        raise UserError(f"fuse.out {out} is inside the run dir {run_dir}; put the fusion dir beside it")
    check_run_dir(run_dir, config, resume)  # a bad run dir is refused before hours of fusion
    return fuse(config.fuse.fusion(), out, resume=(out / META_FILE).is_file(), log=log)


def search(run: Run, members: list[Member]) -> tuple[list[Member], Optional[MergeConfiguration]]:
    """The configured strategy through the candidate loop. Returns the final
    members and, for a recipe search, the best recipe (then the final model's)."""
    name = run.config.strategy
    loop = CandidateLoop(run, members)
    outcome = loop.drive(run.strategy(name, members))
    if outcome.recipe is None:
        return [Member(m, loop.paths[m], f, loop.ids[m]) for m, f in zip(outcome.members, outcome.fitness)], None
    best = parse_merge_config(dict(outcome.recipe), where="search (best recipe)")
    write_best_recipe(run, best, outcome.fitness[0], outcome.best_step)
    if not (name == "recipe" and run.config.search.hybrid):
        return [Member("search_best", run.run_dir / BEST_RECIPE_FILE, outcome.fitness[0])], best
    # Hybrid: the best recipe's model joins the models, and the Evolver runs on.
    dest = run.population_dir / "search_best"
    generation = loop_generations(run)

    def seed_member() -> Candidate:
        run.materialize(best, dest)
        return Candidate(
            step="search/best", generation=generation, role=Role.MEMBER, status=Status.ACCEPTED,
            recipe=recipe_yaml(best), fitness=outcome.fitness[0], member=str(dest), note=outcome.best_step,
        )

    run.step("search/best", seed_member)
    # Its identity is the best candidate's, which the materialized recipe is, bit for bit.
    members = [*members, Member("search_best", dest, outcome.fitness[0], run.ledger.find(outcome.best_step).content_hash)]
    evolver = CandidateLoop(run, members, generation_offset=generation)
    final = evolver.drive(run.strategy("evolver", members))
    return [Member(m, evolver.paths[m], f, evolver.ids[m]) for m, f in zip(final.members, final.fitness)], None


def member_labels(paths: list[Path]) -> list[str]:
    """Report labels for the input models: each dir's name, with as many
    parent dirs as it takes to tell apart models whose dirs share a name (two
    fusion outputs are both `.../model`)."""
    depth = [1] * len(paths)
    while True:
        labels = [str(Path(*p.parts[-d:])) for p, d in zip(paths, depth)]
        shared = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(paths[i].parts)]
        if not shared:
            return labels
        for i in shared:
            depth[i] += 1


def loop_generations(run: Run) -> int:
    """Generations recorded so far: where a following stage's numbers start."""
    return len(run.ledger.generations())


def write_best_recipe(run: Run, best: MergeConfiguration, fitness: float, step: str) -> Path:
    """The best recipe as plain mergekit YAML, with how to reproduce the model."""
    path = run.run_dir / BEST_RECIPE_FILE
    header = (
        f"# The best recipe of this run: dev fitness {fitness:.6f} ({step}).\n"
        "# Plain mergekit (no plugin) writes the run's model from it bit for bit:\n"
        f"#   mergekit-yaml {BEST_RECIPE_FILE} OUT --random-seed {run.config.seed}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + recipe_yaml(best), encoding="utf-8")
    tmp.replace(path)
    return path


def _evolve(run: Run, config, log: Log) -> str:
    members = run.initial_members()
    with _long_lived_heap_frozen():
        final_members, final = search(run, members)
    inputs = [Path(p) for p in config.population.models]
    chosen = finish.baselines(run, inputs)
    if final is None:
        final = finish.final_recipe(run, final_members)
    model_dir = finish.write_model(run, final)
    labels = member_labels([Path(m.path) for m in members if m.id.startswith("m")])
    entries: list[tuple[str, MergeConfiguration | Path]] = [
        (labels.pop(0) if m.id.startswith("m") else m.id, m.path) for m in members
    ]
    entries += [(ref.name, Path(ref.model)) for ref in config.report.references]
    entries += [(name, recipe) for name, recipe, _ in chosen]
    entries.append((FINAL, final))
    finish.report(run, entries)
    table = write_report(run.run_dir, run.ledger, config.report)
    write_lineage(run.run_dir, recipe_yaml(final), run.ledger)
    (model_dir / "README.md").write_text(
        model_card((run.run_dir / CONFIG_FILE).read_text(), table, recipe_yaml(final)),
        encoding="utf-8",
    )
    run.ledger.set_meta("status", "complete")
    run.notify("finish", table)
    log(table)
    return table
