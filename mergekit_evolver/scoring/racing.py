"""Racing, the pure part: which documents are scored in which round, and
the best fitness a partly scored candidate could still reach (exact), or
would reach with high confidence (statistical).

A candidate is scored in rounds of seeded, fixed-order chunks of each task's
documents. After a round, every document not yet scored is taken at the best
value its metric allows, and the task's own aggregation (lm-eval's) is applied
to that best case. A candidate whose best case cannot pass its bar is stopped:
scoring the rest could not change its decision. This is exact only where a
document's value has a known best and the aggregation cannot grow from a worse
value: the metrics in BOUNDED, aggregated by lm-eval's mean. Anything else is
scored in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

# Metrics whose per-document value lies in [0, 1] (lm-eval's acc, acc_norm,
# exact_match: 0 or 1 per document).
BOUNDED = {"acc": (0.0, 1.0), "acc_norm": (0.0, 1.0), "exact_match": (0.0, 1.0)}


@dataclass(frozen=True)
class Reference:
    """A fully scored model's per-document values of each fitness task, in
    document order: what statistical racing pairs a candidate with. Hashable,
    so that it is part of a remote job's key."""

    values: tuple[tuple[str, tuple[float, ...]], ...]

    @classmethod
    def of(cls, per_document: Mapping[str, Sequence[float]]) -> "Reference":
        return cls(tuple(sorted((task, tuple(float(v) for v in vs)) for task, vs in per_document.items())))

    def task(self, name: str) -> tuple[float, ...]:
        return dict(self.values)[name]


@dataclass(frozen=True)
class Bar:
    """What a candidate must do to be kept: beat `value` (strict) or reach it.
    `reference`: whom statistical racing pairs it with (None: no one)."""

    value: float
    strict: bool = True
    reference: Optional[Reference] = None

    def passed_by(self, fitness: float) -> bool:
        return fitness > self.value if self.strict else fitness >= self.value


@dataclass(frozen=True)
class Order:
    """Each task's documents in the order a race scores them. Hashable, so
    that it is part of a remote job's key."""

    indices: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def hardest_first(
        cls, per_member: Mapping[str, Sequence[Sequence[float]]], higher_is_better: Mapping[str, bool],
        sizes: Mapping[str, int], seed: int,
    ) -> "Order":
        """The documents the initial members did worst on first, ties in the
        seeded order. An exact race stops a loser once its misses exceed what
        its bar leaves room for; the documents a candidate built from these
        members will likely miss show that soonest. No complete score depends
        on the order (each is aggregated in index order)."""
        out = []
        for offset, (task, n) in enumerate(sorted(sizes.items())):
            seeded = _seeded(n, seed, offset)
            rows = per_member.get(task)
            if not rows or any(len(r) != n for r in rows):
                out.append((task, tuple(int(i) for i in seeded)))
                continue
            sign = 1.0 if higher_is_better[task] else -1.0
            expected = sign * np.mean(np.asarray(rows, dtype=np.float64), axis=0)
            position = np.empty(n, dtype=np.int64)
            position[seeded] = np.arange(n)
            out.append((task, tuple(int(i) for i in np.lexsort((position, expected)))))
        return cls(tuple(out))

    def task(self, name: str) -> Optional[tuple[int, ...]]:
        return dict(self.indices).get(name)


def _seeded(n: int, seed: int, offset: int) -> np.ndarray:
    return np.random.default_rng([seed, offset]).permutation(n)


