"""RegMean (Jin et al., ICLR 2023) as a mergekit merge method.

For a linear weight with input Gram matrices G_i (see mergekit_evolver.stats.store):

    W*ᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,   G̃ = α·G + (1−α)·diag(G)

the least-squares weight whose outputs are closest to each model's on that
model's inputs. w_i is model i's `weight` (default 1.0; a common scale of all
w_i does not change W*). α = `alpha` shrinks the off-diagonal terms: α = 0 is a
per-input-feature weighted average (column j: Σ w_i G_i,jj W_i[:, j] / Σ w_i G_i,jj),
α = 1 the plain RegMean (needs well-conditioned Grams).

Orientation. nn.Linear stores W as out×in (Wᵀ above), GPT-2's Conv1D as in×out
(W itself). The stats manifest records each weight's layout at collection time;
that decides, also for square weights. Statistics without a recorded layout
(written by something else) are oriented by size: the axis whose length is the
Gram's; a square weight is taken as nn.Linear's out×in.

Solved with torch.linalg.solve in float64 (no explicit inverse). An input
feature whose Gram diagonal is 0 in every model (no input ever reached it) gets
the weighted average of that column; if the system is still singular, the
least-squares solution (lstsq) is used, with a warning. For α < 1 the system
is positive definite whenever every diagonal entry is positive; α = 1 needs
full-rank Grams (more tokens than input features). Returned in the input dtype.

Every tensor without Grams (biases, norms, embeddings, a tied lm_head) is the
weighted average Σ w_i θ_i / Σ w_i.

Parameters
    alpha   shared, in [0, 1], default 0.9
    weight  per model, float >= 0 (not all 0), default 1.0
    stats   per model, the stats dir; default `<model dir>/stats`. An offspring
            without statistics of its own (Evolver + RegMean) names the original
            model's dir here.

No base_model; at least 2 models. Example:

    merge_method: regmean
    models:
      - model: ./specialist_a                 # reads ./specialist_a/stats
      - model: ./offspring_3
        parameters: {stats: ./specialist_b/stats}
    parameters: {alpha: 0.9}
    dtype: float32

`check_stats_recipe` (mergekit_evolver.stats.store) checks a recipe's statistics
before merging; STATS_METHODS holds both methods for registration, and
STATS_METHOD_NAMES their names for code that must know a recipe needs statistics
(run configs, recipe builders) without holding the method objects.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from mergekit.merge_methods import MergeMethod, PerInput, TensorGroup, merge_method
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_evolver.methods.fisher import (
    FISHER,
    WeightType,
    coefficients,
    stats_contract,
    weighted_average,
)
from mergekit_evolver.stats.store import check_stats_recipe, gram_input_axis, group_stats

REFERENCE = "https://arxiv.org/abs/2212.09849"


def _unit_interval(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must be in [0.0, 1.0]; got {value}")
    return value


AlphaType = Annotated[float, AfterValidator(_unit_interval)]


def shrink(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α·G + (1−α)·diag(G): off-diagonal terms scaled by α, diagonal kept."""
    g = gram.to(torch.float64)
    out = g * alpha
    out.diagonal().copy_(g.diagonal())
    return out


def regmean_merge(
    tensors: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    weights: Sequence[float],
    alpha: float = 0.9,
    input_axis: int = 1,
) -> torch.Tensor:
    """The RegMean weight; `input_axis` is 1 for nn.Linear (out×in), 0 for
    Conv1D (in×out)."""
    lhs: Optional[torch.Tensor] = None
    rhs: Optional[torch.Tensor] = None
    wts = []  # each W_i as in×out
    for tensor, gram, w in zip(tensors, grams, weights):
        g = shrink(gram.to(tensor.device), alpha).mul_(w)
        wt = tensor.to(torch.float64)
        wt = wt.T if input_axis == 1 else wt
        wts.append(wt)
        lhs = g if lhs is None else lhs.add_(g)
        rhs = g @ wt if rhs is None else rhs.addmm_(g, wt)
    assert lhs is not None and rhs is not None
    dead = lhs.diagonal() == 0
    if dead.any():
        # No model's inputs reach these features: their rows of lhs and rhs are
        # 0 (a Gram is PSD), so a weighted average there changes nothing else.
        lhs.diagonal()[dead] = float(sum(weights))
        rhs[dead] = sum(w * wt[dead] for wt, w in zip(wts, weights))
    try:
        solution = torch.linalg.solve(lhs, rhs)
        singular = not bool(torch.isfinite(solution).all())
    except torch.linalg.LinAlgError:
        singular = True
    if singular:
        warnings.warn("RegMean: singular Gram sum; using the least-squares solution")
        solution = torch.linalg.lstsq(lhs.cpu(), rhs.cpu(), driver="gelsd").solution.to(lhs.device)
    merged = solution.T if input_axis == 1 else solution
    return merged.contiguous().to(tensors[0].dtype)


@merge_method(
    name="regmean",
    pretty_name="RegMean",
    reference_url=REFERENCE,
    contract=stats_contract("regmean"),
)
def regmean_kernel(
    group: TensorGroup,
    alpha: AlphaType = 0.9,
    weight: PerInput[WeightType] = 1.0,
    stats: PerInput[str] = "",
) -> torch.Tensor:
    entries = group.entries
    weights = coefficients("regmean", weight, entries)
    tensors = [e.tensor for e in entries]
    found = group_stats("regmean", "gram", group, stats)
    if found is None:
        return weighted_average(tensors, weights)
    shape = tuple(tensors[0].shape)
    axes = {gram_input_axis(shape, s.tensor.shape[0], s.layout) for s in found}
    if len(axes) != 1:
        raise ValueError(
            f"regmean: the models' Grams for {group.metadata.name} disagree on the weight's "
            f"orientation (layouts: {sorted(str(s.layout) for s in found)})"
        )
    return regmean_merge(tensors, [s.tensor for s in found], weights, alpha, axes.pop())


REGMEAN = regmean_kernel
STATS_METHODS: tuple[MergeMethod, ...] = (REGMEAN, FISHER)
STATS_METHOD_NAMES: tuple[str, ...] = tuple(m.spec.name for m in STATS_METHODS)

__all__ = ["REGMEAN", "STATS_METHODS", "STATS_METHOD_NAMES", "check_stats_recipe", "regmean_merge", "shrink"]
