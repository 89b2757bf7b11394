"""A toy world for run tests: tiny Llama models with a real tokenizer, and
multiple-choice lm-eval tasks (dev and test splits) as local files."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_evolver.testbed.tokenizer import build_tokenizer


@dataclass(frozen=True)
class ToyWorld:
    models: list[Path]
    base: Path
    include_path: Path


def save_model(
    path: Path, seed: int, *, hidden: int = 32, layers: int = 2, scale: Optional[dict] = None
) -> Path:
    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if scale:
        with torch.no_grad():
            for name, value in scale.items():
                model.get_parameter(name).fill_(value)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def write_task(folder: Path, name: str, rows: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{q}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


def reverse_items(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a = "".join(rng.sample("abcdefgh", 4))
        rows.append({"q": f"rev:{a}=", "choices": [a[::-1], a, a[1:] + a[0], a[2:] + a[:2]], "label": 0})
    return rows


def make_world(root: Path, n_models: int = 4) -> ToyWorld:
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    write_task(tasks, "toy_dev", reverse_items(1, 30))
    write_task(tasks, "toy_test", reverse_items(2, 30))
    models = [save_model(root / f"m{i}", seed=10 + i) for i in range(n_models)]
    return ToyWorld(models=models, base=save_model(root / "base", seed=99), include_path=tasks)


def run_config(world: ToyWorld, **overrides) -> dict:
    config = {
        "seed": 3,
        "population": {"models": [str(m) for m in world.models], "base_model": str(world.base)},
        "de": {"operator": "de_current_to_rand1", "F": 0.5, "CR": 0.5, "generations": 2},
        "fitness": {"tasks": ["toy_dev"], "include_path": str(world.include_path), "device": "cpu"},
        "report": {"tasks": [{"name": "toy_test", "group": "in_domain"}], "baselines": ["average"]},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            config[section][field] = value
        else:
            config[section] = value
    return config
