"""A candidate's identity without reading its weights.

mergekit's merges are deterministic given the recipe, the options and the
code, so a candidate's identity (the fitness cache's key, the ledger's
content_hash) can be derived from what made it: its recipe, with every
member it is merged from named by that member's own identity rather than by
its dir, the merge options that change bits, and the versions of the code
that does the math. A member's identity is its byte hash
(merging/fingerprint.py), taken once when it enters the run, or, for an
accepted candidate, its derived identity.

Two recipes that happen to give the same bytes get different identities, and
both are scored: the price of not reading every byte of every candidate.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from typing import Any, Mapping

PREFIX = "derived:"


@functools.lru_cache(maxsize=1)
def code_versions() -> dict[str, str]:
    out = {}
    for dist in ("mergekit", "mergekit-evolver", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def derived_identity(recipe: Mapping[str, Any], *, device: str, seed: int) -> str:
    """`recipe`: the proposal's recipe data with each member reference
    already replaced by that member's identity. `device`: where the math
    runs (its kind: cpu, cuda); `seed`: mergekit's random_seed option."""
    blob = json.dumps(
        {"recipe": recipe, "device": device.split(":")[0], "seed": seed, "code": code_versions()},
        sort_keys=True, default=str,
    )
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()
