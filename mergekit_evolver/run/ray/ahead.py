"""The candidates the loop will ask for next, predicted so that idle workers
can start on them.

A copy of the strategy is told each predicted candidate's result as the loop
will tell it where that is known (a ledger row, on a resume) and REJECTED
otherwise, then asked for the next one; as merge-ahead's guess
(CandidateLoop.expect_next), but several deep. The prediction stops at the end
of the generation in progress: past it, the proposals depend on this
generation's results.

Where a strategy's proposals do not depend on the results of the generation
in progress (the Evolver's generational update, recipe DE and CMA-ES batches)
every guess is right, and a whole generation runs at once. Elsewhere (steady
DE, immediate update) a guess is right while candidates are rejected; a wrong
one costs a worker's time, and the loop has the real candidate computed.
"""

from __future__ import annotations

import copy
import json
from typing import Optional

from mergekit_evolver.ledger import Status
from mergekit_evolver.run.ray.jobs import Job
from mergekit_evolver.search.protocol import CANDIDATE, REJECTED, Proposal, Result, Strategy


def upcoming(loop, strategy: Strategy, proposal: Proposal, text: str, depth: int, texts: dict) -> list[Job]:
    """`proposal`'s job, then the jobs of up to depth - 1 candidates after it
    that the ledger does not hold, in the order they will be asked."""
    jobs = [job_of(loop, proposal, texts, text)]
    if depth <= 1:
        return jobs
    ahead = copy.deepcopy(strategy)
    current = proposal
    while len(jobs) < depth:
        ahead.tell(current, _told(loop, current))
        if ahead.needs() is not None:
            break
        current = ahead.ask()
        if current is None:
            break
        if loop.run.ledger.find(current.step) is None:
            jobs.append(job_of(loop, current, texts))
    return jobs


def job_of(loop, proposal: Proposal, texts: dict, text: Optional[str] = None) -> Job:
    """`texts` caches recipe YAML by the resolved recipe: a candidate is
    predicted again at each candidate before it, and parsing it each time
    costs the driver more than the tiny testbed's merge and score together."""
    key = json.dumps(loop._resolve(proposal.recipe, None), sort_keys=True, default=str)
    if text is None:
        text = texts.get(key) or loop.recipe(proposal.recipe, proposal.step)[1]
    if len(texts) > 256:
        texts.clear()
    texts[key] = text
    score_in = None
    identity = loop.identity(proposal.recipe)
    scored_identity = identity
    if proposal.score_in is not None:
        score_in = json.dumps(loop._resolve(proposal.score_in, CANDIDATE), sort_keys=True, default=str)
        scored_identity = loop.identity(proposal.score_in, identity)
    return Job(
        step=proposal.step, text=text, identity=identity, scored_identity=scored_identity, score_in=score_in,
        bar=loop.bar(proposal), order=loop.run.dev.order, hold=proposal.child is not None,
    )


def _told(loop, proposal: Proposal) -> Result:
    row = loop.run.ledger.find(proposal.step)
    if row is None:
        return REJECTED
    if row.status in (Status.INVALID, Status.FAILED):
        return Result(None)
    return Result(row.fitness, row.dev, raced=row.status == Status.RACED)
