"""Idempotent registration of the plugin's methods in mergekit's registry."""

from mergekit import merge_methods
from mergekit.merge_methods import MergeMethod


def plugin_methods() -> tuple[MergeMethod, ...]:
    from mergekit_evolver.methods.de import DE_METHODS
    from mergekit_evolver.methods.regmean import STATS_METHODS

    return DE_METHODS + STATS_METHODS


def register_methods() -> tuple[str, ...]:
    """Register every plugin method once; later calls (and worker processes
    that import the package again) find them present and do nothing."""
    known = {m.spec.name for m in merge_methods.registered_methods()}
    for method in plugin_methods():
        if method.spec.name not in known:
            merge_methods.register(method)
    return tuple(m.spec.name for m in plugin_methods())
