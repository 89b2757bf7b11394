"""lm-eval task files for the testbed: local jsonl data plus one YAML per task.

Each family gets two tasks, found by lm-eval's TaskManager through the folder
returned by `write_tasks` (the `include_path`):

- ``tb_<family>_dev``: the dev split, for fitness during a search;
- ``tb_<family>_test``: the disjoint test split, for reporting.

Both are ``multiple_choice`` (log-likelihood of each candidate answer after the
prompt, metric ``acc``) with an empty target delimiter, matching how the models
were trained (``prompt`` immediately followed by the answer). Data paths in the
YAMLs are absolute, so the tasks load from anywhere and never touch the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TASK_PREFIX = "tb_"
SPLITS = ("dev", "test")


def task_name(family: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return f"{TASK_PREFIX}{family}_{split}"


def _write_jsonl(path: Path, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, sort_keys=True) + "\n")


def task_config(family: str, split: str, data_files: dict[str, str]) -> dict:
    """The YAML body of one task. Few-shot examples, if asked for, come from dev."""
    return {
        "task": task_name(family, split),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": data_files},
        "test_split": split,
        "fewshot_split": "dev",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",
        "fewshot_delimiter": "\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_tasks(
    splits: dict[str, dict[str, list[dict]]], data_dir: Path, task_dir: Path
) -> dict[str, dict[str, str]]:
    """Write every family's dev/test jsonl and task YAMLs; returns family -> split -> task.

    `splits` maps family -> {"dev": items, "test": items}.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    task_dir.mkdir(parents=True, exist_ok=True)
    names: dict[str, dict[str, str]] = {}
    for family, by_split in splits.items():
        files = {}
        for split in SPLITS:
            path = (data_dir / f"{family}_{split}.jsonl").resolve()
            _write_jsonl(path, by_split[split])
            files[split] = str(path)
        names[family] = {}
        for split in SPLITS:
            # A task lists only the files it reads: its own split, and dev for few-shot.
            data_files = {s: files[s] for s in sorted({split, "dev"})}
            cfg = task_config(family, split, data_files)
            with open(task_dir / f"{cfg['task']}.yaml", "w", encoding="utf-8") as fh:
                yaml.safe_dump(cfg, fh, sort_keys=False)
            names[family][split] = cfg["task"]
    return names
