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

A method's parameters are either per model (weight, density, gamma, epsilon)
or shared by the models of a merge (slerp's, nuslerp's and nearswap's t, sce's
select_topk, ram's epsilon, ramplus_tl's r and alpha). A shared one has one
value per group and set: the model axis of the layout has length 1.

Some parameters are searched in a reparametrised form so that every point of
the box is a valid recipe, or so that the box is a sensible one:
- della's epsilon is searched as a fraction of the largest valid epsilon,
  min(density, 1 - density) (mergekit refuses density +/- epsilon outside
  (0, 1)); the recipe holds the resulting epsilon;
- nearswap's t and ram's and ramplus_tl's epsilon are absolute thresholds on
  |difference| (nearswap) or |task vector| (ram), whose useful values span
  orders of magnitude; they are searched as log10_t and log10_epsilon, and the
  recipe holds 10 ** value (so always > 0). With smooth, mergekit interpolates
  the recipe's values, i.e. linearly in t or epsilon between the anchors;
- nuslerp takes two weights but uses only their ratio, t = w2 / (w1 + w2);
  t itself is searched, as for slerp over two models, and the recipe holds the
  weights 1 - t and t (whose sum is never 0);
- slerp over more than two models follows mergekit-evolve: one score per model
  and group, the two best-scored models of a group are interpolated, with t the
  softmax share of the second. Over exactly two models t itself is searched,
  per group and per filter.

Inputs: slerp and nearswap merge exactly two models, the first of which plays
mergekit's base (base_model is not used); slerp also picks pairs out of more.
nuslerp interpolates exactly two models, around base_model when one is given.
multislerp and nuslerp take base_model as optional (task vectors when given),
the task arithmetic family, sce, ram and ramplus_tl require it. (mergekit
0.1.5's multislerp with a base over more than two models raises on a tensor no
model changed from the base, whatever the weights: no box can avoid that.)

