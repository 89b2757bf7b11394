"""Every strategy a run config can name, from one table: a new strategy is one
module in search/ with a `from_config(start)`, plus one line here."""

from __future__ import annotations

from typing import Callable

from mergekit_evolver.search import evolver, kinship_greedy, random_search, recipe_space
from mergekit_evolver.search.protocol import Start, Strategy

STRATEGIES: dict[str, Callable[[Start], Strategy]] = {
    "evolver": evolver.from_config,
    "kinship_greedy": kinship_greedy.from_config,
    "recipe": recipe_space.from_config,
    "random": random_search.from_config,
}
