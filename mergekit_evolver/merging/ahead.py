"""Merging the next candidate in a worker process while this one is scored.

A search alternates merging a candidate and scoring it. On a CPU both are
largely Python (mergekit's planner and executor; lm-eval's batching and
bookkeeping), so a merge on a thread would mostly wait for the GIL. Instead a
worker process runs the one merge path (merge.merge_in_memory) on the recipe
the search expects to need next, with the content hash and the NaN/Inf check,
and sends the tensors back through a socket (not /dev/shm, which containers
keep small, and never through the disk).

A search takes a worker's result only for the exact recipe it would merge
itself: the same recipe YAML (what the ledger records) and the same merge
options. A wrong guess costs worker time, never a different result. Anything
else (no worker yet, a failed merge, a dead worker) falls back to merging
in-process, where errors surface as they always did.

At most one job is outstanding, so the worker holds at most one merged state
beyond the search's own, whatever the population size.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Optional

import torch
from mergekit.options import MergeOptions

from mergekit_evolver.population.store import StateDict

READY = "ready"


@dataclass
class Merged:
    """A merged state with what a search checks on every candidate."""

    state: StateDict
    non_finite: Optional[str]  # the first tensor holding NaN or Inf, if any


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name}")
    return dtype


def serve(conn: Connection) -> None:
    """The worker: merge each recipe it is sent and send back the tensors and
    their checks, until the socket closes (the search ended or died)."""
    import yaml
    from mergekit.config import MergeConfiguration

    from mergekit_evolver.merging.fingerprint import first_non_finite
    from mergekit_evolver.merging.merge import merge_in_memory
    from mergekit_evolver.population.store import read_from_files

    try:
        conn.send(READY)
        while True:
            text, options_json = conn.recv()
            try:
                recipe = MergeConfiguration.model_validate(yaml.safe_load(text))
                read_from_files(recipe.referenced_models())
                state = merge_in_memory(recipe, MergeOptions.model_validate_json(options_json))
                reply = (
                    "ok",
                    [(name, str(t.dtype), tuple(t.shape), t.numel() * t.element_size()) for name, t in state.items()],
                    first_non_finite(state),
                )
            except Exception as e:  # the search merges it itself and meets the error there
                state, reply = {}, ("error", f"{type(e).__name__}: {e}")
            conn.send(reply)
            for tensor in state.values():
                if tensor.numel():
                    conn.send_bytes(_tensor_bytes(tensor))
            del state
    except (EOFError, OSError):
        return


def serve_fd(fd: int) -> None:
    """The worker's entry point: serve on the socket it inherited.

    At the lowest CPU priority: it should use the cycles the search leaves
    idle (between forward passes, or all of them while a GPU scores), not take
    them from the scoring. When the search waits for it, it has the CPU."""
    os.nice(19)
    serve(Connection(fd))


class MergeAhead:
    """A worker process that merges the recipe a search expects to need next.

    `expect(text)` hands the worker a recipe (as recipe_yaml text); `take(text)`
    returns its result, waiting for the worker to finish it, or None when the
    worker is not on that recipe, and the caller merges it itself.
    """

    def __init__(self, options: MergeOptions, enabled: bool = True):
        self.options = options
        self._options_json = options.model_dump_json()
        self.enabled = enabled and os.name == "posix"
        self._conn: Optional[Connection] = None
        self._process: Optional[subprocess.Popen] = None
        self._ready = False
        self._outstanding: Optional[str] = None
        self.taken = 0
        self.missed = 0

    def start(self) -> None:
        """Start the worker now, so that its imports overlap the search's setup.

        It is a fresh interpreter (`python -c`), not a multiprocessing spawn,
        which would re-run the caller's __main__ module in the child: a user's
        unguarded script would start its whole search again there."""
        if not self.enabled or self._process is not None:
            return
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        code = f"from mergekit_evolver.merging.ahead import serve_fd; serve_fd({theirs.fileno()})"
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        except OSError:
            ours.close()
            self.enabled = False
            return
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def _usable(self) -> bool:
        """Started and done with its imports; until then the search merges
        in-process rather than wait for it."""
        if self._conn is None:
            return False
        if not self._ready:
            try:
                if self._conn.poll():
                    self._ready = self._conn.recv() == READY
            except (EOFError, OSError):
                self.close()
        return self._ready

    def wait_ready(self, timeout: float) -> bool:
        """Block until the worker is ready (or `timeout` seconds pass)."""
        if self._conn is not None and not self._ready:
            try:
                self._conn.poll(timeout)
            except (EOFError, OSError):
                self.close()
        return self._usable()

    def expect(self, text: str) -> None:
        """The search will want this recipe next: merge it now. A result still
        outstanding was a wrong guess and is dropped."""
        if not self._usable() or text == self._outstanding:
            return
        if self._outstanding is not None:
            self._finish()
        try:
            self._conn.send((text, self._options_json))
        except (BrokenPipeError, OSError):
            self.close()
            return
        self._outstanding = text

    def take(self, text: str) -> Optional[Merged]:
        """This recipe's merge if the worker has (or is making) it, else None."""
        if self._outstanding != text or self._conn is None:
            self.missed += 1
            return None
        merged = self._finish()
        if merged is None:
            self.missed += 1
        else:
            self.taken += 1
        return merged

    def _finish(self) -> Optional[Merged]:
        """Read the outstanding job's reply (waiting for it); None if it failed."""
        self._outstanding = None
        try:
            reply = self._conn.recv()
            if reply[0] != "ok":
                return None
            _, meta, non_finite = reply
            state: StateDict = {}
            for name, dtype_name, shape, nbytes in meta:
                dtype = _dtype(dtype_name)
                if not nbytes:
                    state[name] = torch.empty(shape, dtype=dtype)
                    continue
                buffer = bytearray(nbytes)
                self._conn.recv_bytes_into(buffer)
                state[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
        except (EOFError, OSError, ValueError):
            self.close()  # from now on every merge is in-process
            return None
        return Merged(state, non_finite)

    def close(self) -> None:
        """Stop the worker. It holds nothing that needs saving (it writes no
        file), so it is killed rather than waited for mid-import or mid-merge."""
        self.enabled = False
        self._outstanding = None
        self._ready = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None
