"""Model kinship: how alike two models' changes to a shared base are.

Kinship (Hu et al., 2024) compares delta parameters, delta = theta_model - theta_base,
over ALL tensors flattened into one vector per model: Pearson correlation
(pcc), cosine similarity (cos) and Euclidean distance (ed). The n-model kinship
is the mean over pairs.

The metric is exact, not the per-tensor average the reference code's "split"
mode computes (that average weights a 64-element norm like a 100M-element
embedding). It is still streamed: every metric is a function of the sums
n, Sa, Sb, Saa, Sbb, Sab and S(a-b)^2, which add up tensor by tensor, so only
one tensor per input is held at a time and a model larger than RAM works.

Layout: pure math (`PairSums`, `metrics_from_sums`) is separate from reading
tensors (`_TensorReader`, `_accumulate_tensor`) and from the command line.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch

from mergekit_evolver.errors import UserError

METRICS = ("pcc", "cos", "ed")
METRIC_TITLES = {
    "pcc": "Pearson correlation of deltas",
    "cos": "cosine similarity of deltas",
    "ed": "Euclidean distance between deltas",
}

# Elements of one tensor converted to float64 at a time, per model: bounds the
# float64 working set to (models + 2) * 512 KiB whatever the tensor's size, small
# enough that the subtract, product and distances of a chunk run in cache
# (measured faster than 1M-element chunks; smaller ones pay Python overhead).
CHUNK_ELEMENTS = 1 << 16

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pure math


@dataclass
class PairSums:
    """The sums every kinship metric of one pair of delta vectors is made of.

    Python floats are float64; they add up the per-chunk sums (thousands of
    terms for a 7B model), each already computed in float64."""

    n: int = 0
    sa: float = 0.0
    sb: float = 0.0
    saa: float = 0.0
    sbb: float = 0.0
    sab: float = 0.0
    # S(a-b)^2 is summed directly, not derived as Saa + Sbb - 2Sab: near-twin
    # models (kinship >= 0.9 late in a merge search) would lose their distance
    # to cancellation, and identical models must give exactly 0.
    sdd: float = 0.0

    def add(self, n: int, sa: float, sb: float, saa: float, sbb: float, sab: float, sdd: float) -> None:
        self.n += n
        self.sa += sa
        self.sb += sb
        self.saa += saa
        self.sbb += sbb
        self.sab += sab
        self.sdd += sdd


def _clamp_unit(x: float) -> float:
    # Rounding can put a correlation of twins a few ulps past 1.
    return max(-1.0, min(1.0, x))


def pcc_from_sums(s: PairSums) -> float:
    """Pearson correlation; NaN when either delta is constant (no variance).

    Raw (uncentred) sums are fine here: deltas have mean ~0, so Saa - Sa^2/n
    does not cancel."""
    if s.n == 0:
        return math.nan
    cov = s.sab - s.sa * s.sb / s.n
    var_a = s.saa - s.sa * s.sa / s.n
    var_b = s.sbb - s.sb * s.sb / s.n
    if var_a <= 0.0 or var_b <= 0.0:
        return math.nan
    return _clamp_unit(cov / (math.sqrt(var_a) * math.sqrt(var_b)))


def cos_from_sums(s: PairSums) -> float:
    """Cosine similarity; NaN when either delta is all zeros."""
    if s.saa <= 0.0 or s.sbb <= 0.0:
        return math.nan
    return _clamp_unit(s.sab / (math.sqrt(s.saa) * math.sqrt(s.sbb)))


def ed_from_sums(s: PairSums) -> float:
    return math.sqrt(max(s.sdd, 0.0))


_FROM_SUMS = {"pcc": pcc_from_sums, "cos": cos_from_sums, "ed": ed_from_sums}


def metrics_from_sums(s: PairSums, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    return {m: _FROM_SUMS[m](s) for m in metrics}


def parse_metrics(text: str | Iterable[str]) -> tuple[str, ...]:
    """'pcc,cos' -> ('pcc', 'cos'): known names, in the order given, once each."""
    names = text.split(",") if isinstance(text, str) else list(text)
    out: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in METRICS:
            raise UserError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise UserError(f"no metric given; choose from {', '.join(METRICS)}")
    return tuple(out)


def mean_over_pairs(pairs: Sequence[Mapping], metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """The n-model kinship: each metric's mean over pairs (NaN if any pair's is)."""
    if not pairs:
        raise UserError("kinship needs at least 2 models")
    return {m: math.fsum(float("nan") if p[m] is None else p[m] for p in pairs) / len(pairs) for m in metrics}


# ---------------------------------------------------------------- streaming


@dataclass
class KinshipResult:
    labels: list[str]
    metrics: tuple[str, ...]
    # One dict per unordered pair (i < j): {"a": label, "b": label, <metric>: value}.
    pairs: list[dict]
    # Tensors not in every input (base included) -> the inputs that lack them.
    # A pair uses such a tensor only when the base and both models have it.
    skipped: dict[str, list[str]] = field(default_factory=dict)
    # Tensors whose first dim differs between inputs (vocabulary size) -> rows
    # per input. A pair compares the rows it shares with the base.
    row_mismatch: dict[str, dict[str, int]] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """Human-readable warnings: one per row-mismatched tensor, then one
        listing the skipped tensors."""
        lines = []
        for name, rows in self.row_mismatch.items():
            sizes = ", ".join(f"{label} {r}" for label, r in rows.items())
            lines.append(f"warning: {name}: first dimension differs ({sizes}); "
                         "each pair is compared on the rows it shares with the base")
        if self.skipped:
            listed = "; ".join(f"{name} (missing from {', '.join(who)})" for name, who in self.skipped.items())
            lines.append(f"warning: {len(self.skipped)} tensor(s) not in every model and the base, "
                         f"left out of the pairs that lack them: {listed}")
        return lines


class _TensorReader:
    """One input's tensors, read one at a time with the project's pread loader
    (sharded safetensors, never unpickles, no whole-shard mmap held)."""

    def __init__(self, path: Path, label: str):
        from mergekit_evolver.population.store import FileLoader

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"{label}: no such model directory")
        try:
            self.loader = FileLoader(path)
        except RuntimeError as error:  # mergekit: "Unable to find model files at ..."
            raise UserError(f"{label}: no safetensors weights found") from error
        self.label = label
        self.names = set(self.loader.index.tensor_paths)

    def get(self, name: str) -> torch.Tensor:
        return self.loader.get_tensor(name)


def _rows(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() else 1


def _row_size(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) if t.dim() else 1


def _check_shapes(name: str, base: torch.Tensor, base_label: str, tensors: dict[int, torch.Tensor],
                  labels: Sequence[str]) -> None:
    for i, t in tensors.items():
        if t.dim() != base.dim() or t.shape[1:] != base.shape[1:]:
            raise UserError(f"{name}: shape {tuple(t.shape)} in {labels[i]} but {tuple(base.shape)} in "
                            f"{base_label}; kinship needs one architecture (only the first dimension may differ)")


class _Workspace:
    """float64 buffers reused for every chunk of every tensor: fresh large
    allocations would page-fault on every chunk."""

    def __init__(self, models: int, chunk: int):
        self.chunk = chunk
        self.stack = torch.empty((models + 1) * chunk, dtype=torch.float64)
        self.base = torch.empty(chunk, dtype=torch.float64)

    def block(self, rows: int, width: int) -> torch.Tensor:
        # Contiguous whatever the width, so matmul and pdist never copy.
        return self.stack[: rows * width].view(rows, width)


def _accumulate_tensor(base: torch.Tensor, tensors: dict[int, torch.Tensor], sums: dict[tuple[int, int], PairSums],
                       need_moments: bool, need_ed: bool, work: _Workspace) -> None:
    """Add one tensor's contribution to every pair's sums.

    `tensors` maps model index -> that model's tensor (models lacking it are
    absent). Rows are split into segments at each input's row count: within a
    segment every member has every row, so the members' deltas are stacked and
    all pairs are summed at once (one matrix product, one pdist)."""
    row_size = _row_size(base)
    base_flat = base.reshape(-1)
    flats = {i: t.reshape(-1) for i, t in tensors.items()}
    shared = {i: min(_rows(t), _rows(base)) for i, t in tensors.items()}
    edges = sorted({0, *shared.values()})
    for lo, hi in zip(edges, edges[1:]):
        members = [i for i in sorted(tensors) if shared[i] >= hi]
        if len(members) < 2:
            continue
        pairs = list(combinations(range(len(members)), 2))  # pdist's order too
        for s in range(lo * row_size, hi * row_size, work.chunk):
            e = min(s + work.chunk, hi * row_size)
            n = e - s
            # Row 0 is ones, so the product that gives every Sab also gives
            # every Sa, without another pass over the deltas.
            block = work.block(len(members) + 1, n)
            block[0].fill_(1.0)
            base64 = work.base[:n].copy_(base_flat[s:e])
            for k, i in enumerate(members, start=1):
                block[k].copy_(flats[i][s:e]).sub_(base64)
            deltas = block[1:]
            if need_moments:
                # gram[k] = [S d_k, S d_k d_0, S d_k d_1, ...]. This operand
                # order runs ~4x faster in MKL than block @ deltas.T.
                gram = (deltas @ block.T).tolist()
            if need_ed:
                # pdist sums (a-b)^2 directly: see PairSums.sdd.
                dist = torch.pdist(deltas).tolist()
            for p, (ka, kb) in enumerate(pairs):
                if need_moments:
                    sa, sb = gram[ka][0], gram[kb][0]
                    saa, sbb, sab = gram[ka][1 + ka], gram[kb][1 + kb], gram[ka][1 + kb]
                else:
                    sa = sb = saa = sbb = sab = 0.0
                sdd = dist[p] ** 2 if need_ed else 0.0
                sums[(members[ka], members[kb])].add(n, sa, sb, saa, sbb, sab, sdd)


def compute_kinship(
    models: Sequence[str | Path],
    base: str | Path,
    metrics: Sequence[str] | str = METRICS,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> KinshipResult:
    """Kinship of every pair of `models` (HF dirs of safetensors) relative to `base`.

    Exact global metrics over all tensors as one vector, streamed tensor by
    tensor. Raises UserError on bad input (missing dirs, fewer than 2 models,
    unknown metric, incompatible shapes, a pair with no tensor in common)."""
    metrics = parse_metrics(metrics)
    if len(models) < 2:
        raise UserError(f"kinship needs at least 2 models; got {len(models)}")
    labels = [str(m) for m in models]
    base_label = str(base)
    base_reader = _TensorReader(Path(base), base_label)
    readers = [_TensorReader(Path(m), label) for m, label in zip(models, labels)]

    sums = {(a, b): PairSums() for a, b in combinations(range(len(readers)), 2)}
    need_moments = "pcc" in metrics or "cos" in metrics
    need_ed = "ed" in metrics

    everywhere = base_reader.names.intersection(*(r.names for r in readers))
    anywhere = base_reader.names.union(*(r.names for r in readers))
    skipped = {
        name: [r.label for r in (base_reader, *readers) if name not in r.names]
        for name in sorted(anywhere - everywhere)
    }
    row_mismatch: dict[str, dict[str, int]] = {}
    work = _Workspace(len(readers), max(1, chunk_elements))

    for name in sorted(base_reader.names):
        holders = [i for i, r in enumerate(readers) if name in r.names]
        if len(holders) < 2:
            continue  # no pair has it
        base_t = base_reader.get(name)
        tensors = {i: readers[i].get(name) for i in holders}
        _check_shapes(name, base_t, base_label, tensors, labels)
        rows = {base_label: _rows(base_t), **{labels[i]: _rows(t) for i, t in tensors.items()}}
        if len(set(rows.values())) > 1:
            row_mismatch[name] = rows
        _accumulate_tensor(base_t, tensors, sums, need_moments, need_ed, work)
        del base_t, tensors

    pairs = []
    for (a, b), s in sums.items():
        if s.n == 0:
            raise UserError(f"{labels[a]} and {labels[b]} share no tensor with {base_label}")
        pairs.append({"a": labels[a], "b": labels[b], **metrics_from_sums(s, metrics)})
    return KinshipResult(labels, metrics, pairs, skipped, row_mismatch)


def pairwise_kinship(
    models: Sequence[str | Path], base: str | Path, metrics: Sequence[str] | str = METRICS
) -> list[dict]:
    """[{"a": model, "b": model, <metric>: value, ...}] for every pair a < b.

    Warnings (row mismatches, skipped tensors) go to this module's logger."""
    result = compute_kinship(models, base, metrics)
    for line in result.notes():
        log.warning(line)
    return result.pairs


