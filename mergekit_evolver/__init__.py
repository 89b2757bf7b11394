"""Evolutionary search over mergekit merges.

Importing the package registers its merge methods with mergekit, because
mergekit 0.1.5 has no plugin discovery: a method exists only in a process
that imported and registered it.
"""

from mergekit_evolver.methods.registry import register_methods

__version__ = "0.1.0"

register_methods()

__all__ = ["register_methods", "__version__"]
