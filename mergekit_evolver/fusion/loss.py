"""The fusion objective (FuseLLM, Wan et al. 2024). Pure tensor math.

Each source's distribution at a target prediction is the softmax of its
(aligned) top-k logits divided by the temperature. Per sequence, the sources
are fused by their cross-entropy on that sequence's text, CE_s:

- min_ce: the distribution of the source with the lowest CE_s (ties: the
  first source);
- avg_ce: the sources weighted by softmax over s of the reward exp(-CE_s)
  (the reference computes the reward as 1 / exp(CE)).

The loss is lambda * CLM + (1 - lambda) * CE(fused, target): CLM the mean
cross-entropy of the target's next tokens, and the second term the mean over
the same positions of -sum_v fused(v) log p_target(v). The fused distribution
is kept sparse (the sources' top-k ids, weighted), which gives the same sum as
a dense one because the cross-entropy is linear in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

METHODS = ("min_ce", "avg_ce")


def rewards(ce: torch.Tensor) -> torch.Tensor:
    return torch.exp(-ce)


def source_weights(ce: torch.Tensor, method: str) -> torch.Tensor:
    """[n, S] weights of the sources per sequence from their CEs [n, S]."""
    if method == "min_ce":
        # argmin returns the first of equal minima: ties go to the first source.
        return F.one_hot(ce.argmin(dim=-1), ce.shape[-1]).to(torch.float32)
    if method == "avg_ce":
        return torch.softmax(rewards(ce.to(torch.float32)), dim=-1)
    raise ValueError(f"unknown fusion method {method!r}; choose one of {', '.join(METHODS)}")


def teacher_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax over the last (top-k) axis; -inf pads get probability 0."""
    return torch.softmax(logits.to(torch.float32) / temperature, dim=-1)


def fused_sparse(ids: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused distribution of rows [P, S, k] with per-row source weights
    [P, S], as (ids [P, S*k], probs [P, S*k]); pads become id 0 with prob 0."""
    probs = teacher_probs(logits, temperature) * weights.unsqueeze(-1)
    pad = ids < 0
    probs = torch.where(pad, torch.zeros_like(probs), probs)
    ids = torch.where(pad, torch.zeros_like(ids), ids)
    return ids.flatten(-2), probs.flatten(-2)


def densify(ids: torch.Tensor, probs: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A sparse distribution [P, M] as a dense one [P, V] (repeated ids add up)."""
    out = torch.zeros(ids.shape[:-1] + (vocab_size,), dtype=probs.dtype)
    return out.scatter_add_(-1, ids, probs)


def soft_cross_entropy(logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """-sum_m probs[m] * log_softmax(logits)[ids[m]] per row."""
    logp = torch.log_softmax(logits.to(torch.float32), dim=-1)
    return -(probs * logp.gather(-1, ids)).sum(-1)


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor
    clm: torch.Tensor
    fusion: torch.Tensor


def fusion_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    ce: torch.Tensor,
    *,
    method: str,
    lam: float,
    temperature: float,
) -> LossParts:
    """The loss of a batch.

    logits [B, L, V] and input_ids [B, L] of the target; rows [B, L-1] marks
    the real predictions (not padding); teacher_ids / teacher_logits
    [B, L-1, S, k] the aligned sources; ce [B, S] their per-sequence CEs."""
    preds = logits[:, :-1].to(torch.float32)
    labels = input_ids[:, 1:]
    mask = rows.to(torch.bool)
    count = mask.sum().clamp_min(1)
    logp = torch.log_softmax(preds, dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    clm = torch.where(mask, nll, torch.zeros_like(nll)).sum() / count
    weights = source_weights(ce, method)[:, None, :].expand(teacher_ids.shape[:3])
    ids, probs = fused_sparse(teacher_ids, teacher_logits, weights, temperature)
    kd = -(probs * logp.gather(-1, ids)).sum(-1)
    fusion = torch.where(mask, kd, torch.zeros_like(kd)).sum() / count
    return LossParts(lam * clm + (1.0 - lam) * fusion, clm, fusion)
