"""The driver's side of the Ray executor: a pool of worker actors, a queue of
jobs in the order the strategy will ask for them, and the faults.

The candidate loop stays sequential: it asks for one candidate's reply at a
time, in the strategy's order. Before it waits it hands the pool its
prediction of the candidates that come next (run/ray/ahead.py), which the idle
workers start on. A reply is used only for the exact job the loop then asks
for (Job.key), so completion order, worker count and a wrong prediction never
change a result: they change only how long the loop waits.

Faults: a worker that dies is restarted by Ray (max_restarts) and its job is
tried again, at most max_retries times; a job over timeout_s has its worker
killed (and so restarted) and is answered FAILED, as is one whose worker kept
dying. A worker's own exception comes back as a FAILED reply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from mergekit_evolver.run.ray.jobs import FAILED, Job, Reply

# How long the loop waits on ray.wait between looks at the clock (timeouts).
_POLL_S = 0.5


@dataclass
class _Running:
    job: Job
    future: Any
    started: float


class Pool:
    def __init__(self, ray, actors: list, *, timeout_s: float, max_retries: int, log):
        self.ray = ray
        self.actors = actors
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.log = log
        self.running: dict[int, _Running] = {}  # worker index -> its one job
        self.queue: list[Job] = []
        self.done: dict[tuple, Reply] = {}  # replies not yet taken, by job key
        self.deaths: dict[tuple, int] = {}
        self.timed_out: set[tuple] = set()
        # Workers Ray is restarting, each with a call that returns once it is
        # back: a call sent to it before then would fail at once, spending a
        # candidate's retries on a worker that never ran it.
        self.reviving: dict[int, Any] = {}

    # -- what the loop calls ----------------------------------------------------
    def plan(self, jobs: list[Job]) -> None:
        """The jobs the loop expects to ask for, in order: queued unless one
        with the same key is done or running. Queued guesses the loop no longer
        expects are dropped; running ones finish, and their replies are freed
        when a newer plan no longer names them."""
        wanted = {j.key for j in jobs}
        busy = {r.job.key for r in self.running.values()}
        for key in [k for k in self.done if k not in wanted]:
            self._release(self.done.pop(key))
        self.queue = [j for j in jobs if j.key not in busy and j.key not in self.done]
        self._fill()

    def reply(self, job: Job) -> Reply:
        """This job's reply, waiting for it (and running it first if it is
        neither queued nor running)."""
        while job.key not in self.done:
            if job.key not in {r.job.key for r in self.running.values()}:
                self.queue = [job] + [j for j in self.queue if j.key != job.key]
            self._fill()
            self._wait()
        return self.done.pop(job.key)

    def write(self, reply: Reply, dest: str, like: str) -> Optional[str]:
        """Have the worker holding a kept candidate write it; None when it no
        longer holds it (it died since), and the caller writes it instead."""
        try:
            return self.ray.get(self.actors[reply.worker].write.remote(reply.step, reply.key, dest, like))
        except self.ray.exceptions.RayError as e:
            self.log(f"{reply.step}: worker {reply.worker} could not write it ({type(e).__name__}); the driver writes it")
            return None

    def release(self, reply: Reply) -> None:
        self._release(reply)

    # -- scheduling ---------------------------------------------------------------
    def _fill(self) -> None:
        for index, actor in enumerate(self.actors):
            if not self.queue:
                return
            if index in self.running or index in self.reviving:
                continue
            job = self.queue.pop(0)
            self.running[index] = _Running(job, actor.evaluate.remote(job), time.monotonic())

    def _wait(self) -> None:
        futures = {r.future: index for index, r in self.running.items()}
        probes = {future: index for index, future in self.reviving.items()}
        if not futures and not probes:
            return
        ready, _ = self.ray.wait([*futures, *probes], num_returns=1, timeout=_POLL_S)
        for future in ready:
            if future in probes:
                self._revived(probes[future], future)
            else:
                index = futures[future]
                self._finished(index, self.running.pop(index))
        now = time.monotonic()
        for index, running in list(self.running.items()):
            if now - running.started > self.timeout_s and running.job.key not in self.timed_out:
                self.timed_out.add(running.job.key)
                self.log(f"{running.job.step}: over timeout_s ({self.timeout_s:g} s); restarting worker {index}")
                self.ray.kill(self.actors[index], no_restart=False)

    def _revive(self, index: int) -> None:
        self.reviving[index] = self.actors[index].pid.remote()

    def _revived(self, index: int, probe) -> None:
        try:
            self.ray.get(probe)
        except self.ray.exceptions.RayError:
            time.sleep(_POLL_S)  # still restarting: ask again
            self._revive(index)
            return
        del self.reviving[index]

    def _finished(self, index: int, running: _Running) -> None:
        job, ray = running.job, self.ray
        try:
            self.done[job.key] = ray.get(running.future)
            return
        except ray.exceptions.RayTaskError as e:  # raised outside evaluate's own guard
            self.done[job.key] = self._failed(job, index, " ".join(str(e).split())[-300:])
            return
        except (ray.exceptions.RayActorError, ray.exceptions.RayError) as e:
            error = e
        self._revive(index)
        if job.key in self.timed_out:
            self.done[job.key] = self._failed(job, index, f"over timeout_s ({self.timeout_s:g} s)")
            return
        deaths = self.deaths[job.key] = self.deaths.get(job.key, 0) + 1
        kind = "out of memory" if isinstance(error, ray.exceptions.OutOfMemoryError) else "worker died"
        if deaths > self.max_retries:
            self.done[job.key] = self._failed(job, index, f"{kind} {deaths} times (max_retries {self.max_retries})")
        else:
            self.log(f"{job.step}: {kind} ({type(error).__name__}); retry {deaths} of {self.max_retries}")
            self.queue.insert(0, job)

    @staticmethod
    def _failed(job: Job, index: int, error: str) -> Reply:
        return Reply(job.step, job.key, FAILED, index, error=error)

    def _release(self, reply: Reply) -> None:
        if reply.status != FAILED and reply.key[-1]:  # a held candidate
            self.actors[reply.worker].drop.remote(reply.step)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.actors = []