def rounds_of(
    sizes: Mapping[str, int], rounds: int, seed: int, order: Optional[Order] = None
) -> list[dict[str, list[int]]]:
    """Each task's document indices in `order` (else a seeded order), cut into
    `rounds` chunks; chunk k of every task makes round k. Indices within a
    chunk are sorted, as lm-eval walks documents."""
    plan: list[dict[str, list[int]]] = [{} for _ in range(rounds)]
    for offset, (task, n) in enumerate(sorted(sizes.items())):
        given = order.task(task) if order is not None else None
        if given is not None and sorted(given) != list(range(n)):
            raise ValueError(f"the racing order of {task} is not a permutation of its {n} documents")
        sequence = np.asarray(given) if given is not None else _seeded(n, seed, offset)
        for k in range(rounds):
            chunk = sequence[k * n // rounds : (k + 1) * n // rounds]
            if len(chunk):
                plan[k][task] = sorted(int(i) for i in chunk)
    return [r for r in plan if r]


def best_case(
    values: Sequence[float], total: int, higher_is_better: bool, metric: str, aggregate: Callable
) -> float:
    """The task's aggregate if each of the `total - len(values)` documents still
    to score took its metric's best value: the same aggregation over the same
    number of values, so float rounding cannot put the real outcome above it."""
    low, high = BOUNDED[metric]
    best = high if higher_is_better else low
    return float(aggregate(list(values) + [best] * (total - len(values))))


def confident_best(
    values: Sequence[float], total: int, higher_is_better: bool, metric: str, aggregate: Callable,
    delta: float,
) -> float:
    """Statistical racing's bound: the task's full mean is at most this (at
    least, if lower is better) with probability >= 1 - delta.

    The documents scored so far are a seeded random sample, without
    replacement, of the task's `total`; the full mean is the population mean,
    and Serfling's Hoeffding bound for sampling without replacement gives
    mean_seen + R * sqrt((1 - (n - 1) / total) * ln(1 / delta) / (2 n)).
    It is never looser than the exact best case."""
    exact = best_case(values, total, higher_is_better, metric, aggregate)
    n = len(values)
    if n == 0 or n >= total:
        return exact
    low, high = BOUNDED[metric]
    seen = float(aggregate(list(values)))
    eps = (high - low) * math.sqrt((1 - (n - 1) / total) * math.log(1 / delta) / (2 * n))
    return min(exact, seen + eps) if higher_is_better else max(exact, seen - eps)


def look_z(confidence: float, rounds: int) -> float:
    """The normal quantile of the paired test: 1 - confidence spread over the
    looks a race takes (after every round but the last), so that stopping at
    any of them errs with probability at most 1 - confidence (Bonferroni)."""
    return NormalDist().inv_cdf(1 - (1 - confidence) / max(1, rounds - 1))


def paired_best(
    seen: Mapping[str, Mapping[int, float]], reference: Reference, sizes: Mapping[str, int],
    coefficients: Mapping[str, float], span: Mapping[str, float], z: float,
) -> Optional[float]:
    """The candidate's fitness at most this, at the test's confidence: its
    fitness is sum_t c_t * mean_t(x), the reference's plus sum_t c_t * mean_t(d)
    with d = x - r per document. The seen documents are a random sample
    without replacement of each task's, so each task's mean difference is
    estimated by the seen mean, with variance s_t^2 / n_t * (1 - n_t / N_t).
    None where a task has no document seen yet.

    The spread s_t is taken over the seen differences and two pseudo-documents
    at -span and +span: a sample in which no document has changed yet says
    little about how many will, and a zero spread would stop a candidate on
    its first round (Agresti and Caffo's adjustment for paired proportions
    does the same)."""
    fitness = spread = 0.0
    for task, c in coefficients.items():
        docs, ref, total = seen[task], reference.task(task), sizes[task]
        if len(ref) != total:
            raise ValueError(f"the reference has {len(ref)} documents of {task}, the task {total}")
        n = len(docs)
        if n == 0:
            return None
        diffs = [float(docs[i]) - ref[i] for i in sorted(docs)]
        mean_diff = sum(diffs) / n
        padded = diffs + [-span[task], span[task]]
        centre = sum(padded) / len(padded)
        variance = sum((d - centre) ** 2 for d in padded) / (len(padded) - 1)
        fitness += c * (sum(ref) / total + mean_diff)
        spread += c * c * variance / n * (1 - n / total)
    return fitness + z * math.sqrt(spread)


def can_race(metric: str, aggregate: Callable) -> bool:
    from lm_eval.api.metrics import mean

    return metric in BOUNDED and aggregate is mean


def still_possible(best_fitness: Optional[float], bar: Optional[Bar]) -> bool:
    return bar is None or best_fitness is None or bar.passed_by(best_fitness)
