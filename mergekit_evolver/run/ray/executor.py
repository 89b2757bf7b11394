"""Candidates merged and scored on Ray actors (`executor: {kind: ray}`).

The driver (this process) runs the strategy, tells it every result in the
order it asked, and writes the ledger; the workers (run/ray/worker.py) only
merge and score. Mergers, baselines and the report stay in the driver,
through the in-process executor.

Where a kept candidate is written: by the worker that merged it, on the
driver's word, into the run dir (population.store.write_individual: a temp
dir, fsync'd, renamed). So the weights cross no wire, and the member appears
whole or not at all, as in-process. A worker that died since is covered by
the driver merging the recipe again and checking the content hash it was
scored under before writing it.

What the machine has is checked at the door, before the run dir is made: Ray
installed, the address reachable, the GPUs and CPUs the workers ask for. That
every worker sees the run dir and reads every model is checked once it exists.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from pathlib import Path
from typing import Optional

from mergekit.options import MergeOptions

from mergekit_evolver.errors import UserError, one_line
from mergekit_evolver.run.executor import Evaluated, InProcess
from mergekit_evolver.run.ray import ahead, faults
from mergekit_evolver.run.ray.jobs import FAILED, NON_FINITE, Reply
from mergekit_evolver.run.ray.pool import Pool
from mergekit_evolver.run.ray.worker import CHECK_FILE, Worker

# A worker's first answer waits for it to start: imports, its resident model and
# the tasks. On a loaded machine that alone took over two minutes, so it is not
# held to a short per-candidate timeout_s.
START_TIMEOUT_S = 600.0


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("executor.kind ray needs Ray: pip install 'mergekit-evolver[ray]'") from None
    return ray


def _reachable(address: str) -> None:
    """A cluster address that answers, checked first: Ray itself would retry
    an unreachable one for a long while before it gave up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"executor.address {address}: no Ray cluster answers there ({e.strerror or e})") from None


