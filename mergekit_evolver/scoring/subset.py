"""Subset estimators, the pure part: which documents stand for a task, and how
their values estimate its full score.

The documents are stratified by how the initial members did on them: the
pattern of per-document values across the members (for 0/1 metrics, which
members got it right). Documents every member gets right, or wrong, say little
about a candidate built from those members; documents they disagree on say
most. This is the anchor-point idea of tinyBenchmarks and MERGE³ with the
clusters made exact: one cluster per pattern. Each stratum keeps a seeded
`share` of its documents, at least one, and a kept document stands for its
stratum: weight N_h / (N n_h). The weighted sum is an unbiased estimate of
the task's mean over all its documents (stratified sampling). Paired with a
fully scored reference, the estimate is the reference's mean plus the
stratified estimate of the mean difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class TaskSubset:
    indices: tuple[int, ...]  # sorted document indices to score
    weights: tuple[float, ...]  # one per index, summing to 1

    def estimate(self, values: Mapping[int, float], reference: Optional[Sequence[float]] = None) -> float:
        """The task's mean over all its documents. With a reference (a fully
        scored model's value on every document), the difference estimator:
        the reference's full mean plus the estimated mean difference. It is as
        unbiased, and far tighter for a candidate close to its reference,
        which differs from it on few documents (control variates)."""
        if reference is None:
            return float(sum(w * values[i] for i, w in zip(self.indices, self.weights)))
        shift = sum(w * (values[i] - reference[i]) for i, w in zip(self.indices, self.weights))
        return float(sum(reference) / len(reference) + shift)


def stratified_subset(per_member: Sequence[Sequence[float]], share: float, seed: int) -> TaskSubset:
    """`per_member[m][d]`: member m's value on document d (every member scored
    on every document, in index order)."""
    table = np.asarray(per_member, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] == 0:
        raise ValueError("stratifying needs every member's value on every document")
    n_docs = table.shape[1]
    strata: dict[tuple, list[int]] = {}
    for d in range(n_docs):
        strata.setdefault(tuple(table[:, d]), []).append(d)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[int, float]] = []
    for pattern in sorted(strata):  # a fixed order, whatever the documents' order
        docs = strata[pattern]
        k = max(1, int(round(share * len(docs))))
        picked = sorted(int(i) for i in rng.choice(docs, size=k, replace=False))
        chosen += [(i, len(docs) / (n_docs * k)) for i in picked]
    chosen.sort()
    return TaskSubset(tuple(i for i, _ in chosen), tuple(w for _, w in chosen))
