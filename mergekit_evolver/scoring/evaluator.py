"""The one evaluation path of a search: a resident HF model scored by lm-eval.

One model is loaded once; each candidate's weights are copied into it in place
(no disk write, no re-instantiation). A Suite loads and configures its lm-eval
tasks once (through fitness.py, the lm-eval layer) and reuses them for every
candidate, so per-candidate time goes to the model's loglikelihood calls, not to
rebuilding datasets and prompts. Scores are cached by the content hash of the weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Protocol, Sequence

import torch

from mergekit_evolver.scoring import lmeval as fitness
from mergekit_evolver.config import EvalSettings, TaskSpec
from mergekit_evolver.errors import UserError
from mergekit_evolver.merging.fingerprint import content_hash

Scores = dict[str, dict[str, float]]  # task -> metric -> value


class Suite:
    """A fixed set of lm-eval tasks, loaded once and scored many times."""

    def __init__(self, specs: Sequence[TaskSpec], settings: EvalSettings):
        self.specs = tuple(specs)
        self.settings = settings
        names = [s.name for s in self.specs]
        manager = fitness.resolve_task_manager(names, settings.include_path)
        self.loaded = fitness.load_tasks(
            manager, names, num_fewshot=settings.num_fewshot, shuffle=settings.shuffle
        )
        self.tasks = self.loaded["tasks"]
        self.higher_is_better: dict[str, bool] = {}
        for spec in self.specs:
            directions = self.tasks[spec.name].higher_is_better()
            metric = fitness.metric_name(spec.metric).split(",")[0]
            if metric not in directions:
                raise UserError(
                    f"task {spec.name} has no metric {spec.metric!r} "
                    f"(it has: {', '.join(sorted(directions))})"
                )
            self.higher_is_better[spec.name] = (
                directions[metric] if spec.higher_is_better is None else spec.higher_is_better
            )
        self.key = self._key()

    def _key(self) -> str:
        """Identity of what a score means, for the cache: tasks, metrics, limits."""
        blob = json.dumps(
            {
                "tasks": [s.model_dump() for s in self.specs],
                "limit": self.settings.limit,
                "num_fewshot": self.settings.num_fewshot,
                "chat": self.settings.apply_chat_template,
                "multiturn": self.settings.fewshot_as_multiturn,
                "shuffle": self.settings.shuffle,
                "dtype": self.settings.dtype,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self, lm) -> Scores:
        limit = self.settings.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        scores = fitness.run_tasks(
            lm, self.loaded, limit=limit, apply_chat_template=self.settings.apply_chat_template,
            fewshot_as_multiturn=self.settings.fewshot_as_multiturn,
        )
        return {name: scores[name] for name in self.tasks}

    def fitness(self, scores: Scores) -> float:
        """Weighted mean of the chosen metrics, each signed so higher is better."""
        total = weight = 0.0
        for spec in self.specs:
            value = scores[spec.name][fitness.metric_name(spec.metric)]
            total += spec.weight * (value if self.higher_is_better[spec.name] else -value)
            weight += spec.weight
        return total / weight


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for, but torch sees no CUDA device")
    return device


class ScoreCache(Protocol):
    def cached_scores(self, content_hash: str, suite: str) -> Optional[dict]: ...

    def cache_scores(self, content_hash: str, suite: str, scores: dict) -> None: ...


@dataclass
class Scored:
    scores: Scores
    content_hash: str
    cached: bool
    seconds: float


def check_chat_template(like: Path, settings: EvalSettings) -> None:
    """apply_chat_template on a tokenizer without one fails deep inside lm-eval;
    say so at the door (mergekit-evolve configs turn it on by default)."""
    if not settings.apply_chat_template:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(like, trust_remote_code=settings.trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"fitness.apply_chat_template is on, but the tokenizer of {like} has no chat "
            "template; set apply_chat_template: false"
        )


class ResidentModel:
    """One HF causal LM kept in memory; candidates' weights are copied into it."""

    def __init__(self, like: Path, settings: EvalSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(settings.device)
        dtype = getattr(torch, settings.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            like, dtype=dtype, trust_remote_code=settings.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(
            like, trust_remote_code=settings.trust_remote_code
        )
        self.lm = fitness.hflm(self.model, self.tokenizer, batch_size=settings.batch_size)
        # state_dict names include tied aliases (lm_head -> embed_tokens).
        self._params = self.model.state_dict(keep_vars=True)
        self._required = {
            p.data_ptr(): name for name, p in self.model.named_parameters()
        }

    @torch.no_grad()
    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy every tensor into the resident parameters, in place. Every
        parameter must be covered: a stale one would carry the previous
        candidate's weights into this candidate's score."""
        unknown = [n for n in state if n not in self._params]
        if unknown:
            raise ValueError(f"weights not in the resident model: {unknown[:5]}")
        covered = {self._params[n].data_ptr() for n in state}
        stale = [name for ptr, name in self._required.items() if ptr not in covered]
        if stale:
            raise ValueError(f"candidate lacks resident weights: {stale[:5]}")
        for name, tensor in state.items():
            self._params[name].copy_(tensor)


class Evaluator:
    """Scores state dicts on suites through the resident model, with a cache."""

    def __init__(self, like: Path, settings: EvalSettings, cache: ScoreCache):
        self.resident = ResidentModel(like, settings)
        self.cache = cache

    def score(self, state: Mapping[str, torch.Tensor], suite: Suite, digest: Optional[str] = None) -> Scored:
        """`digest`: the state's content_hash when already known (the merge-ahead
        worker computes it while it merges)."""
        import time

        start = time.perf_counter()
        digest = digest or content_hash(state)
        hit = self.cache.cached_scores(digest, suite.key)
        if hit is not None:
            return Scored(hit, digest, True, time.perf_counter() - start)
        self.resident.load(state)
        scores = suite.run(self.resident.lm)
        self.cache.cache_scores(digest, suite.key, scores)
        return Scored(scores, digest, False, time.perf_counter() - start)