Methods of mergekit 0.1.5 left out (see NOT_SEARCHABLE): they have nothing
continuous to search.

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
    "nuslerp": ("t",),
    "multislerp": ("weight",),
    "nearswap": ("log10_t",),
    "sce": ("select_topk",),
    "ram": ("log10_epsilon",),
    "ramplus_tl": ("r", "alpha", "log10_epsilon"),
}
# mergekit 0.1.5's other methods, and why a search has nothing to tune in them.
NOT_SEARCHABLE: dict[str, str] = {
    "karcher": "its only parameters are the Karcher solver's max_iter and tol; "
               "the models' weights are fixed at 1/n",
    "model_stock": "its only parameter is the boolean filter_wise; the "
                   "interpolation ratio is computed from the models",
    "arcee_fusion": "it has no parameters",
    "passthrough": "it takes a single model",
}
# mergekit's generalized task arithmetic family (they take normalize, int8_mask).
_TASK_ARITHMETIC_FAMILY = frozenset({
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear",
})
# Methods mergekit refuses without a base model (BasePolicy.REQUIRED, with the
# base not one of the merged models).
METHODS_NEEDING_BASE = _TASK_ARITHMETIC_FAMILY | {"sce", "ram", "ramplus_tl"}
# Methods whose deltas are taken from a base model: those that need one, and
# those that use one when it is given (BasePolicy.OPTIONAL).
METHODS_WITH_BASE = METHODS_NEEDING_BASE | {"nuslerp", "multislerp"}
# Methods whose parameters are shared by the models (one value per group and
# set); slerp over more than two models has per-model scores instead.
_SHARED = frozenset({"slerp", "nuslerp", "nearswap", "sce", "ram", "ramplus_tl"})
# Methods over exactly two models, the first as mergekit's base.
_PAIR = frozenset({"slerp", "nearswap"})
# mergekit-evolve's int8 sign masks (less memory, same merge), where a method has them.
_INT8_MASK = _TASK_ARITHMETIC_FAMILY | {"sce"}
# The box of each parameter, before a user's `bounds` override.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.0, 1.0),
    "gamma": (0.0, 0.2),
    "epsilon": (0.0, 0.99),  # a fraction of min(density, 1 - density)
    "t": (0.0, 1.0),
    # slerp over > 2 models: pair-choosing scores; t = softmax share, in (0.018, 0.5]
    "score": (0.0, 4.0),
    # sce keeps this share of the elements where the task vectors vary most
    # (0: none, i.e. the base; 1: all).
    "select_topk": (0.0, 1.0),
    # nearswap takes the second model where |a - b| <= t, and t / |a - b| of it
    # elsewhere. Fine-tunes differ from each other by ~1e-4 to 1e-2 an element,
    # so t = 1e-6 keeps nearly all of the first model and t = 0.1 nearly all
    # of the second.
    "log10_t": (-6.0, -1.0),
    # ram counts a task-vector element as changed where |delta| > epsilon;
    # below ~1e-8 is float noise, and 1e-2 drops most of a fine-tune's changes.
    "log10_epsilon": (-8.0, -2.0),
    # ramplus_tl boosts each model's unique changes by 1 + r * min(rho, alpha),
    # rho being the model's shared/unique element ratio: up to 2x at the corner.
    "r": (0.0, 1.0),
    "alpha": (0.0, 1.0),
}
# The default recipe (mergekit-evolve's starting point), weight = 1/models;
# the others are mergekit's defaults (nearswap's t has none: its reference
# model's 1e-4).
DEFAULT_START: dict[str, float] = {
    "density": 1.0, "gamma": 0.01, "epsilon": 0.5, "t": 0.5, "select_topk": 1.0,
    "log10_t": -4.0, "log10_epsilon": -5.0, "r": 0.1, "alpha": 0.2,
}


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
            why = f" ({NOT_SEARCHABLE[method]})" if method in NOT_SEARCHABLE else ""
            raise GenomeError(
                f"merge_method {method!r} cannot be searched{why}; "
                f"choose one of {', '.join(METHOD_PARAMETERS)}"
            )
        if method in METHODS_NEEDING_BASE and not self.base_model:
            raise GenomeError(f"{method} needs a base_model")
        if len(self.models) < 2:
            raise GenomeError("a recipe search needs at least two models")
        if method == "nearswap" and len(self.models) != 2:
            raise GenomeError(
                f"nearswap merges exactly two models (the first as its base); got {len(self.models)}"
            )
        if method == "nuslerp" and len(self.models) != 2:
            raise GenomeError(
                f"nuslerp interpolates exactly two models; got {len(self.models)} (multislerp takes more)"
            )
        if method == "nuslerp" and self._base in self.models:
            raise GenomeError("nuslerp's base_model cannot be one of the two models it interpolates")
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
        """The common ancestor deltas are taken from, if the method takes one."""
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
        shared = self.merge_method in _SHARED and not self._pairwise
        models = 1 if shared else len(self.models)
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
        if self._pairwise:
            self._pairwise_slerp(grid, data)
        elif self.merge_method in _PAIR:
            self._pair(self._values(grid)[1], data)
        else:
            per_model, shared = self._values(grid)

            def source(i: int, m: str, group: Optional[int], **extra) -> dict:
                entry = {"model": m, **extra}
                if per_model:
                    entry["parameters"] = self._model_parameters(per_model, group, i)
                return entry

            parameters: dict[str, Any] = {}
            if self.smooth or self.groups == 1:
                group = None if self.smooth else 0
                data["models"] = [source(i, m, group) for i, m in enumerate(self.models)]
                if shared:
                    parameters.update(self._model_parameters(shared, group, 0))
            else:
                data["slices"] = []
                for g in range(self.groups):
                    piece: dict[str, Any] = {"sources": [
                        source(i, m, g, layer_range=self._layers(g)) for i, m in enumerate(self.models)
                    ] + self._base_source(g)}
                    if shared:
                        piece["parameters"] = self._model_parameters(shared, g, 0)
                    data["slices"].append(piece)
            if self._base:
                data["base_model"] = self._base
            method = self.merge_method
            if method in _TASK_ARITHMETIC_FAMILY or method == "linear":
                normalize = self.normalize
                if normalize is None:  # mergekit-evolve's rule
                    normalize = method in ("ties", "dare_ties", "linear")
                parameters["normalize"] = normalize
            if method == "multislerp" and self.normalize is not None:
                parameters["normalize_weights"] = self.normalize
            if method in _INT8_MASK:
                parameters["int8_mask"] = True
            data["parameters"] = parameters
        if self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        return data

    def _values(self, grid: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The values mergekit is given, as [group, model, set] arrays: the
        per-model ones, and the shared ones (model axis of length 1)."""
        values = {name: grid[..., k] for k, name in enumerate(self.parameters)}
        if "epsilon" in values:
            d = values["density"]
            values["epsilon"] = values["epsilon"] * np.minimum(d, 1.0 - d)
        for name in [n for n in values if n.startswith("log10_")]:
            values[name.removeprefix("log10_")] = 10.0 ** values.pop(name)
        if self.merge_method == "nuslerp":
            t = values.pop("t")
            return {"weight": np.concatenate([1.0 - t, t], axis=1)}, {}
        if self.merge_method in _SHARED:
            return {}, values
        return values, {}

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

    def _pair(self, shared: dict[str, np.ndarray], data: dict[str, Any]) -> None:
        """Two models, the first as mergekit's base, with shared parameters."""
        a, b = self.models
        if self.smooth or self.groups == 1:
            data["base_model"] = a
            data["models"] = [{"model": a}, {"model": b}]
            data["parameters"] = self._model_parameters(shared, None if self.smooth else 0, 0)
            return
        data["slices"] = [
            {"sources": [{"model": a, "layer_range": self._layers(g)},
                         {"model": b, "layer_range": self._layers(g)}],
             "base_model": a,
             "parameters": self._model_parameters(shared, g, 0)}
            for g in range(self.groups)
        ]

    def _pairwise_slerp(self, grid: np.ndarray, data: dict[str, Any]) -> None:
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
