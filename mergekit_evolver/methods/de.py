"""Differential-evolution offspring as mergekit merge methods.

`base_model` is the target individual x; the other models are the donors, in
config order. Each method builds a mutant v from x and the donors, then a trial
u by crossover: u takes v where the crossover mask is set and x elsewhere.

    de_rand1             donors r1, r2, r3    v = r1 + F*(r2 - r3)
    de_best1             donors best, r1, r2  v = best + F*(r1 - r2)
    de_current_to_best1  donors best, r1, r2  v = x + F*(best - x) + F*(r1 - r2)
    de_current_to_rand1  donor r              v = x + F*(r - x)

The difference terms may be sparsified first: `sparsify: dare` keeps each
element with probability `density` and rescales by 1/density; `sparsify:
magnitude` keeps the `density` share of largest magnitudes (TIES trimming).

`space: task_vectors` mutates task vectors tau = theta - theta_0 relative to a
reference base theta_0, listed among the models with `reference: true`. DE's
differences cancel theta_0, so without sparsification this is the weight-space
arithmetic; with it, each input's task vector is sparsified (as DARE and TIES
do) before the mutant is formed:
    v = theta_0 + S(tau_anchor) + F*(S(tau_a) - S(tau_b)) + ...
The trial still keeps x's own weights where the crossover mask is unset.

`exclude` (a regex searched in the tensor name) leaves tensors out of mutation:
they are x's own weights, as the Evolver's authors leave classifier heads out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, get_args

import torch
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    MergeMethod,
    PerNonBase,
    TensorGroup,
    merge_method,
)
from mergekit.sparsify import magnitude
from pydantic import AfterValidator
from typing_extensions import Annotated

from mergekit_evolver.methods.masks import (
    CrossoverKind,
    Granularity,
    crossover_mask,
    keep_mask,
)

F_RANGE = (0.0, 2.0)


def _check_range(name: str, low: float, high: float, *, open_low: bool = False):
    def check(value: float) -> float:
        below = value <= low if open_low else value < low
        if below or value > high:
            bracket = "(" if open_low else "["
            raise ValueError(f"{name} must be in {bracket}{low}, {high}]; got {value}")
        return value

    return AfterValidator(check)


def _check_seed(value: int) -> int:
    if value < 0:
        raise ValueError(f"seed must be a non-negative integer; got {value}")
    return value


def _check_regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"exclude must be a regular expression; got {value!r} ({e})") from None
    return value


def _one_of(name: str, literal) -> AfterValidator:
    # A plain Literal's error would not say which parameter was wrong.
    choices = get_args(literal)

    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        return value

    return AfterValidator(check)


FType = Annotated[float, _check_range("F", *F_RANGE)]
CRType = Annotated[float, _check_range("CR", 0.0, 1.0)]
DensityType = Annotated[float, _check_range("density", 0.0, 1.0, open_low=True)]
SeedType = Annotated[int, AfterValidator(_check_seed)]
Sparsify = Literal["none", "dare", "magnitude"]
CrossoverParam = Annotated[str, _one_of("crossover", CrossoverKind)]
GranularityParam = Annotated[str, _one_of("granularity", Granularity)]
SparsifyParam = Annotated[str, _one_of("sparsify", Sparsify)]
Space = Literal["weights", "task_vectors"]
SpaceParam = Annotated[str, _one_of("space", Space)]
ExcludeParam = Annotated[str, AfterValidator(_check_regex)]


@dataclass(frozen=True)
class DonorContract(InputContract):
    """An input contract whose errors name the method and its donor roles.
    One more input is allowed: the reference base of task-vector space."""

    method: str = ""
    donors: tuple[str, ...] = ()

    def validate_ids(self, input_ids, base_id=None, *, group_name=None) -> None:
        where = f" (at {group_name})" if group_name else ""
        if base_id is None or base_id not in input_ids:
            raise ValueError(self.missing_base_message() + where)
        got = len(input_ids) - 1
        if got not in (len(self.donors), len(self.donors) + 1):
            raise ValueError(self.count_message(got) + where)
        super().validate_ids(input_ids, base_id, group_name=group_name)

    def missing_base_message(self) -> str:
        return f"{self.method} needs base_model: it is the target individual x"

    def count_message(self, got: int) -> str:
        return (
            f"{self.method} needs exactly {len(self.donors)} donor model(s) "
            f"({', '.join(self.donors)}) besides base_model; got {got}"
        )


def donor_contract(method: str, donors: Sequence[str]) -> DonorContract:
    n = len(donors)
    return DonorContract(
        base=BasePolicy.REQUIRED,
        min_inputs=n + 1,
        max_inputs=n + 2,
        min_non_base=n,
        max_non_base=n + 1,
        method=method,
        donors=tuple(donors),
    )


@dataclass(frozen=True)
class Sparsifier:
    """How difference terms are thinned before they are scaled by F."""

    method: Sparsify = "none"
    density: float = 1.0
    seed: int = 0
    name: str = ""

    def __call__(self, diff: torch.Tensor, term: int) -> torch.Tensor:
        if self.method == "none" or self.density >= 1:
            return diff
        if self.method == "magnitude":
            return magnitude(diff, self.density)
        keep = keep_mask(
            diff.shape, self.density, seed=self.seed, name=self.name, term=term
        ).to(diff.device)
        # Equal to where(keep, diff / density, 0), without a second full buffer.
        return diff.masked_fill_(keep.logical_not_(), 0).div_(self.density)


def mutate(
    anchor: torch.Tensor,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    F: float,
    sparsifier: Sparsifier = Sparsifier(),
) -> torch.Tensor:
    """v = anchor + F*(a_0 - b_0) + F*(a_1 - b_1) + ..., left to right in float32.

    In place on one fresh buffer: the offspring costs a few memory passes, and
    each step rounds exactly as the written formula does.
    """
    out: Optional[torch.Tensor] = None
    for term, (a, b) in enumerate(pairs):
        diff = torch.sub(a, b)
        diff = sparsifier(diff, term)
        diff.mul_(F)
        if out is None:
            out = diff.add_(anchor)
        else:
            out.add_(diff)
            del diff
    assert out is not None
    return out


def crossover(
    x: torch.Tensor,
    v: torch.Tensor,
    CR: float,
    *,
    seed: int,
    name: str,
    kind: CrossoverKind = "binomial",
    granularity: Granularity = "element",
) -> torch.Tensor:
    """u = where(mask, v, x), written into v's buffer (v is consumed)."""
    if CR >= 1 and granularity != "tensor":
        return v
    mask = crossover_mask(
        x.shape, CR, seed=seed, name=name, kind=kind, granularity=granularity
    ).to(x.device)
    return torch.where(mask, v, x, out=v)


