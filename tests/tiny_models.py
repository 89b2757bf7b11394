"""Tiny random Llama models saved as HF safetensors dirs, built in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def make_model(path: Path, seed: int, dtype=torch.float32) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config()).to(dtype)
    with torch.no_grad():
        # Norm weights start at exactly 1.0 in every model; perturb them so the
        # DE formulas are exercised on every tensor, not only on the matrices.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
