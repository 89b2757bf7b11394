"""Where a candidate is merged: the executor seam of the candidate loop.

`InProcess` merges here, through the one merge path, and takes the merge-ahead
worker's result (merging/ahead.py) only for the exact recipe it would merge
itself. Ray actors will be one more executor behind the same three calls:
`candidate` (a proposal's weights, with the checks every candidate gets),
`merge` (a recipe's weights, unchecked: mergers, baselines, the report) and
`expect` (the recipe likely to come next).
"""

from __future__ import annotations


from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

from mergekit_evolver.merging.ahead import MergeAhead, Merged
from mergekit_evolver.merging.fingerprint import content_hash, first_non_finite
from mergekit_evolver.merging.merge import StateDict, merge_in_memory
from mergekit_evolver.population.store import read_from_files


class InProcess:
    def __init__(self, options: MergeOptions, merge_ahead: bool):
        self.options = options
        # Models served from memory (population.store.MemorySlot), never read from files.
        self.in_memory: set = set()
        # Started first, so that the worker's imports overlap loading tasks and the model.
        self.ahead = MergeAhead(options, enabled=merge_ahead)
        self.ahead.start()

    @property
    def ahead_enabled(self) -> bool:
        return self.ahead.enabled

    def merge(self, recipe: MergeConfiguration) -> StateDict:
        read_from_files(m for m in recipe.referenced_models() if m not in self.in_memory)
        return merge_in_memory(recipe, self.options)

    def candidate(self, recipe: MergeConfiguration, text: str) -> Merged:
        """The worker's result if it made this very recipe, else merged here."""
        merged = self.ahead.take(text)
        if merged is None:
            state = self.merge(recipe)
            merged = Merged(state, content_hash(state), first_non_finite(state))
        return merged

    def expect(self, text: str) -> None:
        self.ahead.expect(text)

    def close(self) -> None:
        self.ahead.close()


