"""Small, deterministic merging problems trained on CPU in minutes.

`build_testbed(out_dir, spec)` trains a tiny Llama base on a mix of synthetic task
families, one specialist per family and a multi-task reference, merges their uniform average with mergekit,
writes lm-eval tasks (dev for fitness, test for reporting, plus out-of-domain
compositions) and prints every model's test scores.
"""

from mergekit_evolver.testbed.build import build_testbed
from mergekit_evolver.testbed.properties import (
    TestbedPropertyError,
    check_properties,
    property_margins,
)
from mergekit_evolver.testbed.families import FAMILIES, IN_DOMAIN, OUT_OF_DOMAIN
from mergekit_evolver.testbed.lmeval_tasks import task_name
from mergekit_evolver.testbed.spec import FULL, MERGE_FRIENDLY, PRESETS, TINY, TestbedSpec
from mergekit_evolver.testbed.store import Testbed, load_testbed
from mergekit_evolver.testbed.tokenizer import build_tokenizer

__all__ = [
    "FAMILIES",
    "FULL",
    "IN_DOMAIN",
    "MERGE_FRIENDLY",
    "PRESETS",
    "OUT_OF_DOMAIN",
    "TINY",
    "Testbed",
    "TestbedPropertyError",
    "TestbedSpec",
    "build_testbed",
    "build_tokenizer",
    "check_properties",
    "load_testbed",
    "property_margins",
    "task_name",
]
