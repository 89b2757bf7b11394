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

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
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
    Crossover,
    CrossoverKind,
    Draws,
    Granularity,
    Keep,
    unit_count,
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
    # The whole tensor's shape: DARE's masks are keyed by it, and a block
    # (a flat slice starting at element `lo`) does not know it.
    shape: Optional[tuple[int, ...]] = None

    def __call__(
        self, diff: torch.Tensor, term: int, lo: int = 0, draws: Optional[Draws] = None
    ) -> torch.Tensor:
        if self.method == "none" or self.density >= 1:
            return diff
        if self.method == "magnitude":
            return magnitude(diff, self.density)  # whole tensors only: a top-k share
        shape = diff.shape if self.shape is None else self.shape
        keep = Keep(shape, self.density, seed=self.seed, name=self.name, term=term)
        # Equal to where(keep, diff / density, 0), without a second full buffer.
        return keep.apply_(diff.view(-1), lo, draws).view(diff.shape)


def mutate(
    anchor: torch.Tensor,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    F: float,
    sparsifier: Sparsifier = Sparsifier(),
    *,
    out: Optional[torch.Tensor] = None,
    lo: int = 0,
    draws: Optional[Draws] = None,
) -> torch.Tensor:
    """v = anchor + F*(a_0 - b_0) + F*(a_1 - b_1) + ..., left to right in float32.

    In place on one buffer (`out`, or a fresh one): the offspring costs a few
    memory passes, and each step rounds exactly as the written formula does.
    `lo` is the first element's index when the inputs are a block of a tensor.
    """
    result: Optional[torch.Tensor] = None
    for term, (a, b) in enumerate(pairs):
        first = result is None and out is not None
        diff = torch.sub(a, b, out=out) if first else torch.sub(a, b)
        diff = sparsifier(diff, term, lo, draws)
        diff.mul_(F)
        if result is None:
            result = diff.add_(anchor)
        else:
            result.add_(diff)
            del diff
    assert result is not None
    return result


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
    plan = Crossover(x.shape, CR, seed=seed, name=name, kind=kind, granularity=granularity)
    plan.apply_(v.view(-1), x.reshape(-1).to(torch.float32))
    return v


# At most about 4 MB of float32 per block, so a block's buffers stay in a CPU's L2/L3.
BLOCK_ELEMENTS = 1 << 20
# Tensors up to this size run in the calling thread, as one block.
MIN_BLOCK_ELEMENTS = 1 << 16
# On an accelerator the passes are memory-bound anyway; large blocks amortize launches.
DEVICE_BLOCK_ELEMENTS = 1 << 24


def block_elements(
    shape: Sequence[int], granularity: Granularity, device: torch.device, workers: int = 1
) -> int:
    """Elements per block of the offspring loop, whole rows for row granularity,
    and at least one block per worker once a tensor is past MIN_BLOCK_ELEMENTS.
    Blocks never change a value: the math is elementwise, the masks keyed by index."""
    n = unit_count(shape, "element")
    if device.type == "cpu":
        target = min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, -(-n // max(1, workers))))
    else:
        target = DEVICE_BLOCK_ELEMENTS
    row = unit_count(tuple(shape)[1:], "element") if granularity == "row" and shape else 1
    return max(1, target // max(1, row)) * max(1, row)


# OpenMP's thread count is per calling thread, so pool workers can run
# single-threaded while the caller keeps its own; other backends share one count.
_PER_THREAD_NUM_THREADS = "parallel backend: OpenMP" in torch.__config__.parallel_info()
_pool: Optional[tuple[int, int, ThreadPoolExecutor]] = None  # (pid, workers, pool)
_pool_lock = threading.Lock()


def _block_workers(device: torch.device) -> int:
    return torch.get_num_threads() if device.type == "cpu" and _PER_THREAD_NUM_THREADS else 1


def _single_threaded() -> None:
    # A thread takes torch's process-wide default on its first query or parallel
    # op; take it first, so the restored default cannot undo the 1 set here.
    torch.get_num_threads()
    torch.set_num_threads(1)


def _block_pool(workers: int) -> ThreadPoolExecutor:
    """A process's pool of single-threaded block workers, made once per thread
    count (and again after a fork, whose child has none of the threads)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool[:2] == (os.getpid(), workers):
            return _pool[2]
        if _pool is not None and _pool[0] == os.getpid():
            _pool[2].shutdown(wait=False)
        pool = ThreadPoolExecutor(
            workers, thread_name_prefix="de-offspring", initializer=_single_threaded
        )
        # Start every worker now (each waits for the others), then put back the
        # process-wide default that set_num_threads also wrote.
        started = threading.Barrier(workers, timeout=60)
        try:
            for future in [pool.submit(started.wait) for _ in range(workers)]:
                future.result()
        finally:
            torch.set_num_threads(workers)
        _pool = (os.getpid(), workers, pool)
        return pool


def _for_blocks(
    starts: Sequence[int], device: torch.device, block: Callable[[int, Draws], None]
) -> None:
    """block(lo, draws) for every start, with scratch per worker thread.

    On a CPU the blocks are spread over torch's thread count of single-threaded
    workers, instead of splitting each op of a block over the threads: a block
    is ~20 small ops, and every op's fork/join stalls whenever the machine is
    busy. Blocks write disjoint slices, so the result is the same bits.
    """
    workers = min(_block_workers(device), len(starts))
    if workers <= 1:
        draws = Draws(device)
        for lo in starts:
            block(lo, draws)
        return
    scratch: dict[int, Draws] = {}

    def run(lo: int) -> None:
        draws = scratch.get(threading.get_ident())
        if draws is None:
            draws = scratch[threading.get_ident()] = Draws(device)
        block(lo, draws)

    for _ in _block_pool(_block_workers(device)).map(run, starts):
        pass


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
    shape = tuple(x.shape)
    n = x.numel()
    plan = Crossover(shape, CR, seed=seed, name=name, kind=kind, granularity=granularity)
    if plan.whole and not plan.take_all:
        return x.to(torch.float32, copy=True)  # the target's own tensor: no mutant needed
    flat = [t.reshape(-1) for t in (x, *donors)]
    theta0 = None if reference is None else reference.reshape(-1)
    sparsifier = Sparsifier(sparsify, density, seed, name, shape)
    # A top-k share is a whole-tensor statistic: magnitude trimming takes one block.
    if sparsify == "magnitude":
        step = max(1, n)
    else:
        step = block_elements(shape, plan.granularity, x.device, _block_workers(x.device))
    out = torch.empty(n, dtype=torch.float32, device=x.device)

    def block(lo: int, draws: Draws) -> None:
        hi = min(n, lo + step)
        into = out[lo:hi]
        xb, *db = (t[lo:hi].to(torch.float32) for t in flat)
        if theta0 is None:
            anchor, pairs = build(xb, db)
            v = mutate(anchor, pairs, F, sparsifier, out=into, lo=lo, draws=draws)
        else:
            t0 = theta0[lo:hi].to(torch.float32)
            # One sparsified task vector per input, keyed by its position.
            taus = [
                sparsifier(torch.sub(t, t0), term, lo, draws)
                for term, t in enumerate([xb, *db])
            ]
            anchor, pairs = build(taus[0], taus[1:])
            v = mutate(anchor, pairs, F, out=into).add_(t0)
        if v.data_ptr() != into.data_ptr():
            into.copy_(v)  # magnitude trimming returned a new buffer
        plan.apply_(into, xb, lo, draws)

    _for_blocks(range(0, n, step), x.device, block)
    return out.view(shape)


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
