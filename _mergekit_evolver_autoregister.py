"""Plain mergekit (mergekit-yaml, mergekit's Python API) sees mergekit-evolver's
merge methods (de_rand1, regmean, fisher, ...).

mergekit 0.1.5 has no plugin discovery: a method exists only in a process
that registered it. mergekit_evolver_autoregister.pth, installed into
site-packages, calls install() at interpreter startup. That only puts a finder
on sys.meta_path; the finder answers nothing but `mergekit.merge_methods`, and
once that module has run, it imports mergekit_evolver, which registers its
methods. A process that never imports mergekit pays one string comparison
per import and imports nothing.

Set MERGEKIT_EVOLVER_NO_AUTOREGISTER=1 (any value but empty or 0) to turn
it off; then not even this module is imported.

This is a top-level module, not part of the mergekit_evolver package, because
importing anything in the package runs its __init__, which imports mergekit
and torch: far too slow for every interpreter start.
"""

import os
import sys

ENV_OFF = "MERGEKIT_EVOLVER_NO_AUTOREGISTER"
_TARGET = "mergekit.merge_methods"


def disabled() -> bool:
    # The .pth line makes the same test before importing this module.
    return os.environ.get(ENV_OFF, "") not in ("", "0")


class _Finder:
    """Finds nothing itself: for mergekit.merge_methods it asks the other
    finders, and makes the module register our methods after it has run."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
            return None
        # One-shot, and out of the way before registering: registering imports
        # mergekit_evolver, which imports mergekit.merge_methods again.
        uninstall()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        run = getattr(spec.loader, "exec_module", None)
        if run is None:
            return spec

        def exec_module(module):
            run(module)
            _register()

        try:
            spec.loader.exec_module = exec_module
        except AttributeError:  # a loader that takes no attributes: leave it alone
            pass
        return spec


def _register() -> None:
    if "mergekit_evolver" in sys.modules:
        return  # the package is being imported: its __init__ registers them
    try:
        import mergekit_evolver  # noqa: F401  (registers its methods on import)
    except Exception as error:  # a broken plugin must not break plain mergekit
        import warnings

        warnings.warn(
            f"mergekit-evolver: its merge methods are not registered ({type(error).__name__}: {error}); "
            f"set {ENV_OFF}=1 to stop trying",
            RuntimeWarning,
            stacklevel=2,
        )


def install() -> None:
    if disabled() or _TARGET in sys.modules or _Finder in sys.meta_path:
        return
    sys.meta_path.insert(0, _Finder)


def uninstall() -> None:
    while _Finder in sys.meta_path:
        sys.meta_path.remove(_Finder)
