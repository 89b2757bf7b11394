"""The ledger's typed records: a candidate row, its role and its status
(like optuna's TrialState, a closed set the code can rely on)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional


class Role(str, enum.Enum):
    MEMBER = "member"  # a starting member (a model, or a population.recipes merge)
    OFFSPRING = "offspring"  # a weight-space child: DE offspring, greedy pair child
    MERGED = "merged"  # the merged starting population (merged selection's first bar)
    SEARCH = "search"  # a recipe-space candidate
    BASELINE = "baseline"  # a baseline's grid point, scored on dev
    REPORT = "report"  # an entry of the held-out report

    def __str__(self) -> str:
        return self.value


class Status(str, enum.Enum):
    ACCEPTED = "accepted"  # kept: its weights are a member of the population
    REJECTED = "rejected"  # scored, not kept
    INVALID = "invalid"  # never scored: non-finite weights
    SCORED = "scored"  # scored only; nothing to keep or reject (search, baseline, report)
    # Stopped once it could not pass its bar (exact racing): rejected, with
    # partial scores and, as fitness, the best it could still have reached.
    RACED = "raced"
    # Never scored: its merge or score raised, ran out of memory, or ran over
    # the executor's timeout_s (its error is the note). Rejected, like INVALID.
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass
class Candidate:
    """One row of the ledger: a recipe that was merged and (maybe) scored."""

    step: str
    generation: int
    role: Role
    status: Status
    slot: Optional[int] = None
    recipe: Optional[str] = None
    parents: list[str] = field(default_factory=list)
    operator: Optional[str] = None
    F: Optional[float] = None
    CR: Optional[float] = None
    seed: Optional[int] = None
    content_hash: Optional[str] = None  # of the candidate's own weights (merging/fingerprint.py)
    fitness: Optional[float] = None
    dev: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    member: Optional[str] = None
    merge_s: Optional[float] = None
    eval_s: Optional[float] = None
    note: Optional[str] = None


