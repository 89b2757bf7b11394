"""Where a candidate is merged: the executor seam of the candidate loop.

`InProcess` merges here, through the one merge path, and takes the merge-ahead
worker's result (merging/ahead.py) only for the exact recipe it would merge
itself. Its calls: `candidate` (a proposal's weights, with the checks every
candidate gets), `merge` (a recipe's weights, unchecked: mergers, baselines,
the report) and `expect` (the recipe likely to come next).

`Ray` (run/ray/) is the remote one: its workers merge *and* score, so the
loop hands it whole candidates (`evaluate`) and gets back an `Evaluated`.
Either way the loop alone tells the strategy and records the result.
"""

from __future__ import annotations


from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_evolver.merging.ahead import MergeAhead, Merged
from mergekit_evolver.merging.fingerprint import first_non_finite
from mergekit_evolver.merging.merge import StateDict, merge_in_memory, merge_tensors
from mergekit.io.tasks import LoaderCache

from mergekit_evolver.population.cache import POPULATION_CACHE
from mergekit_evolver.population.store import STREAM_SHARD_BYTES, FileLoader, read_from_files, write_individual


@dataclass
class Evaluated:
    """A candidate merged and (unless it failed or is non-finite) scored,
    before the strategy hears of it."""

    merge_s: float
    digest: Optional[str] = None  # the candidate's identity (merging/identity.py)
    non_finite: Optional[str] = None  # the first tensor holding NaN or Inf
    error: Optional[str] = None  # it failed (remote executors): why
    scored: Any = None  # run.context.Scored
    # Write the candidate's weights as a member at dest (files like `like`).
    keep: Optional[Callable[[Path, Path], Path]] = None
    # Let go of its weights: it is not kept.
    release: Callable[[], None] = lambda: None


class InProcess:
    remote = False

    def __init__(self, options: MergeOptions, merge_ahead: bool, cache_bytes: int = 0, cache_device: str = "cpu",
                 prefetch: bool = False):
        self.options = options
        self.prefetch = prefetch and cache_bytes > 0
        # Models served from memory (population.store.MemorySlot), never read from files.
        self.in_memory: set = set()
        POPULATION_CACHE.configure(cache_bytes, cache_device)
        # Started first, so that the worker's imports overlap loading tasks and the model.
        self.ahead = MergeAhead(options, enabled=merge_ahead)
        self.ahead.start()

    @property
    def ahead_enabled(self) -> bool:
        """Whether it uses a guess at the next recipe (`expect`)."""
        return self.ahead.enabled or self.prefetch

    def _from_files(self, recipe: MergeConfiguration) -> None:
        """The recipe's on-disk members read through mergekit's loaders (and
        the population cache, where they stay pinned for this merge)."""
        refs = [m for m in recipe.referenced_models() if m not in self.in_memory]
        read_from_files(refs)
        POPULATION_CACHE.pin(str(ref.model.path) for ref in refs)

    def merge(self, recipe: MergeConfiguration) -> StateDict:
        self._from_files(recipe)
        return merge_in_memory(recipe, self.options)

    def candidate(self, recipe: MergeConfiguration, text: str) -> Merged:
        """The worker's result if it made this very recipe, else merged here."""
        merged = self.ahead.take(text)
        if merged is None:
            state = self.merge(recipe)
            merged = Merged(state, first_non_finite(state))
        return merged

    def candidate_into(self, resident, recipe: MergeConfiguration, text: str):
        """A candidate into the resident model (scoring/evaluator.py): the
        worker's result if it made this very recipe (loaded whole: it crossed
        a socket as one state), else merged here, tensor by tensor, straight
        into the resident parameters. Returns (Streamed, the whole state or None)."""
        from mergekit_evolver.scoring.evaluator import Streamed

        merged = self.ahead.take(text)
        if merged is not None:
            if merged.non_finite is None:
                resident.load(merged.state)
            return Streamed(list(merged.state), merged.non_finite, False), merged.state
        return self.merge_into(resident, recipe), None

    def merge_into(self, resident, recipe: MergeConfiguration):
        """A recipe merged here, tensor by tensor, straight into the resident
        parameters (scoring/evaluator.py ResidentModel.stream)."""
        self._from_files(recipe)
        stream = merge_tensors(recipe, self.options)
        try:
            return resident.stream(stream)
        finally:
            stream.close()

    def write(self, recipe: MergeConfiguration, dest: Path, like: Path) -> Path:
        """A recipe merged here and written as a member as its tensors come,
        in shards: a kept candidate whose resident copy is not its exact bits
        (a merge is a function of its recipe), with no whole state held."""
        self._from_files(recipe)
        stream = merge_tensors(recipe, self.options)
        try:
            return write_individual(stream, dest, like=like, shard_bytes=STREAM_SHARD_BYTES)
        finally:
            stream.close()

    def expect(self, recipe: MergeConfiguration, text: str) -> None:
        """The recipe likely to come next: the merge-ahead worker makes it, or
        the population cache reads its members while this candidate is scored."""
        if self.ahead.enabled:
            self.ahead.expect(text)
            return
        if not self.prefetch:
            return
        refs = [m for m in recipe.referenced_models() if m not in self.in_memory]
        read_from_files(refs)
        loaders = LoaderCache().loaders
        POPULATION_CACHE.prefetch(loaders[ref] for ref in refs if isinstance(loaders.get(ref), FileLoader))

    def open(self, run_dir: Path, models: list[str]) -> None:
        """The run dir exists: nothing to check, every merge reads from here."""

    def close(self) -> None:
        self.ahead.close()
        POPULATION_CACHE.configure(0)




def make_executor(config, run_dir: Path, options: MergeOptions, log):
    """The executor a run config's `executor:` names."""
    if config.executor.kind == "ray":
        from mergekit_evolver.run.ray.executor import RayExecutor

        return RayExecutor(config, run_dir, options, log)
    device = options.device or "cpu"
    settings = config.executor
    return InProcess(options, config.merge_ahead, settings.cache_budget(device), settings.cache_device(device),
                     settings.prefetches(device))
