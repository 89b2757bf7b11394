"""What a search checks on every candidate's weights: their identity (the
fitness cache's key) and whether every value is finite.

Both read every byte of a candidate, so on a real model they cost seconds per
candidate if done naively: BLAKE2b over a 7B model's 14 GB takes about 30 s on
one core, and `isfinite().all()` allocates a mask as large as each tensor.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

CHUNK_BYTES = 32 << 20
# Below this a thread pool costs more than it saves (the testbed's 0.6 MB).
PARALLEL_BYTES = 4 << 20

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1), thread_name_prefix="hash")
        return _POOL


def _chunk_digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def content_hash(
    state: Mapping[str, torch.Tensor], *, chunk_bytes: int = CHUNK_BYTES, parallel_bytes: int = PARALLEL_BYTES
) -> str:
    """Identity of an individual's weights: name, dtype, shape and bytes of
    every tensor, in name order.

    SHA-256 (which CPUs accelerate: about 2.5x BLAKE2b's speed here) over
    fixed-size chunks, so that one large tensor such as an embedding is hashed
    on several cores too (hashlib lets go of the GIL on large buffers). The
    chunk size is part of the digest's definition; the thread count is not.
    """
    names = sorted(state)
    views = [state[n].detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy() for n in names]
    chunks = [v[at : at + chunk_bytes] for v in views for at in range(0, len(v), chunk_bytes)]
    total = sum(len(v) for v in views)
    parts = iter(_pool().map(_chunk_digest, chunks) if total >= parallel_bytes else map(_chunk_digest, chunks))
    digest = hashlib.sha256()
    for name, view in zip(names, views):
        tensor = state[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        for _ in range(0, len(view), chunk_bytes):
            digest.update(next(parts))
    return digest.hexdigest()


def first_non_finite(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The first tensor holding a NaN or an infinity, or None. One min/max
    reduction per tensor: NaN propagates through both, and an infinity is
    the min or the max. That is about ten times faster than isfinite().all(),
    which builds a mask the size of the tensor."""
    for name, tensor in state.items():
        if not tensor_is_finite(tensor):
            return name
    return None


def tensor_is_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) and torch.isfinite(high))
