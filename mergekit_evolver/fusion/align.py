"""Sequence alignment: which source token stands where in the target's
tokenization of the same text, and the source distribution each target
prediction gets. Pure: token texts, ids and arrays in, arrays out.

Tokens are aligned by dynamic programming on edit distance (FuseLLM's DTW):
the cost of pairing two tokens is the Levenshtein distance of their texts with
spaces removed (so "▁the" and "the" pair freely), every token is paired with
at least one token of the other side, and the path of least total cost from
the first pair to the last is kept (ties: diagonal, then a source step, then
a target step, as in the reference). Special tokens (bos, eos, ...) take no
part in that: the k-th token of a role on one side pairs with the k-th of the
same role on the other.

A target prediction (row p of a sequence: the distribution over token p+1
given tokens 0..p) carries the source's top-k distribution, mapped onto the
target vocabulary, only where target token p+1 pairs 1:1 with a source token
j (neither is paired with anything else), the source has a prediction for it
(j >= 1: row j-1), and the two tokens agree under the vocabulary mapping.
Every other row carries a one-hot of target token p+1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np


def dtw_path(source: Sequence[str], target: Sequence[str]) -> list[tuple[int, int]]:
    """The least-cost monotone path of (source index, target index) pairs that
    starts at (0, 0), ends at (last, last) and moves by one on either side or
    both; [] when a side is empty."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n, m = len(source), len(target)
    if n == 0 or m == 0:
        return []
    cost = process.cdist(
        [s.replace(" ", "") for s in source], [t.replace(" ", "") for t in target],
        scorer=Levenshtein.distance, dtype=np.int64, workers=1,
    ).astype(np.float64)
    # acc[i, j]: the least cost of a path to pair (i-1, j-1). A cell needs only
    # the two anti-diagonals before its own, so each anti-diagonal is one
    # vector operation (sums of integers: exact, whatever the order).
    acc = np.full((n + 1, m + 1), np.inf)
    acc[0, 0] = 0.0
    for d in range(2, n + m + 1):
        i = np.arange(max(1, d - m), min(n, d - 1) + 1)
        j = d - i
        acc[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(acc[i - 1, j], acc[i, j - 1]), acc[i - 1, j - 1])
    inf = np.inf
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = acc[i, j] if i > 0 and j > 0 else inf  # acc is offset by one
        up = acc[i, j + 1] if i > 0 else inf
        left = acc[i + 1, j] if j > 0 else inf
        best = min(diag, up, left)
        if diag == best:
            i, j = i - 1, j - 1
        elif up == best:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def one_to_one(path: Sequence[tuple[int, int]]) -> dict[int, int]:
    """target index -> source index for the pairs of `path` where each side
    is paired with nothing else."""
    by_source: dict[int, int] = defaultdict(int)
    by_target: dict[int, int] = defaultdict(int)
    for s, t in path:
        by_source[s] += 1
        by_target[t] += 1
    return {t: s for s, t in path if by_source[s] == 1 and by_target[t] == 1}


def pair_tokens(
    source_texts: Sequence[Optional[str]],
    source_roles: Sequence[Optional[str]],
    target_texts: Sequence[Optional[str]],
    target_roles: Sequence[Optional[str]],
) -> dict[int, int]:
    """target position -> source position for 1:1 pairs of two tokenizations.

    Per position: its token's text (None for a special token) and role (None
    for an ordinary token). Ordinary tokens are aligned by `dtw_path`;
    special tokens pair by role, in order of appearance."""
    src = [i for i, r in enumerate(source_roles) if r is None]
    tgt = [i for i, r in enumerate(target_roles) if r is None]
    path = dtw_path([source_texts[i] or "" for i in src], [target_texts[i] or "" for i in tgt])
    pairs = {tgt[t]: src[s] for t, s in one_to_one(path).items()}
    by_role: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(source_roles):
        if r is not None:
            by_role[r].append(i)
    seen: dict[str, int] = defaultdict(int)
    for i, r in enumerate(target_roles):
        if r is None:
            continue
        k = seen[r]
        seen[r] += 1
        if k < len(by_role[r]):
            pairs[i] = by_role[r][k]
    return pairs


def map_topk(ids: np.ndarray, logits: np.ndarray, vocab_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One source top-k row in target ids: unmapped ids dropped, and of two
    source tokens mapped to one target token the higher logit kept (the rows
    come sorted, so the first); padded to k with id -1 and logit -inf."""
    out_ids = np.full(k, -1, dtype=np.int64)
    out_logits = np.full(k, -np.inf, dtype=np.float32)
    seen = set()
    n = 0
    for sid, logit in zip(ids.tolist(), logits.tolist()):
        tid = int(vocab_map[sid]) if 0 <= sid < len(vocab_map) else -1
        if tid < 0 or tid in seen:
            continue
        seen.add(tid)
        out_ids[n], out_logits[n] = tid, logit
        n += 1
    return out_ids, out_logits


@dataclass(frozen=True)
class Aligned:
    """A source's distributions on a target sequence of T tokens: T-1 rows of
    k target ids (-1 pads) and logits (-inf pads); `distilled` rows carry the
    source's distribution, the others a one-hot of the target's token."""

    ids: np.ndarray
    logits: np.ndarray
    distilled: int


def align_sequence(
    target_ids: Sequence[int],
    source_ids: Sequence[int],
    source_topk_ids: np.ndarray,
    source_topk_logits: np.ndarray,
    vocab_map: np.ndarray,
    pairs: Mapping[int, int],
) -> Aligned:
    """The rows a target sequence gets from one source (see the module docstring).

    `source_topk_*` have one row per source prediction (len(source_ids) - 1);
    `pairs` is `pair_tokens`' result for this sequence."""
    k = source_topk_ids.shape[1] if source_topk_ids.ndim == 2 else 1
    rows = max(len(target_ids) - 1, 0)
    ids = np.full((rows, k), -1, dtype=np.int64)
    logits = np.full((rows, k), -np.inf, dtype=np.float32)
    distilled = 0
    for p in range(rows):
        t = p + 1
        j = pairs.get(t)
        if j is not None and j >= 1 and int(vocab_map[source_ids[j]]) == int(target_ids[t]):
            ids[p], logits[p] = map_topk(source_topk_ids[j - 1], source_topk_logits[j - 1], vocab_map, k)
            distilled += 1
        else:
            ids[p, 0], logits[p, 0] = int(target_ids[t]), 0.0
    return Aligned(ids, logits, distilled)
