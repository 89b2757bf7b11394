"""Kinship-guided top-k greedy merging as a run: the glue between the pure
strategy (search/kinship_greedy.py) and the run's merge, score and ledger.

Each child is a pair recipe (recipes.pair_recipe: slerp by default, the fitter
parent as base_model) merged in memory and scored on dev fitness inside
`run.step("greedy/r001/p03")`, so a resumed run replays it instead of scoring
it again. A child that enters the top k when it is told is written at once to
population/<child id> (atomically, like an accepted offspring) and its row
holds its recipe and member path, so the final model's lineage replays. A child
pushed out of the top k by a later child of its own round was never a member
nor a parent; its dir is removed when the round ends.

Kinship (of the population after each round, for the log and the
stop_kinship test; of the best and its candidate partners before an
exploration round) is computed exactly by kinship.pairwise_kinship over the
members' deltas from population.base_model. Each request's result is kept in
the ledger's meta table under a key naming the request, so a resume reads the
same values instead of streaming the models again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path


from mergekit_evolver.kinship.metrics import pairwise_kinship
from mergekit_evolver.ledger.store import Candidate
from mergekit_evolver.merging.merge import recipe_yaml
from mergekit_evolver.population.store import write_individual
from mergekit_evolver.recipes.candidates import pair_recipe
from mergekit_evolver.run.context import Member, Run, write_generations_log
from mergekit_evolver.search.kinship_greedy import KinshipGreedy, Pair, Proposal, RoundSummary


def greedy_search(run: Run, members: list[Member]) -> list[Member]:
    """Run the greedy search from the scored starting members; returns the
    final population (top k, best first) with its dev fitness."""
    settings = run.config.greedy
    paths: dict[str, Path] = {m.id: Path(m.path) for m in members}
    strategy = KinshipGreedy(
        [m.id for m in members], [m.fitness for m in members],
        top_k=settings.top_k, max_rounds=settings.max_rounds,
        budget=settings.budget, stop_kinship=settings.stop_kinship,
    )
    started = time.perf_counter()
    while not strategy.done:
        need = strategy.kinship_needed()
        if need:
            strategy.add_kinship(kinship_of(run, strategy, need, paths))
        elif strategy.round_over:
            summary = strategy.end_round()
            for child in summary.displaced:
                shutil.rmtree(run.population_dir / child, ignore_errors=True)
                paths.pop(child, None)
            end_round(run, summary, time.perf_counter() - started)
            started = time.perf_counter()
        else:
            proposal = strategy.ask()
            candidate = run.step(proposal.step, lambda p=proposal: make_child(run, p, strategy, paths))
            if candidate.status == "accepted":
                paths[proposal.child] = Path(candidate.member)
            strategy.tell(proposal, candidate.fitness if candidate.status != "invalid" else None)
    return [Member(m, paths[m], strategy.fitness[m]) for m in strategy.population]


def child_recipe(run: Run, proposal: Proposal, paths: dict[str, Path]):
    settings = run.config.greedy
    template = {"merge_method": settings.merge_method, "parameters": dict(settings.parameters)}
    return pair_recipe(
        template, paths[proposal.base], paths[proposal.other],
        run.config.population.base_model, where=f"greedy ({settings.merge_method} of a pair)",
    )


def expect_next(run: Run, proposal: Proposal, strategy: KinshipGreedy, paths: dict[str, Path]) -> None:
    """Have the merge-ahead worker make the next child of this round while this
    one is scored: a round's pairs are planned when it starts, so the next one
    does not depend on this child's fitness."""
    if not run.ahead.enabled:
        return
    after = copy.deepcopy(strategy)
    after.tell(proposal, None)
    if after.done or after.round_over or after.kinship_needed():
        return
    upcoming = after.ask()
    if upcoming is not None and run.ledger.find(upcoming.step) is None:
        run.expect(recipe_yaml(child_recipe(run, upcoming, paths)))


def make_child(run: Run, proposal: Proposal, strategy: KinshipGreedy, paths: dict[str, Path]) -> Candidate:
    settings = run.config.greedy
    recipe = child_recipe(run, proposal, paths)
    note = None
    if proposal.kind == "explore":
        note = f"explore: kinship {proposal.kinship:.4f} ({settings.metric}) to the best"
    base = dict(
        step=proposal.step, generation=proposal.round, slot=proposal.index, role="offspring",
        recipe=recipe_yaml(recipe), parents=[proposal.base, proposal.other],
        operator=settings.merge_method, note=note,
    )
    weights = run.merge_candidate(recipe, proposal.step, base["recipe"])
    expect_next(run, proposal, strategy, paths)
    if weights.invalid:
        return Candidate(**base, status="invalid", merge_s=weights.merge_s, note=weights.invalid)
    state, merge_s = weights.state, weights.merge_s
    fitness, scores, seconds, _ = run.score(state, run.dev, weights.content_hash)
    member = None
    accepted = strategy.accepts(proposal, fitness)
    if accepted:
        dest = run.population_dir / proposal.child
        member = str(write_individual(state, dest, like=paths[proposal.base]))
    return Candidate(
        **base, status="accepted" if accepted else "rejected", fitness=fitness,
        dev=scores, member=member, merge_s=merge_s, eval_s=seconds,
    )


def kinship_of(run: Run, strategy: KinshipGreedy, pairs: list[Pair], paths: dict[str, Path]) -> dict[Pair, float]:
    """Kinship of every pair among the members the asked pairs name (one
    streaming pass over them), from the ledger when this request was made
    before. Members go in birth order, so a request is always spelled alike."""
    metric = run.config.greedy.metric
    ids = sorted({m for pair in pairs for m in pair}, key=lambda m: strategy.born[m])
    labels = [str(paths[m]) for m in ids]
    request = json.dumps([metric, run.config.population.base_model, labels])
    key = "greedy/kinship/" + hashlib.sha256(request.encode()).hexdigest()[:20]
    cached = run.ledger.get_meta(key)
    if cached is not None:
        rows = json.loads(cached)
    else:
        by_label = dict(zip(labels, ids))
        found = pairwise_kinship(labels, run.config.population.base_model, metrics=(metric,))
        rows = [[by_label[p["a"]], by_label[p["b"]], p[metric]] for p in found]
        run.ledger.set_meta(key, json.dumps(rows))  # NaN is spelled NaN and read back
    return {(a, b): value for a, b, value in rows}


def end_round(run: Run, summary: RoundSummary, seconds: float) -> None:
    stats = {**summary.stats(), "seconds": round(seconds, 3)}
    run.ledger.record_generation(summary.round, stats)
    write_generations_log(run.run_dir, run.ledger)
    kinship = "-" if summary.kinship is None else f"{summary.kinship:.4f}"
    line = (
        f"greedy round {summary.round} ({summary.kind}): best {stats['best']:.4f} "
        f"mean {stats['mean']:.4f} min {stats['min']:.4f}, kept {summary.kept}/{summary.evaluated}, "
        f"kinship {kinship}"
    )
    if summary.stopped:
        line += f"; stop: {summary.stopped}"
    run.log(line)
