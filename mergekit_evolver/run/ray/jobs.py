"""What the driver sends a Ray worker and what it gets back: plain data, so
that it pickles across processes and machines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mergekit_evolver.scoring.racing import Bar, Order

OK = "ok"
NON_FINITE = "non_finite"
FAILED = "failed"


@dataclass(frozen=True)
class Job:
    """One candidate: its recipe YAML (members resolved to their dirs) and
    everything else its result depends on. Two jobs with the same key give
    the same result, so a speculative one is used only when its key matches."""

    step: str
    text: str
    # The candidate's identity and that of what is scored (merging/identity.py),
    # derived on the driver: a worker reads no byte to name a candidate.
    identity: str = ""
    scored_identity: str = ""
    # Merged selection: the recipe scored instead of the candidate's own, as
    # JSON with the candidate still named CANDIDATE (each worker serves it
    # from its own memory slot).
    score_in: Optional[str] = None
    bar: Optional[Bar] = None  # what racing stops it against, with statistical racing's reference
    order: Optional[Order] = None  # the dev documents' racing order (None: the seeded one)
    # The candidate may be kept: its worker holds its weights (one it
    # streamed into its resident model: its recipe, merged again to be
    # written) until the driver says to write or drop them.
    hold: bool = False

    @property
    def key(self) -> tuple:
        return (
            self.step, self.text, self.identity, self.scored_identity, self.score_in, self.bar, self.order,
            self.hold,
        )


@dataclass
class Reply:
    step: str
    key: tuple
    status: str  # OK, NON_FINITE or FAILED
    worker: int
    error: Optional[str] = None
    content_hash: Optional[str] = None  # the candidate's identity
    non_finite: Optional[str] = None  # the first tensor holding NaN or Inf
    scored_hash: Optional[str] = None  # of what was scored (score_in: the merged population)
    scores: dict[str, Any] = field(default_factory=dict)
    fitness: Optional[float] = None
    complete: bool = True
    documents: Optional[tuple[int, int]] = None
    per_document: Optional[dict] = None  # a complete score's, as Scoring has them
    merge_s: float = 0.0
    eval_s: float = 0.0
