"""Stage 1's computation: how each model tokenizes a corpus text, and a
source's per-position top-k distribution and per-sequence cross-entropy.

Every model sees the same span of text: the target's tokenization (its own
special tokens, then eos) is cut at `seq_len` tokens, and when it is cut the
sources get the text up to where the target's last kept token ends (and no
eos, since the text goes on). Rows are predictions: row j of a sequence of L
tokens is the model's distribution over token j+1, so a sequence has L-1 rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Span:
    """What of one corpus text every model is given."""

    text: str
    whole: bool  # the target kept all of it, so every side ends with eos
    target_ids: tuple[int, ...]


def _with_eos(ids: list[int], eos: Optional[int]) -> list[int]:
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def plan_span(tokenizer, text: str, seq_len: int) -> Span:
    """The target's tokens for `text`, at most `seq_len`, and the text they cover."""
    eos = tokenizer.eos_token_id
    ids = _with_eos(list(tokenizer(text, add_special_tokens=True)["input_ids"]), eos)
    if len(ids) <= seq_len:
        return Span(text, True, tuple(ids))
    kept = ids[:seq_len]
    try:
        offsets = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        end = max((e for _, e in offsets[:seq_len]), default=0)
    except (NotImplementedError, ValueError, KeyError, TypeError):
        end = len(text)  # a slow tokenizer has no offsets: the sources see all of it
    return Span(text[:end], False, tuple(kept))


def source_ids(tokenizer, span: Span, max_len: int) -> list[int]:
    """A source's tokens for a span: its own special tokens, eos when the span is whole."""
    ids = list(tokenizer(span.text, add_special_tokens=True)["input_ids"])
    if span.whole:
        ids = _with_eos(ids, tokenizer.eos_token_id)
    return ids[:max_len]


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass(frozen=True)
class SourceRows:
    """One sequence's stage-1 record: top-k ids and logits per prediction row,
    and the mean cross-entropy of the sequence's own tokens (inf when it has
    no prediction, so that source gets no weight)."""

    topk_ids: torch.Tensor  # [L-1, k] int64
    topk_logits: torch.Tensor  # [L-1, k] float32
    ce: float


def topk_rows(logits: torch.Tensor, ids: torch.Tensor, k: int) -> SourceRows:
    """From one sequence's logits [L, V] and its token ids [L]."""
    logits = logits.float()
    preds = logits[:-1]
    if preds.shape[0] == 0:
        return SourceRows(torch.zeros((0, k), dtype=torch.long), torch.zeros((0, k)), float("inf"))
    values, indices = torch.topk(preds, k, dim=-1)
    ce = F.cross_entropy(preds, ids[1:], reduction="mean")
    return SourceRows(indices.to(torch.long), values.contiguous(), float(ce))


@torch.no_grad()
def forward_rows(model, rows: Sequence[Sequence[int]], k: int, pad_id: int, device: str = "cpu") -> list[SourceRows]:
    """A source's records for a batch of token sequences (one forward pass)."""
    if not rows:
        return []
    ids, mask = pad_batch(rows, pad_id)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.cpu()
    return [topk_rows(logits[i, : len(r)], ids[i, : len(r)], k) for i, r in enumerate(rows)]


def max_positions(config) -> Optional[int]:
    """The longest input a model config allows, where it says."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
