"""A Ray worker: a resident model, the dev tasks built once, and the one merge
path, turning candidate jobs into replies.

It is the in-process candidate's code, moved: the merge is
merging/merge.merge_in_memory, the checks are merging/fingerprint's, the score
is scoring/evaluator's Evaluator on the run's dev Suite. It keeps no score
cache: the driver's ledger is the one cache, so that a worker never returns a
complete score where the driver would have raced the candidate out.

A candidate that may be kept stays in memory until the driver has told the
strategy and says `write` (atomically, into the run dir) or `drop`: only the
driver decides, and only it writes the ledger.
"""

from __future__ import annotations

import gc
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from mergekit_evolver.run.ray import faults
from mergekit_evolver.run.ray.jobs import FAILED, NON_FINITE, OK, Job, Reply

CHECK_FILE = ".executor-check"


class _NoCache:
    def cached_scores(self, content_hash: str, suite: str) -> Optional[dict]:
        return None

    def cache_scores(self, content_hash: str, suite: str, scores: dict) -> None:
        pass


class Worker:
    def __init__(self, spec: dict[str, Any]):
        import torch
        from mergekit.options import MergeOptions

        from mergekit_evolver.config import FitnessConfig
        from mergekit_evolver.scoring.evaluator import Evaluator, Suite, resolve_device

        # One torch pool per worker, sized to the CPUs Ray gave it: workers
        # sharing a node must not each spread over all of its cores.
        torch.set_num_threads(max(1, int(spec["threads"])))
        # Ray starts workers at nice 15, below every ordinary process: on a
        # node shared with other work that starves the scoring. They get the
        # driver's priority back where the OS allows it (root, CAP_SYS_NICE).
        try:
            os.setpriority(os.PRIO_PROCESS, 0, int(spec.get("nice", 0)))
        except OSError:
            pass
        self.index = spec["index"]
        self.run_dir = Path(spec["run_dir"])
        self.like = Path(spec["like"])
        self.settings = FitnessConfig.model_validate(spec["fitness"])
        # The math device is this worker's own (Ray sets CUDA_VISIBLE_DEVICES).
        options = MergeOptions.model_validate_json(spec["options"])
        self.options = options.model_copy(update={"device": resolve_device(self.settings.device)})
        self.suite = Suite(self.settings.tasks, self.settings)
        self.evaluator = Evaluator(self.like, self.settings, _NoCache())
        self.held: dict[str, tuple[tuple, Any]] = {}
        self._slot = None
        self._log_path = self.run_dir / "logs" / "workers" / f"worker-{self.index}.log"
        # The model, tokenizer and tasks live as long as the worker: kept out
        # of the cyclic collector's walks, as the driver's search does
        # (run/__init__.py _long_lived_heap_frozen).
        gc.collect()
        gc.freeze()

    def pid(self) -> int:
        return os.getpid()

    def check(self, nonce: str, models: list[str]) -> Optional[str]:
        """Why this worker cannot take part, or None: it must see the driver's
        run dir (the file the driver just wrote there), write into it, and
        read every model a candidate is merged from."""
        from mergekit_evolver.population.store import require_safetensors

        faults.on_check()
        where = self.run_dir
        try:
            if (where / CHECK_FILE).read_text() != nonce:
                return f"run dir {where} is not the driver's (another copy of it?)"
            # It writes kept members there; the probe leaves nothing behind.
            probe = where / f".probe-worker-{self.index}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            for model in models:
                require_safetensors(model)
                (Path(model) / "config.json").read_bytes()
        except Exception as e:  # the message is what the user sees, on one line
            return f"{type(e).__name__}: {e}"
        return None

    def evaluate(self, job: Job) -> Reply:
        try:
            faults.on_candidate(job.step)
            reply, state = self._evaluate(job)
        except Exception as e:
            self._log(f"{job.step}: failed\n{traceback.format_exc()}")
            return Reply(job.step, job.key, FAILED, self.index, error=" ".join(f"{type(e).__name__}: {e}".split()))
        if job.hold and reply.status == OK:
            self.held[job.step] = (job.key, state)
        self._log(f"{job.step}: {reply.status} fitness {reply.fitness} merge {reply.merge_s:.3f}s eval {reply.eval_s:.3f}s")
        return reply

    def _evaluate(self, job: Job) -> tuple[Reply, Any]:
        import yaml
        from mergekit.config import MergeConfiguration

        from mergekit_evolver.merging.fingerprint import first_non_finite
        from mergekit_evolver.merging.merge import merge_in_memory
        from mergekit_evolver.population.store import read_from_files

        start = time.perf_counter()
        self.suite.race_in(job.order)
        recipe = MergeConfiguration.model_validate(yaml.safe_load(job.text))
        read_from_files(recipe.referenced_models())
        if job.score_in is None and job.scored_identity is not None:
            return self._streamed(job, recipe, start)
        state = merge_in_memory(recipe, self.options)
        digest, bad = job.identity, first_non_finite(state)
        merge_s = time.perf_counter() - start
        if bad is not None:
            return Reply(job.step, job.key, NON_FINITE, self.index, content_hash=digest, non_finite=bad, merge_s=merge_s), None
        scored_state, scored_digest = state, job.scored_identity
        if job.score_in is not None:
            start = time.perf_counter()
            scored_state = self._merged_with(state, job)
            merge_s += time.perf_counter() - start
        scored = self.evaluator.score(scored_state, self.suite, scored_digest, job.bar)
        return self._reply(job, scored, digest, merge_s), state

    def _streamed(self, job: Job, recipe, start: float) -> tuple[Reply, Any]:
        """The candidate merged straight into the resident model and scored
        there, as in-process (run/loop.py): no whole state is held. Kept, it
        is merged again to be written (`write`): the resident copy is the
        next candidate's by then."""
        from mergekit_evolver.merging.merge import merge_tensors

        stream = merge_tensors(recipe, self.options)
        try:
            streamed = self.evaluator.resident.stream(stream)
        finally:
            stream.close()
        merge_s = time.perf_counter() - start
        if streamed.non_finite is not None:
            return Reply(job.step, job.key, NON_FINITE, self.index, content_hash=job.identity,
                         non_finite=streamed.non_finite, merge_s=merge_s), None
        scored = self.evaluator.score(None, self.suite, job.scored_identity, job.bar)
        return self._reply(job, scored, job.identity, merge_s), recipe

    def _reply(self, job: Job, scored, digest: Optional[str], merge_s: float) -> Reply:
        fitness = self.suite.fitness(scored.scores) if scored.complete else scored.best
        return Reply(
            job.step, job.key, OK, self.index, content_hash=digest, scored_hash=scored.content_hash,
            scores=scored.scores, fitness=fitness, complete=scored.complete, documents=scored.documents,
            per_document=scored.per_document,
            merge_s=merge_s, eval_s=scored.seconds,
        )

    def _merged_with(self, state, job: Job):
        """The score_in recipe with the candidate served from memory."""
        from mergekit_evolver.merging.merge import merge_in_memory
        from mergekit_evolver.population.store import MemorySlot, read_from_files
        from mergekit_evolver.recipes.parse import parse_merge_config
        from mergekit_evolver.search.protocol import CANDIDATE

        if self._slot is None:
            self._slot = MemorySlot(self.run_dir / "scratch", self.like, name=f"in-memory-worker-{self.index}")
        data = _replace(json.loads(job.score_in), CANDIDATE, str(self._slot.path))
        ref = self._slot.serve(state)
        try:
            recipe = parse_merge_config(data, where=job.step)
            read_from_files(m for m in recipe.referenced_models() if m != ref)
            return merge_in_memory(recipe, self.options)
        finally:
            self._slot.clear()

    def write(self, step: str, key: tuple, dest: str, like: str) -> Optional[str]:
        """Write a held candidate to dest atomically (population.store); None
        when this worker no longer holds it (it was restarted since)."""
        from mergekit_evolver.population.store import write_individual

        held = self.held.pop(step, None)
        if held is None or held[0] != key:
            return None
        state = held[1]
        if isinstance(state, dict):
            path = write_individual(state, Path(dest), like=Path(like))
        else:  # a streamed candidate's recipe: merged again, written as it streams
            from mergekit_evolver.merging.merge import merge_tensors
            from mergekit_evolver.population.store import STREAM_SHARD_BYTES, read_from_files

            read_from_files(state.referenced_models())
            stream = merge_tensors(state, self.options)
            try:
                path = write_individual(stream, Path(dest), like=Path(like), shard_bytes=STREAM_SHARD_BYTES)
            finally:
                stream.close()
        self._log(f"{step}: wrote {path}")
        return str(path)

    def drop(self, step: str) -> None:
        self.held.pop(step, None)

    def _log(self, line: str) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid {os.getpid()} {line}\n")


def _replace(data: Any, old: str, new: str) -> Any:
    if isinstance(data, dict):
        return {k: _replace(v, old, new) for k, v in data.items()}
    if isinstance(data, list):
        return [_replace(v, old, new) for v in data]
    return new if data == old else data