# Each operator maps (x, donors) to (anchor, difference pairs).
Operator = Callable[
    [torch.Tensor, Sequence[torch.Tensor]],
    tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]],
]

OPERATORS: dict[str, tuple[tuple[str, ...], Operator]] = {
    "de_rand1": (("r1", "r2", "r3"), lambda x, d: (d[0], [(d[1], d[2])])),
    "de_best1": (("best", "r1", "r2"), lambda x, d: (d[0], [(d[1], d[2])])),
    "de_current_to_best1": (
        ("best", "r1", "r2"),
        lambda x, d: (x, [(d[0], x), (d[1], d[2])]),
    ),
    "de_current_to_rand1": (("r",), lambda x, d: (x, [(d[0], x)])),
}


def offspring(
    operator: str,
    x: torch.Tensor,
    donors: Sequence[torch.Tensor],
    *,
    F: float,
    CR: float,
    seed: int,
    name: str,
    kind: CrossoverKind = "binomial",
    granularity: Granularity = "element",
    sparsify: Sparsify = "none",
    density: float = 1.0,
    reference: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One DE trial tensor, in float32, for tensor `name` of individual x.
    With a reference base the mutant is formed in task-vector space."""
    roles, build = OPERATORS[operator]
    if len(donors) != len(roles):
        raise ValueError(
            f"{operator} needs {len(roles)} donors ({', '.join(roles)}); got {len(donors)}"
        )
    x = x.to(torch.float32)
    donors = [d.to(torch.float32) for d in donors]
    sparsifier = Sparsifier(sparsify, density, seed, name)
    if reference is None:
        anchor, pairs = build(x, donors)
        v = mutate(anchor, pairs, F, sparsifier)
    else:
        theta0 = reference.to(torch.float32)
        # One sparsified task vector per input, keyed by its position.
        taus = [sparsifier(torch.sub(t, theta0), term) for term, t in enumerate([x, *donors])]
        anchor, pairs = build(taus[0], taus[1:])
        v = mutate(anchor, pairs, F).add_(theta0)
    return crossover(x, v, CR, seed=seed, name=name, kind=kind, granularity=granularity)


def check_reference(
    operator: str, contract: DonorContract, space: str, n_refs: int, n_donors: int
) -> None:
    if n_refs > 1:
        raise ValueError(f"{operator}: at most one model may be marked reference; got {n_refs}")
    if space == "task_vectors" and not n_refs:
        raise ValueError(
            f"{operator} with space: task_vectors needs the reference base among its "
            "models, marked `reference: true`"
        )
    if space == "weights" and n_refs:
        raise ValueError(
            f"{operator}: a model marked reference is only used with space: task_vectors"
        )
    if n_donors != len(contract.donors):
        raise ValueError(contract.count_message(n_donors))


def check_recipe(config) -> None:
    """A DE recipe's donors and reference, checked from the config before
    mergekit plans it (mergekit only sees a count within a range)."""
    if config.merge_method not in OPERATORS or not config.models:
        return  # slice-style configs are checked per tensor by the kernel
    params = config.parameters or {}
    space = params.get("space", "weights")
    non_base = [m for m in config.models if m.model != config.base_model]
    refs = [m for m in non_base if (m.parameters or {}).get("reference") is True]
    contract = DE_CONTRACTS[config.merge_method]
    if config.base_model is None:
        raise ValueError(contract.missing_base_message())
    if isinstance(space, str):
        check_reference(config.merge_method, contract, space, len(refs), len(non_base) - len(refs))


def _make_method(operator: str) -> MergeMethod:
    roles, _ = OPERATORS[operator]

    contract = DE_CONTRACTS[operator]

    def kernel(
        group: TensorGroup,
        seed: SeedType,
        F: FType = 0.5,
        CR: CRType = 0.5,
        crossover: CrossoverParam = "binomial",
        granularity: GranularityParam = "element",
        sparsify: SparsifyParam = "none",
        density: DensityType = 1.0,
        space: SpaceParam = "weights",
        reference: PerNonBase[bool] = False,
        exclude: ExcludeParam = "",
    ) -> torch.Tensor:
        x = group.base.tensor
        name = group.metadata.name or ""
        if exclude and re.search(exclude, name):
            return x  # left out of mutation: the target's own weights
        refs = [e.tensor for e in group.non_base if reference[e.id]]
        donors = [e.tensor for e in group.non_base if not reference[e.id]]
        check_reference(operator, contract, space, len(refs), len(donors))
        return offspring(
            operator,
            x,
            donors,
            reference=refs[0] if refs else None,
            F=F,
            CR=CR,
            seed=seed,
            name=name,
            kind=crossover,
            granularity=granularity,
            sparsify=sparsify,
            density=density,
        )

    return merge_method(
        kernel,
        name=operator,
        pretty_name=f"DE {operator[3:]} offspring",
        reference_url="https://aclanthology.org/2024.findings-acl.698/",
        contract=contract,
    )


DE_CONTRACTS = {op: donor_contract(op, roles) for op, (roles, _) in OPERATORS.items()}
DE_METHODS: tuple[MergeMethod, ...] = tuple(_make_method(op) for op in OPERATORS)
