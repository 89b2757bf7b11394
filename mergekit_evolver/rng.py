"""Global random state that library calls may touch, kept for the caller.

lm-eval draws from `random` while loading tasks, mergekit reseeds everything
(transformers.set_seed) before a merge with a random_seed, and pycma samples
from numpy's global generator: without this, one would steer the others.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def keep_global_rng() -> Iterator[None]:
    """Python, numpy and torch global RNG states restored afterwards."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
