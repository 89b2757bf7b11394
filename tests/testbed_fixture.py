"""One TINY testbed per test session, shared by test_testbed.py and test_fitness.py.

Import the fixture into a test module (``from testbed_fixture import tiny_testbed``);
the build itself is cached here, so importing it into several modules builds once.
"""

from __future__ import annotations

import pytest

from mergekit_evolver.testbed import TINY, Testbed, build_testbed

_BUILT: dict[str, Testbed] = {}


@pytest.fixture(scope="session")
def tiny_testbed(tmp_path_factory) -> Testbed:
    if "tiny" not in _BUILT:
        _BUILT["tiny"] = build_testbed(tmp_path_factory.mktemp("tiny_testbed"), TINY, log=None)
    return _BUILT["tiny"]
