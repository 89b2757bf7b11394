"""Synthetic task families: string operations a tiny transformer learns quickly.

Every item is a prompt ``<op>:<input>=`` over an input of distinct letters from
``a``-``j`` (``rev:cagbf=``), answered by a short string: the input reversed
(``fbgac``), shifted one letter on (``shf``), the position of its largest letter
(``amx``, a digit), or how many of its letters come before ``f`` (``cnt``, a
digit). The four in-domain families have different kinds of answers, so their
skills can in principle live side by side in one set of weights.

Items are multiple choice: the answer plus three near misses (other permutations,
other shifts, other positions, other counts), scored by log-likelihood. The two
out-of-domain (OOD) families chain two trained operations under a prompt no
model was trained on (``rev+shf``, ``rev+amx``).

Randomness is always an explicit ``random.Random`` derived from a string key
(seed -> family -> split), never global state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

ALPHABET = "abcdefghij"  # inputs: distinct letters drawn from here


@dataclass(frozen=True)
class Family:
    """One task family: an operation and how its multiple-choice items look."""

    name: str
    op: str  # the operation's name inside the prompt
    answer: Callable[[str], str]
    distractors: tuple[Callable[[str], str], ...]
    ood: bool = False

    def prompt(self, x: str) -> str:
        return f"{self.op}:{x}="

    def choices(self, x: str) -> list[str] | None:
        """The answer first, then the distractors; None if any two coincide."""
        out = [self.answer(x)] + [d(x) for d in self.distractors]
        return out if len(set(out)) == len(out) else None


# ---------------------------------------------------------------- operations


def _rev(x: str) -> str:
    return x[::-1]


def _rotl(x: str) -> str:
    return x[1:] + x[:1]


def _rotr(x: str) -> str:
    return x[-1:] + x[:-1]


def _pairs(x: str) -> str:
    """Swap each adjacent pair: abcde -> badce."""
    return "".join(x[i + 1] + x[i] for i in range(0, len(x) - 1, 2)) + x[len(x) - len(x) % 2 :]


def _then(first: Callable[[str], str], second: Callable[[str], str]) -> Callable[[str], str]:
    return lambda x: second(first(x))


def _shift(x: str, k: int = 1) -> str:
    return "".join(chr(ord(c) + k) for c in x)


def _rank(x: str, i: int) -> str:
    """The i-th largest letter of x (0 = the maximum)."""
    return sorted(x, reverse=True)[i]


def _argrank(x: str, i: int) -> str:
    """The position (a digit) of the i-th largest letter of x."""
    return str(x.index(_rank(x, i)))


def _count_low(x: str, offset: int = 0) -> str:
    """How many letters of x come before 'f', plus `offset`, modulo 6, as a digit."""
    return str((sum(c < "f" for c in x) + offset) % 6)


def _argmax(x: str) -> str:
    return _argrank(x, 0)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("rev", "rev", _rev, (_rotl, _rotr, _pairs)),
        Family(
            "shift",
            "shf",
            _shift,
            (lambda x: _shift(x, 2), lambda x: _shift(x, -1), lambda x: _shift(x[:-1]) + x[-1]),
        ),
        Family("argmax", "amx", _argmax, tuple(lambda x, i=i: _argrank(x, i) for i in (1, 2, 4))),
        Family("count", "cnt", _count_low, tuple(lambda x, k=k: _count_low(x, k) for k in (1, 2, 5))),
        # Out of domain: two trained operations in sequence, under unseen prompts.
        # (rev_argmax keeps only inputs whose four choices differ: about 40% of them.)
        Family(
            "rev_shift",
            "rev+shf",
            _then(_rev, _shift),
            (_rev, _shift, _then(_rotl, _shift)),
            ood=True,
        ),
        Family(
            "rev_argmax",
            "rev+amx",
            _then(_rev, _argmax),
            (_argmax, lambda x: _argrank(_rev(x), 1), lambda x: _argrank(_rev(x), 2)),
            ood=True,
        ),
    )
}
IN_DOMAIN: tuple[str, ...] = tuple(n for n, f in FAMILIES.items() if not f.ood)

# Training-only operations for a broad pretraining mix (the merge_friendly base):
# they teach letters, positions and order without being any evaluated family.
GENERIC: tuple[Family, ...] = (
    Family("copy", "cpy", lambda x: x, ()),
    Family("sort", "srt", lambda x: "".join(sorted(x)), ()),
    Family("rotate", "rtl", _rotl, ()),
    Family("last", "lst", lambda x: x[-1], ()),
)
OUT_OF_DOMAIN: tuple[str, ...] = tuple(n for n, f in FAMILIES.items() if f.ood)


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}") from None


def rng_for(seed: int, *keys: str) -> random.Random:
    """A generator derived from the seed and a path of keys (str seeds hash with sha512)."""
    return random.Random("/".join([str(seed), *keys]))


def random_input(rng: random.Random, length: int) -> str:
    return "".join(rng.sample(ALPHABET, length))


def make_items(
    family: Family, n: int, length: int, rng: random.Random, exclude: Iterable[str] = ()
) -> list[dict]:
    """`n` multiple-choice items with distinct inputs not in `exclude`.

    Each item: ``{"input", "prompt", "choices", "label"}``; the answer's position
    among the choices is shuffled by `rng`.
    """
    seen = set(exclude)
    items: list[dict] = []
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(
                f"family {family.name!r}: could not draw {n} distinct items of length {length}"
            )
        x = random_input(rng, length)
        if x in seen:
            continue
        choices = family.choices(x)
        if choices is None:
            continue
        seen.add(x)
        order = list(range(len(choices)))
        rng.shuffle(order)
        items.append(
            {
                "input": x,
                "prompt": family.prompt(x),
                "choices": [choices[i] for i in order],
                "label": order.index(0),
            }
        )
    return items


def make_splits(
    family: Family, seed: int, length: int, n_dev: int, n_test: int
) -> dict[str, list[dict]]:
    """Disjoint dev and test items for one family (the test split is drawn first)."""
    test = make_items(family, n_test, length, rng_for(seed, family.name, "test"))
    dev = make_items(
        family, n_dev, length, rng_for(seed, family.name, "dev"), exclude=(d["input"] for d in test)
    )
    overlap = {d["input"] for d in dev} & {d["input"] for d in test}
    if overlap:  # make_items excludes them; this guards the invariant itself
        raise AssertionError(f"family {family.name!r}: dev and test share inputs {sorted(overlap)[:5]}")
    return {"dev": dev, "test": test}


def training_texts(
    families: list[Family], seed: int, length: int, key: str, exclude: set[str]
) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, answer) pairs, families drawn uniformly.

    Inputs in `exclude` (every dev/test input of every family) never appear.
    """
    rng = rng_for(seed, "train", key)
    while True:
        fam = families[rng.randrange(len(families))]
        x = random_input(rng, length)
        if x in exclude:
            continue
        yield fam.prompt(x), fam.answer(x)


def mixture_texts(
    families: list[Family],
    weights: tuple[float, ...],
    generic_share: float,
    seed: int,
    length: int,
    key: str,
    exclude: set[str],
) -> Iterator[tuple[str, str]]:
    """Like `training_texts`, for a pretraining mix: a `generic_share` of the
    items come from GENERIC, the rest from `families` in proportion to `weights`
    (uniform when empty)."""
    rng = rng_for(seed, "train", key)
    weights = tuple(weights) or (1.0,) * len(families)
    if len(weights) != len(families):
        raise ValueError(f"{len(weights)} mixture weights for {len(families)} families")
    while True:
        if rng.random() < generic_share:
            fam = GENERIC[rng.randrange(len(GENERIC))]
        else:
            fam = rng.choices(families, weights=weights)[0]
        x = random_input(rng, length)
        if x in exclude:
            continue
        yield fam.prompt(x), fam.answer(x)
