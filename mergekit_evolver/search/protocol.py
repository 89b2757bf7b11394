"""The one protocol every search strategy speaks, and the messages it trades.

A strategy proposes mergekit recipes over member ids and learns from their
dev fitness. It never touches tensors, files or the ledger: the run's candidate
loop (run/loop.py) merges, scores, writes and records, and gives a strategy the
inputs it asks for. The loop is, in full:

    while True:
        if (request := s.needs()) is not None: s.give(request, <answer>)
        elif (p := s.ask()) is not None:       s.tell(p, <merge p.recipe, score>)
        elif s.done:                           break
        else:                                  <record s.end_generation()>

`ask()` returns None when the generation in progress has no proposal left to
make; once each proposal is told, `end_generation()` closes it. A proposal is
told in the order it was asked, exactly once, on a resume too (from the ledger).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Protocol, Sequence, runtime_checkable

# Model references in a proposal's recipe: "@<member id>" names a population
# member (resolved to its dir by the loop), CANDIDATE the candidate being scored.
MEMBER = "@"
CANDIDATE = "@@candidate"


def member_ref(member_id: str) -> str:
    return MEMBER + member_id


@dataclass(frozen=True)
class Proposal:
    """A candidate to merge and score: a mergekit config (as data) over members."""

    step: str  # stable ledger key: the same proposal has the same step on a resume
    generation: int
    recipe: Mapping[str, Any]
    role: str = "offspring"  # the ledger role of its row (ledger/types.py Role)
    slot: Optional[int] = None
    parents: tuple[str, ...] = ()
    # The member id the candidate becomes if accepted (its weights are then
    # written to the population); None: it is scored only, never kept.
    child: Optional[str] = None
    # The member whose files an accepted child copies its side files from.
    like: Optional[str] = None
    # Merged selection: the recipe whose merge is scored instead of the
    # candidate's own, with the candidate itself named CANDIDATE.
    score_in: Optional[Mapping[str, Any]] = None
    operator: Optional[str] = None
    F: Optional[float] = None
    CR: Optional[float] = None
    seed: Optional[int] = None
    note: Optional[str] = None
    # What the candidate must pass to be kept, when the strategy's decision is
    # that one comparison: fitness > bar (bar_strict) or fitness >= bar. The
    # loop may then stop scoring it once it cannot pass (exact racing).
    bar: Optional[float] = None
    bar_strict: bool = True
    # Its fitness becomes later proposals' bar (a DE target vector), as a
    # member's does: never decided on a subset estimate (fitness.subset).
    sets_bar: bool = False


@dataclass(frozen=True)
class Result:
    """What the loop learnt of a proposal: its dev fitness (None: invalid, e.g.
    non-finite weights) and the per-task scores behind it. A raced-out
    candidate's fitness is the best it could still have reached, which does
    not pass its bar, and its scores are partial."""

    fitness: Optional[float]
    scores: Mapping[str, Any] = field(default_factory=dict)
    raced: bool = False

    @property
    def valid(self) -> bool:
        return self.fitness is not None and self.fitness == self.fitness


REJECTED = Result(None)


@dataclass(frozen=True)
class KinshipRequest:
    """Kinship (metric over deltas from the population's base) of member pairs."""

    pairs: tuple[tuple[str, str], ...]
    metric: str


@dataclass(frozen=True)
class GenerationEnd:
    """The event that closes a generation (a round, an optimizer batch)."""

    generation: int
    stats: dict[str, Any]  # the generations row: best/mean/min where it has them, then its own
    line: str  # the log line that sums it up
    # Accepted children that will never be members or parents: their files go.
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What a finished strategy returns: the final population (ids, best first
    where ranked) and, for recipe searches, the recipe that is the final model."""

    members: tuple[str, ...]
    fitness: tuple[float, ...]
    recipe: Optional[Mapping[str, Any]] = None
    best_step: Optional[str] = None


@dataclass(frozen=True)
class Start:
    """What a strategy is built from: the run config, the scored starting
    members, and the one fact about the models a genome needs."""

    config: Any  # config.EvolveConfig
    members: tuple[str, ...]
    fitness: tuple[float, ...]
    paths: tuple[str, ...]  # the members' dirs, for recipes over fixed models
    num_layers: Optional[int] = None


@runtime_checkable
class Strategy(Protocol):
    # Candidates it will propose at most, for progress bars (None: unknown).
    expected: Optional[int]

    def needs(self) -> Optional[KinshipRequest]: ...

    def give(self, request: KinshipRequest, answer: Mapping[tuple[str, str], float]) -> None: ...

    def ask(self) -> Optional[Proposal]: ...

    def tell(self, proposal: Proposal, result: Result) -> bool: ...

    @property
    def done(self) -> bool: ...

    def end_generation(self) -> GenerationEnd: ...

    def result(self) -> Outcome: ...

    # Optional: recipes the run checks at the door (parsed like a user's own),
    # before anything is scored or written: `recipes_to_check() -> list[dict]`.


class NoInputs:
    """For strategies that need nothing from the run beyond fitness."""

    def needs(self) -> Optional[KinshipRequest]:
        return None

    def give(self, request: KinshipRequest, answer: Mapping[tuple[str, str], float]) -> None:
        raise RuntimeError(f"{type(self).__name__} asked for no input")


def fitness_stats(values: Sequence[float]) -> dict[str, Optional[float]]:
    """best/mean/min of a generation's fitness values, None when there are none."""
    if not values:
        return {"best": None, "mean": None, "min": None}
    return {"best": max(values), "mean": sum(values) / len(values), "min": min(values)}
