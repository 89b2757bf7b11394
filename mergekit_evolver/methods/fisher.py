"""Fisher merging (Matena & Raffel, 2022) as a mergekit merge method.

    θ* = Σ_i w_i F̂_i ⊙ θ_i / Σ_i w_i F̂_i,   F̂_i = max(F_i, fisher_floor)  (elementwise)

F_i is model i's diagonal Fisher (see mergekit_evolver.stats.store), w_i its `weight`
(default 1.0). The floor keeps 0/0 away and turns elements no model is sensitive
to into the weighted average; with `fisher_floor: 0`, elements where every F_i
is 0 take the weighted average. A tensor no model has a Fisher for (a buffer, a
tied lm_head) is the weighted average Σ w_i θ_i / Σ w_i.

Parameters
    fisher_floor  shared, float >= 0, default 1e-6
    weight        per model, float >= 0 (not all 0), default 1.0
    stats         per model, the stats dir; default `<model dir>/stats`. An
                  offspring without statistics of its own names the original
                  model's dir here.

No base_model; at least 2 models. Computed in float64, returned in the input
dtype. Example:

    merge_method: fisher
    models:
      - model: ./specialist_a                 # reads ./specialist_a/stats
      - model: ./offspring_3
        parameters: {stats: ./specialist_b/stats, weight: 2.0}
    parameters: {fisher_floor: 1.0e-6}
    dtype: float32
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from mergekit.merge_methods import BasePolicy, InputContract, PerInput, TensorGroup, merge_method
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_evolver.stats.store import group_stats

REFERENCE = "https://arxiv.org/abs/2111.09832"


def _at_least_zero(name: str) -> AfterValidator:
    def check(value: float) -> float:
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        return value

    return AfterValidator(check)


WeightType = Annotated[float, _at_least_zero("weight")]
FloorType = Annotated[float, _at_least_zero("fisher_floor")]


@dataclass(frozen=True)
class StatsContract(InputContract):
    """No base model, at least two inputs; errors name the method."""

    method: str = ""

    def validate_ids(self, input_ids, base_id=None, *, group_name=None) -> None:
        where = f" (at {group_name})" if group_name else ""
        if base_id is not None and base_id in input_ids:
            raise ValueError(f"{self.method} takes no base_model; remove base_model: {base_id}{where}")
        if len(input_ids) < 2:
            raise ValueError(f"{self.method} needs at least 2 models; got {len(input_ids)}{where}")
        super().validate_ids(input_ids, base_id, group_name=group_name)


def stats_contract(method: str) -> StatsContract:
    return StatsContract(base=BasePolicy.FORBIDDEN, min_inputs=2, method=method)


def coefficients(method: str, weight, entries) -> list[float]:
    values = [float(weight[e.id]) for e in entries]
    if not sum(values) > 0:
        raise ValueError(f"{method}: the models' weights sum to {sum(values)}; at least one must be > 0")
    return values


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i θ_i / Σ w_i in float64, returned in the first input's dtype."""
    total = torch.zeros_like(tensors[0], dtype=torch.float64)
    for tensor, w in zip(tensors, weights):
        total.add_(tensor.to(torch.float64), alpha=w)
    return total.div_(sum(weights)).to(tensors[0].dtype)


def fisher_merge(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    floor: float = 1e-6,
) -> torch.Tensor:
    """Σ w F̂ θ / Σ w F̂ elementwise, F̂ = max(F, floor); where the denominator is 0,
    the weighted average."""
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for theta, fisher, w in zip(tensors, fishers, weights):
        f = fisher.to(device=num.device, dtype=torch.float64).clamp_min(floor).mul_(w)
        num.addcmul_(f, theta.to(torch.float64))
        den.add_(f)
    out = num.div_(den)
    empty = den == 0
    if empty.any():
        out = torch.where(empty, weighted_average(tensors, weights).to(torch.float64), out)
    return out.to(tensors[0].dtype)


@merge_method(
    name="fisher",
    pretty_name="Fisher merging",
    reference_url=REFERENCE,
    contract=stats_contract("fisher"),
)
def fisher_kernel(
    group: TensorGroup,
    fisher_floor: FloorType = 1e-6,
    weight: PerInput[WeightType] = 1.0,
    stats: PerInput[str] = "",
) -> torch.Tensor:
    entries = group.entries
    weights = coefficients("fisher", weight, entries)
    tensors = [e.tensor for e in entries]
    found = group_stats("fisher", "fisher", group, stats)
    if found is None:
        return weighted_average(tensors, weights)
    return fisher_merge(tensors, [s.tensor for s in found], weights, fisher_floor)


FISHER = fisher_kernel
