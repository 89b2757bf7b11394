"""A recipe genome: a flat vector of merge parameters <-> a mergekit recipe.

The vector is laid out as mergekit-evolve lays it out, [layer group, model,
parameter set, parameter] in C order, where the parameter sets are the
`filters` (e.g. self_attn, mlp) and then "everything else". Each coordinate
is the parameter's own value, so the optimizer's box is the parameter's valid
range: no abs() or clamp folds a coordinate back afterwards.

Layouts over the layers:
- one group (layer_granularity 0): one value per model, set and parameter;
- discrete groups: a `slices:` recipe, one slice per group of
  layer_granularity layers, each with its own values;
- smooth: a `models:` recipe whose values are mergekit gradients, anchored at
  the groups and interpolated by mergekit across the layers.

Two parameters are searched in a reparametrised form so that every point of
the box is a valid recipe:
- della's epsilon is searched as a fraction of the largest valid epsilon,
  min(density, 1 - density) (mergekit refuses density +/- epsilon outside
  (0, 1)); the recipe holds the resulting epsilon;
- slerp over more than two models follows mergekit-evolve: one score per model
  and group, the two best-scored models of a group are interpolated, with t the
  softmax share of the second. Over exactly two models t itself is searched,
  per group and per filter.

This module builds plain dicts and does no I/O; recipes.parse.parse_merge_config turns
them into checked MergeConfigurations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

# The searched parameters of each method, weight first (mergekit-evolve's order).
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "dare_linear": ("weight", "density"),
    "breadcrumbs": ("weight", "density", "gamma"),
    "breadcrumbs_ties": ("weight", "density", "gamma"),
    "della": ("weight", "density", "epsilon"),
    "della_linear": ("weight", "density", "epsilon"),
    "slerp": ("t",),
}
# Methods whose deltas are taken from a base model.
METHODS_WITH_BASE = frozenset(METHOD_PARAMETERS) - {"linear", "slerp"}
# mergekit's generalized task arithmetic family (they take normalize, int8_mask).
_TASK_ARITHMETIC_FAMILY = METHODS_WITH_BASE
# The box of each parameter, before a user's `bounds` override.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.0, 1.0),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.99),  # a fraction of min(density, 1 - density)
    "t": (0.0, 1.0),
    # slerp over > 2 models: pair-choosing scores; t = softmax share, in (0.018, 0.5]
    "score": (0.0, 4.0),
}
# The default recipe (mergekit-evolve's starting point), weight = 1/models.
DEFAULT_START: dict[str, float] = {"density": 1.0, "gamma": 0.01, "epsilon": 0.5, "t": 0.5}


class GenomeError(ValueError):
    pass


@dataclass(frozen=True)
class RecipeGenome:
    merge_method: str
    models: tuple[str, ...]
    num_layers: int
    base_model: Optional[str] = None
    layer_granularity: int = 0
    filters: tuple[str, ...] = ()
    smooth: bool = False
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    start: dict[str, float] = field(default_factory=dict)
    tokenizer_source: Optional[str] = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        method = self.merge_method
        if method not in METHOD_PARAMETERS:
            raise GenomeError(
                f"merge_method {method!r} cannot be searched; choose one of {', '.join(METHOD_PARAMETERS)}"
            )
        if method in METHODS_WITH_BASE and not self.base_model:
            raise GenomeError(f"{method} needs a base_model")
        if len(self.models) < 2:
            raise GenomeError("a recipe search needs at least two models")
        g = self.layer_granularity
        if g < 0 or (g > 0 and self.num_layers % g):
            raise GenomeError(
                f"layer_granularity {g} does not divide the model's {self.num_layers} layers"
            )
        if method == "slerp" and self._pairwise and (self.filters or self.smooth):
            raise GenomeError(
                "slerp over more than two models picks a pair per layer group, "
                "so it takes neither filters nor smooth"
            )
        if self.smooth and self.groups < 2:
            raise GenomeError("smooth needs layer_granularity > 0 and at least two layer groups")
        for name, (lo, hi) in self.bounds.items():
            if name not in self.parameters:
                raise GenomeError(f"bounds for {name}, which {method} does not search")
            if not lo < hi:
                raise GenomeError(f"bounds for {name} need low < high; got [{lo}, {hi}]")
        for name in self.start:
            if name not in self.parameters:
                raise GenomeError(f"start value for {name}, which {method} does not search")

    # -- shape --------------------------------------------------------------
    @property
    def _base(self) -> Optional[str]:
        """The common ancestor deltas are taken from; linear and slerp have none."""
        return self.base_model if self.merge_method in METHODS_WITH_BASE else None

    @property
    def _pairwise(self) -> bool:
        return self.merge_method == "slerp" and len(self.models) > 2

    @property
    def parameters(self) -> tuple[str, ...]:
        return ("score",) if self._pairwise else METHOD_PARAMETERS[self.merge_method]

    @property
    def groups(self) -> int:
        return self.num_layers // self.layer_granularity if self.layer_granularity else 1

    @property
    def shape(self) -> tuple[int, int, int, int]:
        # slerp over a pair has one t per group and set, not one per model.
        models = 1 if self.merge_method == "slerp" and not self._pairwise else len(self.models)
        return (self.groups, models, len(self.filters) + 1, len(self.parameters))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def _per_parameter(self, values: dict[str, float]) -> np.ndarray:
        out = np.empty(self.shape)
        for k, name in enumerate(self.parameters):
            out[..., k] = values[name]
        return out.reshape(-1)

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        def bound(name: str) -> tuple[float, float]:
            if name in self.bounds:
                return self.bounds[name]
            if name == "weight" and self.allow_negative_weights:
                return (-1.0, 1.0)
            return DEFAULT_BOUNDS[name]

        los = {n: bound(n)[0] for n in self.parameters}
        his = {n: bound(n)[1] for n in self.parameters}
        return self._per_parameter(los), self._per_parameter(his)

    def default(self) -> np.ndarray:
        """The default recipe (uniform weights), inside the box."""
        values = {**DEFAULT_START, "weight": 1.0 / len(self.models), "score": 0.5, **self.start}
        lo, hi = self.box()
        return np.clip(self._per_parameter(values), lo, hi)

    def describe(self, x: np.ndarray) -> dict[str, list]:
        """Each parameter's values by [group][model][set], for logs and the ledger."""
        grid = np.asarray(x, dtype=float).reshape(self.shape)
        return {name: grid[..., k].round(6).tolist() for k, name in enumerate(self.parameters)}

    # -- recipe -------------------------------------------------------------
    def recipe(self, x: Sequence[float]) -> dict[str, Any]:
        grid = np.asarray(x, dtype=float)
        if grid.size != self.size:
            raise GenomeError(f"a genome of {self.size} values was given {grid.size}")
        grid = grid.reshape(self.shape)
        data: dict[str, Any] = {"merge_method": self.merge_method, "dtype": self.dtype}
        if self.merge_method == "slerp":
            self._slerp(grid, data)
        else:
            values = self._values(grid)
            if self.smooth:
                data["models"] = [
                    {"model": m, "parameters": self._model_parameters(values, None, i)}
                    for i, m in enumerate(self.models)
                ]
            elif self.groups == 1:
                data["models"] = [
                    {"model": m, "parameters": self._model_parameters(values, 0, i)}
                    for i, m in enumerate(self.models)
                ]
            else:
                data["slices"] = [
                    {"sources": [
                        {"model": m, "layer_range": self._layers(g),
                         "parameters": self._model_parameters(values, g, i)}
                        for i, m in enumerate(self.models)
                    ] + self._base_source(g)}
                    for g in range(self.groups)
                ]
            if self._base:
                data["base_model"] = self._base
            parameters = {}
            if self.merge_method in _TASK_ARITHMETIC_FAMILY or self.merge_method == "linear":
                normalize = self.normalize
                if normalize is None:  # mergekit-evolve's rule
                    normalize = self.merge_method in ("ties", "dare_ties", "linear")
                parameters["normalize"] = normalize
            if self.merge_method in _TASK_ARITHMETIC_FAMILY:
                parameters["int8_mask"] = True
            data["parameters"] = parameters
        if self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        return data

    def _values(self, grid: np.ndarray) -> dict[str, np.ndarray]:
        """Per-parameter [group, model, set] arrays, epsilon made absolute."""
        values = {name: grid[..., k] for k, name in enumerate(self.parameters)}
        if "epsilon" in values:
            d = values["density"]
            values["epsilon"] = values["epsilon"] * np.minimum(d, 1.0 - d)
        return values

    def _model_parameters(self, values: dict[str, np.ndarray], group: Optional[int], model: int) -> dict:
        """One model's parameters, a number or a gradient (group None), per filter."""

        def at(array: np.ndarray, s: int):
            if group is None:
                return [float(v) for v in array[:, model, s]]
            return float(array[group, model, s])

        out = {}
        for name, array in values.items():
            if not self.filters:
                out[name] = at(array, 0)
            else:
                out[name] = [
                    {"filter": f, "value": at(array, s)} for s, f in enumerate(self.filters)
                ] + [{"value": at(array, len(self.filters))}]
        return out

    def _layers(self, group: int) -> list[int]:
        step = self.layer_granularity or self.num_layers
        return [group * step, (group + 1) * step]

    def _base_source(self, group: int) -> list[dict]:
        if self._base and self._base not in self.models:
            return [{"model": self._base, "layer_range": self._layers(group)}]
        return []

    def _slerp(self, grid: np.ndarray, data: dict[str, Any]) -> None:
        if not self._pairwise:
            t = {"t": grid[..., 0]}
            a, b = self.models
            if self.smooth or self.groups == 1:
                data["base_model"] = a
                data["models"] = [{"model": a}, {"model": b}]
                data["parameters"] = self._model_parameters(t, None if self.smooth else 0, 0)
                return
            data["slices"] = [
                {"sources": [{"model": a, "layer_range": self._layers(g)},
                             {"model": b, "layer_range": self._layers(g)}],
                 "base_model": a,
                 "parameters": self._model_parameters(t, g, 0)}
                for g in range(self.groups)
            ]
            return
        slices = []
        for g in range(self.groups):
            scores = grid[g, :, 0, 0]
            first, second = (int(i) for i in np.argsort(-scores, kind="stable")[:2])
            pair = np.exp(scores[[first, second]] - scores[first])
            slices.append({
                "sources": [{"model": self.models[i], "layer_range": self._layers(g)}
                            for i in (first, second)],
                "base_model": self.models[first],
                "parameters": {"t": float(pair[1] / pair.sum())},
            })
        data["slices"] = slices
