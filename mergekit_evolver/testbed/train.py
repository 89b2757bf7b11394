"""Deterministic CPU training of the testbed's tiny Llama models.

Sequences are ``<s> prompt answer </s>``; the loss covers only the answer and
``</s>``, and lm-eval's multiple-choice scoring reads the log-likelihood of each
candidate answer after the same ``<s> prompt``. Every random draw comes from a seed passed in (weights through a forked
torch RNG, data through the families' derived generators), so the same spec and
seed give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_evolver.testbed.tokenizer import BOS, EOS, PAD, vocab


def derive_seed(seed: int, *keys: str) -> int:
    """A 63-bit seed for torch, derived from the run seed and a path of keys."""
    digest = hashlib.sha256("/".join([str(seed), *keys]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def cpu_training_env() -> Iterator[None]:
    """One intra-op thread (the same bits whatever the machine's core count, and
    no stalls when the cores are shared: two threads ran up to 30x slower here
    while another process was busy) and denormals flushed (tiny gradients late in
    training otherwise slowed CPU math down 15x). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def model_config(
    *, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, max_len: int = 64
) -> LlamaConfig:
    v = vocab()
    return LlamaConfig(
        vocab_size=len(v),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
        bos_token_id=v[BOS],
        eos_token_id=v[EOS],
        pad_token_id=v[PAD],
        dtype="float32",
    )


def init_model(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the global torch RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def encode_batch(pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels (-100 outside answer + </s>), right-padded."""
    v = vocab()
    rows, labels = [], []
    for prompt, answer in pairs:
        p = [v[BOS]] + [v[c] for c in prompt]
        a = [v[c] for c in answer] + [v[EOS]]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), v[PAD], dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def train(
    model: LlamaForCausalLM,
    stream: Iterator[tuple[str, str]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with linear warmup and cosine decay; returns the per-step losses."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for _ in range(steps):
        ids, lab = encode_batch([next(stream) for _ in range(batch_size)])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