class RayExecutor:
    remote = True
    ahead_enabled = False

    def __init__(self, config, run_dir: Path, options: MergeOptions, log):
        self.settings = s = config.executor
        self.log = log
        self.run_dir = Path(run_dir)
        self.ray = ray = _import_ray()
        self.local = InProcess(options, merge_ahead=False)
        self.in_memory = self.local.in_memory
        self._owns_ray = False
        self.pool: Optional[Pool] = None
        try:
            self._connect()
            self._check_resources()
            self.pool = Pool(ray, self._start_workers(config, options), timeout_s=s.timeout_s,
                             max_retries=s.max_retries, log=log)
        except BaseException:
            self.close()
            raise
        # Enough predicted jobs that a worker finishing early finds one waiting.
        self.depth = 2 * s.workers
        self._texts: dict[str, str] = {}

    def _connect(self) -> None:
        ray, s = self.ray, self.settings
        named = s.address not in (None, "auto")
        if named:
            _reachable(s.address)
        if ray.is_initialized():
            # The caller's Ray (a script, a test): used as it is, left running.
            current = ray.get_runtime_context().gcs_address
            if named and s.address.removeprefix("ray://") != current:
                raise UserError(f"executor.address {s.address}: this process is already connected to Ray at {current}")
            return
        kwargs = dict(log_to_driver=False, logging_level=logging.ERROR)
        try:
            if s.address is None:
                ray.init(num_cpus=max(1, math.ceil(s.workers * s.cpus_per_worker)), include_dashboard=False, **kwargs)
            else:
                ray.init(address=s.address, **kwargs)
        except Exception as e:
            raise UserError(f"executor.address {s.address}: cannot connect to Ray: {one_line(e)}") from None
        self._owns_ray = True

    def _check_resources(self) -> None:
        s, have = self.settings, self.ray.cluster_resources()
        gpus, cpus = have.get("GPU", 0.0), have.get("CPU", 0.0)
        if s.gpus_per_worker > 0 and gpus == 0:
            raise UserError(
                f"executor.gpus_per_worker is {s.gpus_per_worker:g}, but the Ray cluster has no GPU; "
                "set it to 0 to score on CPUs"
            )
        # Workers Ray cannot place would wait for resources forever.
        for name, each, total in (("gpus", s.gpus_per_worker, gpus), ("cpus", s.cpus_per_worker, cpus)):
            if s.workers * each > total + 1e-9:
                raise UserError(
                    f"executor: {s.workers} workers at {each:g} {name}_per_worker need {s.workers * each:g} "
                    f"{name.upper()[:-1]}s; the Ray cluster has {total:g}"
                )

    def _start_workers(self, config, options: MergeOptions) -> list:
        """The actors, started now so that their models and tasks load while
        the driver sets up its own."""
        s = self.settings
        fitness = config.fitness.model_dump(mode="json")
        # A worker's working dir is not the driver's on a cluster.
        fitness["include_path"] = [os.path.abspath(p) for p in fitness["include_path"]]
        env = {faults.VARIABLE: os.environ[faults.VARIABLE]} if os.environ.get(faults.VARIABLE) else {}
        actor = self.ray.remote(Worker).options(
            num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker,
            # Restarted whenever it dies; a candidate's retries are counted by the pool.
            max_restarts=-1, max_task_retries=0,
            **({"runtime_env": {"env_vars": env}} if env else {}),
        )
        spec = dict(
            run_dir=str(self.run_dir), like=str(Path(config.population.models[0])), fitness=fitness,
            options=options.model_dump_json(), threads=max(1, int(s.cpus_per_worker)),
            nice=os.getpriority(os.PRIO_PROCESS, 0),
        )
        return [actor.remote({**spec, "index": i}) for i in range(s.workers)]

    # -- the run dir exists -------------------------------------------------------
    def open(self, run_dir: Path, models: list[str]) -> None:
        """Every worker must see this run dir and read every model, or the run
        stops here with one line saying which cannot and why."""
        check = Path(run_dir) / CHECK_FILE
        nonce = secrets.token_hex(16)
        check.write_text(nonce)
        try:
            answers = [a.check.remote(nonce, models) for a in self.pool.actors]
            for index, answer in enumerate(answers):
                try:
                    problem = self.ray.get(answer, timeout=max(self.settings.timeout_s, START_TIMEOUT_S))
                except self.ray.exceptions.RayError as e:
                    last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
                    raise UserError(f"executor: Ray worker {index} did not start: {last[0].strip()}") from None
                if problem is not None:
                    raise UserError(
                        f"executor: Ray worker {index} cannot use the run dir or a model ({problem}); "
                        "the run dir and the models must be on storage every worker sees"
                    )
        finally:
            check.unlink(missing_ok=True)

    # -- the seam -------------------------------------------------------------------
    def merge(self, recipe):
        return self.local.merge(recipe)

    def candidate(self, recipe, text: str):
        return self.local.candidate(recipe, text)

    def expect(self, recipe, text: str) -> None:
        pass  # the pool is handed whole predictions in evaluate()

    def evaluate(self, loop, strategy, proposal, text: str) -> Evaluated:
        jobs = ahead.upcoming(loop, strategy, proposal, text, self.depth, self._texts)
        self.pool.plan(jobs)
        reply = self.pool.reply(jobs[0])
        if reply.status == FAILED:
            return Evaluated(reply.merge_s, error=reply.error)
        if reply.status == NON_FINITE:
            return Evaluated(reply.merge_s, digest=reply.content_hash, non_finite=reply.non_finite)
        return Evaluated(
            reply.merge_s, digest=reply.content_hash, scored=self._scored(loop.run, reply),
            keep=lambda dest, like: self._keep(reply, text, Path(dest), Path(like)),
            release=lambda: self.pool.release(reply),
        )

    @staticmethod
    def _scored(run, reply: Reply):
        """The worker's score, through the driver's cache exactly as
        Evaluator.score goes through it in-process: a cached score wins (a
        complete one, even where the worker raced), a new complete one is cached."""
        from mergekit_evolver.run.context import Scored

        key = run.dev.key
        hit = run.ledger.cached_scores(reply.scored_hash, key)
        if hit is not None:
            return Scored(run.dev.fitness(hit), hit, reply.eval_s, reply.scored_hash, True, None)
        if reply.complete:
            run.ledger.cache_scores(reply.scored_hash, key, reply.scores)
        return Scored(
            reply.fitness, reply.scores, reply.eval_s, reply.scored_hash, reply.complete, reply.documents,
            reply.per_document,
        )

    def _keep(self, reply: Reply, text: str, dest: Path, like: Path) -> Path:
        written = self.pool.write(reply, str(dest), str(like))
        if written is not None:
            return Path(written)
        import yaml
        from mergekit.config import MergeConfiguration

        # Its worker is gone: merged again here, which gives the same bits
        # (a merge is a function of its recipe, merging/identity.py).
        return self.local.write(MergeConfiguration.model_validate(yaml.safe_load(text)), dest, like)

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.close()
            if self._owns_ray:
                self.ray.shutdown()
        finally:
            self.local.close()