def mean_kinship(
    models: Sequence[str | Path], base: str | Path, metrics: Sequence[str] | str = METRICS
) -> dict[str, float]:
    """The paper's n-model kinship: each metric's mean over all pairs."""
    metrics = parse_metrics(metrics)
    return mean_over_pairs(pairwise_kinship(models, base, metrics), metrics)


# ---------------------------------------------------------------- output


def _json_number(x: float) -> Optional[float]:
    # NaN (a delta with no variance) is not JSON; null is.
    return None if isinstance(x, float) and math.isnan(x) else x


def to_json(result: KinshipResult) -> str:
    return json.dumps(
        [{k: _json_number(v) for k, v in pair.items()} for pair in result.pairs], indent=2
    )


def format_matrices(result: KinshipResult) -> str:
    """A legend of the models, then one symmetric matrix per metric."""
    n = len(result.labels)
    # Pairs come in combinations() order: rebuild (i, j) from that, not from
    # labels, which may repeat.
    cells = dict(zip(combinations(range(n), 2), result.pairs))
    head = [f"[{i + 1}]" for i in range(n)]
    width = 12
    lines = ["models:"] + [f"  {h} {label}" for h, label in zip(head, result.labels)]
    for m in result.metrics:
        lines += ["", f"{m}: {METRIC_TITLES[m]}", " " * 6 + "".join(h.rjust(width) for h in head)]
        for i in range(n):
            row = []
            for j in range(n):
                if i == j:
                    row.append("-")
                else:
                    row.append(f"{cells[(min(i, j), max(i, j))][m]:.6g}")
            lines.append(head[i].ljust(6) + "".join(c.rjust(width) for c in row))
    return "\n".join(lines)
