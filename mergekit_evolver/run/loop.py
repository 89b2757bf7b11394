"""The one candidate loop: a strategy's proposal -> merge -> checks -> score ->
tell -> write -> ledger, for every strategy. The loop owns every side effect
(ledger rows, population files, log lines, progress bars); a strategy only
proposes and learns (search/protocol.py).

A proposal whose step is in the ledger is replayed: the strategy is told the
recorded result, and the recipe it asked for must be the recorded one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from mergekit.config import MergeConfiguration
from tqdm import tqdm

from mergekit_evolver.kinship.metrics import pairwise_kinship
from mergekit_evolver.ledger import Candidate, Role, Status
from mergekit_evolver.merging.identity import derived_identity
from mergekit_evolver.recipes.parse import parse_merge_config, recipe_yaml
from mergekit_evolver.population.cache import POPULATION_CACHE
from mergekit_evolver.population.store import write_individual
from mergekit_evolver.run.context import Member, Run
from mergekit_evolver.run.executor import Evaluated
from mergekit_evolver.scoring.racing import Bar
from mergekit_evolver.search.protocol import (
    CANDIDATE,
    MEMBER,
    REJECTED,
    KinshipRequest,
    Outcome,
    Proposal,
    Result,
    Strategy,
)

_REFERENCE_KEYS = ("model", "base_model")


def substitute(
    data: Any, member: Callable[[str], str], candidate: Optional[str], other: Callable[[str], str] = str,
    key: Optional[str] = None,
) -> Any:
    """Recipe data with each member reference (under `model` or
    `base_model`) replaced by `member`(its id), CANDIDATE by `candidate`,
    and any other model there by `other`(its path)."""
    if isinstance(data, Mapping):
        return {k: substitute(v, member, candidate, other, k) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [substitute(v, member, candidate, other, key) for v in data]
    if key in _REFERENCE_KEYS and isinstance(data, str):
        if data == CANDIDATE:
            return candidate
        if data.startswith(MEMBER):
            name, sep, rest = data[len(MEMBER):].partition("/")
            return member(name) + sep + rest
        return other(data)
    return data


class CandidateLoop:
    def __init__(self, run: Run, members: list[Member], *, generation_offset: int = 0):
        self.run = run
        self.paths: dict[str, Path] = {m.id: Path(m.path) for m in members}
        # Each member's identity (merging/identity.py), what candidates' identities are derived from.
        self.ids: dict[str, Optional[str]] = {m.id: m.content_id for m in members}
        self._members = [m.id for m in members]  # the population at the last generation's end
        # Generation numbers of a weight-space stage after a recipe search.
        self.generation_offset = generation_offset
        self._memo: dict[str, tuple[MergeConfiguration, str]] = {}

    # -- the loop ---------------------------------------------------------------
    def drive(self, strategy: Strategy) -> Outcome:
        bar = tqdm(total=getattr(strategy, "expected", None), desc="candidates", unit="cand", leave=False)
        started = time.perf_counter()
        try:
            while True:
                request = strategy.needs()
                if request is not None:
                    strategy.give(request, self.kinship(request))
                    continue
                proposal = strategy.ask()
                if proposal is not None:
                    self.carry(strategy, proposal)
                    bar.update(1)
                elif strategy.done:
                    break
                else:
                    self.end_generation(strategy, time.perf_counter() - started)
                    started = time.perf_counter()
        finally:
            bar.close()
        return strategy.result()

    def carry(self, strategy: Strategy, proposal: Proposal) -> Candidate:
        """One candidate, from the proposal to its ledger row."""
        recipe, text = self.recipe(proposal.recipe, proposal.step)
        ledger = self.run.ledger
        row = ledger.find(proposal.step)
        if row is not None:
            if row.recipe != text:
                raise RuntimeError(f"{proposal.step}: the ledger holds another recipe; the run cannot be replayed")
            if row.status in (Status.INVALID, Status.FAILED):
                told = Result(None)
            else:
                told = Result(row.fitness, row.dev, raced=row.status == Status.RACED)
            accepted = strategy.tell(proposal, told)
            if proposal.child is not None and accepted != (row.status == Status.ACCEPTED):
                raise RuntimeError(f"{proposal.step}: the replayed decision differs from the ledger's")
        else:
            # One transaction (one fsync) for the row and the scores it cached.
            with ledger.transaction():
                row, accepted = self._compute(strategy, proposal, recipe, text)
                ledger.record(row)
            self.run.notify("candidate", row)
        if accepted and proposal.child is not None:
            self.paths[proposal.child] = Path(row.member)
            self.ids[proposal.child] = row.content_hash
        return row

    def _compute(
        self, strategy: Strategy, proposal: Proposal, recipe: MergeConfiguration, text: str
    ) -> tuple[Candidate, bool]:
        run = self.run
        base = dict(
            step=proposal.step, generation=proposal.generation, slot=proposal.slot,
            role=Role(proposal.role), recipe=text, parents=list(proposal.parents),
            operator=proposal.operator, F=proposal.F, CR=proposal.CR, seed=proposal.seed,
        )
        if run.executor.remote:
            got = run.executor.evaluate(self, strategy, proposal, text)
        else:
            got = self._evaluate_here(strategy, proposal, recipe, text)
        if got.error is not None:
            run.log(f"{proposal.step}: failed, {got.error}")
            strategy.tell(proposal, REJECTED)
            return Candidate(**base, status=Status.FAILED, merge_s=got.merge_s, note=f"failed: {got.error}"), False
        if got.non_finite is not None:
            run.log(f"{proposal.step}: rejected, non-finite values in {got.non_finite}")
            strategy.tell(proposal, REJECTED)
            note = f"non-finite: {got.non_finite}"
            return Candidate(**base, status=Status.INVALID, merge_s=got.merge_s, note=note), False
        scored, bar = got.scored, self.bar(proposal)
        raced = not scored.complete
        accepted = strategy.tell(proposal, Result(scored.fitness, scored.scores, raced=raced))
        if raced and accepted:
            raise RuntimeError(f"{proposal.step}: a raced-out candidate was accepted; its bar was wrong")
        holder = self.holds(proposal, accepted)
        if holder is not None:
            run.keep_reference(holder, scored)
        member = None
        if accepted and proposal.child is not None:
            dest = run.population_dir / proposal.child
            member = str(got.keep(dest, self.paths[proposal.like]))
        else:
            got.release()
        note = proposal.note
        if raced:
            status = Status.RACED
            done, total = scored.documents
            note = (
                f"raced out after {done} of {total} documents: at best {scored.fitness:.6g}, "
                f"which cannot pass its bar {bar.value:.6g}"
            )
        elif proposal.child is None:
            status = Status.SCORED
        else:
            status = Status.ACCEPTED if accepted else Status.REJECTED
        if scored.estimated:
            done, total = scored.documents or (None, None)
            said = f"estimated from {done} of {total} documents" if done else "estimated (fitness.subset)"
            note = f"{note}; {said}" if note else said
        row = Candidate(
            **base, status=status, fitness=scored.fitness, dev=scored.scores, member=member,
            merge_s=got.merge_s, eval_s=scored.seconds, note=note, content_hash=got.digest,
        )
        return row, accepted

    def _evaluate_here(
        self, strategy: Strategy, proposal: Proposal, recipe: MergeConfiguration, text: str
    ) -> Evaluated:
        run = self.run
        digest = self.identity(proposal.recipe)
        if proposal.score_in is None:
            return self._stream_here(strategy, proposal, recipe, text, digest)
        start = time.perf_counter()
        merged = run.executor.candidate(recipe, text)
        merge_s = time.perf_counter() - start
        self.expect_next(strategy, proposal)
        if merged.non_finite is not None:
            return Evaluated(merge_s, digest, merged.non_finite)
        # Merged selection: the population merged around the candidate, served
        # from memory, streamed into the resident model and scored there.
        state = merged.state
        ref = run.slot.serve(state)
        start = time.perf_counter()
        try:
            around = self.recipe(proposal.score_in, proposal.step, ref.model.path)[0]
            streamed = run.executor.merge_into(run.evaluator.resident, around)
        finally:
            run.slot.clear()
        merge_s += time.perf_counter() - start
        if streamed.non_finite is not None:
            return Evaluated(merge_s, digest, streamed.non_finite)
        scored = self.score(proposal, None, self.identity(proposal.score_in, digest))
        return Evaluated(
            merge_s, digest, scored=scored,
            keep=lambda dest, like: write_individual(state, dest, like=like),
        )

    def _stream_here(
        self, strategy: Strategy, proposal: Proposal, recipe: MergeConfiguration, text: str, digest: str
    ) -> Evaluated:
        """A candidate merged straight into the resident model and scored
        there. Kept, it is written from the resident copy where that holds its
        exact bits, else merged again (a merge is a function of its recipe)."""
        run = self.run
        resident = run.evaluator.resident
        start = time.perf_counter()
        streamed, whole = run.executor.candidate_into(resident, recipe, text)
        merge_s = time.perf_counter() - start
        self.expect_next(strategy, proposal)
        if streamed.non_finite is not None:
            return Evaluated(merge_s, digest, streamed.non_finite)
        scored = self.score(proposal, None, digest)

        def keep(dest: Path, like: Path) -> Path:
            if whole is None and not streamed.exact:
                return run.executor.write(recipe, dest, like)
            return write_individual(whole if whole is not None else resident.state(streamed.names), dest, like=like)

        return Evaluated(merge_s, digest, scored=scored, keep=keep)

    def score(self, proposal: Proposal, state, digest: Optional[str]):
        """A candidate's dev scores. With a fitness subset, its estimate first:
        below its bar, the candidate is rejected on it; without a bar and with
        nothing to keep, it is ranked on it; otherwise it is scored in full, so
        that every member's fitness (and every DE target's) is a full score."""
        run = self.run
        kept = proposal.child is not None or proposal.sets_bar
        if run.subset is not None and (proposal.bar is not None or not kept):
            # Paired with the bar's reference (its parent, for an offspring), where there is one.
            estimate = run.score(state, digest=digest, bar=self.bar(proposal), estimate=True)
            if proposal.bar is None or not Bar(proposal.bar, proposal.bar_strict).passed_by(estimate.fitness):
                return estimate
        return run.score(state, digest=digest, bar=self.bar(proposal))

    def bar(self, proposal: Proposal) -> Optional[Bar]:
        """The bar to race a proposal against: its own, where racing is on,
        with the reference statistical racing pairs it with."""
        racing = self.run.config.fitness.racing
        if racing.mode == "off" or proposal.bar is None:
            return None
        return Bar(proposal.bar, proposal.bar_strict, self.run.reference(self.paired_with(proposal)))

    @staticmethod
    def paired_with(proposal: Proposal) -> str:
        """The reference most like what is scored: the best merged population
        for a merged score, the parent for an offspring, else the last model
        accepted. Any fully scored model gives a valid test; a close one a
        tight one."""
        if proposal.score_in is not None:
            return "merged"
        return proposal.like if proposal.like is not None else "accepted"

    @staticmethod
    def holds(proposal: Proposal, accepted: bool) -> Optional[str]:
        """Which reference a scored proposal becomes (None: none)."""
        if proposal.role == "merged" or (accepted and proposal.score_in is not None):
            return "merged"
        if accepted:
            return proposal.child if proposal.child is not None else "accepted"
        return None

    def end_generation(self, strategy: Strategy, seconds: float) -> None:
        end = strategy.end_generation()
        for child in end.dropped:
            shutil.rmtree(self.run.population_dir / child, ignore_errors=True)
            if child in self.paths:
                POPULATION_CACHE.forget(str(self.paths.pop(child)))
        if "members" in end.stats:
            members = list(end.stats["members"])
            leavers = sorted(set(self._members) - set(members))
            self.run.forget_references(leavers)
            for leaver in leavers:
                if leaver in self.paths:
                    POPULATION_CACHE.forget(str(self.paths[leaver]))
            self._members = members
        stats = {**end.stats, "seconds": round(seconds, 3)}
        self.run.ledger.record_generation(self.generation_offset + end.generation, stats)
        self.run.notify("generation", self.generation_offset + end.generation, stats)
        self.run.log(end.line)

    def expect_next(self, strategy: Strategy, proposal: Proposal) -> None:
        """Have the merge-ahead worker make the candidate after this one while
        this one is scored: a copy of the strategy, told that this one was
        rejected, says what it would ask next. A wrong guess is merged again
        here; a guess that needs an input from the run is not made."""
        if not self.run.executor.ahead_enabled:
            return
        after = copy.deepcopy(strategy)
        after.tell(proposal, REJECTED)
        upcoming = after.ask()
        if upcoming is None:
            if after.done or after.needs() is not None:
                return
            after.end_generation()
            if after.done or after.needs() is not None:
                return
            upcoming = after.ask()
        if upcoming is None or self.run.ledger.find(upcoming.step) is not None:
            return
        self.run.executor.expect(*self.recipe(upcoming.recipe, upcoming.step))

    # -- what the loop gives a strategy -----------------------------------------
    def recipe(
        self, data: Mapping[str, Any], where: str, candidate: Optional[str] = None
    ) -> tuple[MergeConfiguration, str]:
        """A proposal's recipe over the members' dirs, parsed, and its YAML (the
        last one is kept: a candidate merged ahead is built twice)."""
        resolved = self._resolve(data, candidate)
        key = json.dumps(resolved, sort_keys=True, default=str)
        if key not in self._memo:
            if len(self._memo) > 4:
                self._memo.clear()
            recipe = parse_merge_config(resolved, where=where)
            self._memo[key] = (recipe, recipe_yaml(recipe))
        return self._memo[key]

    def _resolve(self, data: Any, candidate: Optional[str]) -> Any:
        """A recipe over the members' dirs (CANDIDATE: `candidate`)."""
        return substitute(data, lambda member: str(self.paths[member]), candidate)

    def identity(self, data: Mapping[str, Any], candidate: Optional[str] = None) -> str:
        """A recipe's candidate identity, derived from the members' (CANDIDATE:
        `candidate`, the identity of the candidate a merged score is around)."""

        def of(member: str) -> str:
            if self.ids.get(member) is None:
                raise RuntimeError(f"member {member} has no identity to derive a candidate's from")
            return self.ids[member]

        options = self.run.options
        named = substitute(data, of, candidate, self.run.model_identity)
        return derived_identity(named, device=options.device, seed=options.random_seed)

    def kinship(self, request: KinshipRequest) -> dict[tuple[str, str], float]:
        """Kinship of every pair among the members a request names (one
        streaming pass over them), from the ledger when it was computed before,
        so a resume reads the same values instead of streaming the models again."""
        run = self.run
        ids = list(dict.fromkeys(m for pair in request.pairs for m in pair))
        labels = [str(self.paths[m]) for m in ids]
        base = run.config.population.base_model
        key = "kinship/" + hashlib.sha256(json.dumps([request.metric, base, labels]).encode()).hexdigest()[:20]
        cached = run.ledger.get_meta(key)
        if cached is not None:
            rows = json.loads(cached)
        else:
            by_label = dict(zip(labels, ids))
            found = pairwise_kinship(labels, base, metrics=(request.metric,)) if len(ids) > 1 else []
            rows = [[by_label[str(p["a"])], by_label[str(p["b"])], p[request.metric]] for p in found]
            run.ledger.set_meta(key, json.dumps(rows))  # NaN is spelled NaN and read back
        return {(a, b): value for a, b, value in rows}
