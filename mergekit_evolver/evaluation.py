"""The one evaluation path: a resident HF model scored by lm-eval.

One model is loaded once; each candidate's weights are copied into it in place
(no disk write, no re-instantiation). A Suite loads and configures its lm-eval
tasks once and reuses them for every candidate, so per-candidate time is spent
in the model's loglikelihood calls, not in rebuilding datasets and prompts.
Scores are cached by the content hash of the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Optional, Protocol, Sequence

import torch

from mergekit_evolver.config import EvalSettings, TaskSpec
from mergekit_evolver.errors import UserError
from mergekit_evolver.population import content_hash

Scores = dict[str, dict[str, float]]  # task -> metric -> value

_TASK_MANAGERS: dict[tuple[str, ...], object] = {}


@contextmanager
def offline() -> Iterator[None]:
    """Local data only: nothing may reach for a hub while we score."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(include_path: Sequence[str]):
    """lm-eval's TaskManager indexes every task YAML it can find: slow, so one
    per include_path."""
    from lm_eval.tasks import TaskManager

    key = tuple(str(p) for p in include_path)
    if key not in _TASK_MANAGERS:
        for path in key:
            if not Path(path).is_dir():
                raise UserError(f"include_path is not a directory: {path}")
        _TASK_MANAGERS[key] = TaskManager(include_path=list(key) or None)
    return _TASK_MANAGERS[key]


def quiet_lm_eval() -> None:
    import datasets

    for name in ("lm-eval", "lm_eval", "lm_eval.evaluator", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    # lm-eval draws a progress bar per task per call while building requests,
    # with no switch (and tqdm reads TQDM_DISABLE only at import): per
    # candidate that is noise, so that one module's bar is turned off.
    import functools

    import lm_eval.api.task
    from tqdm import tqdm

    lm_eval.api.task.tqdm = functools.partial(tqdm, disable=True)


def metric_key(metric: str) -> str:
    """lm-eval reports 'metric,filter'; a bare name means the 'none' filter."""
    return metric if "," in metric else f"{metric},none"


class Suite:
    """A fixed set of lm-eval tasks, loaded once and scored many times."""

    def __init__(self, specs: Sequence[TaskSpec], settings: EvalSettings):
        quiet_lm_eval()
        self.specs = tuple(specs)
        self.settings = settings
        manager = task_manager(settings.include_path)
        names = [s.name for s in self.specs]
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise UserError(
                f"unknown lm-eval task(s): {', '.join(unknown)} "
                f"(include_path: {', '.join(settings.include_path) or 'none'})"
            )
        with offline():
            self.loaded = manager.load(names)
        self.tasks = self.loaded["tasks"]
        self.higher_is_better: dict[str, bool] = {}
        for spec in self.specs:
            task = self.tasks[spec.name]
            if settings.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=settings.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
            directions = task.higher_is_better()
            metric = spec.metric.split(",")[0]
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
                "dtype": self.settings.dtype,
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self, lm) -> Scores:
        from lm_eval.evaluator import evaluate

        limit = self.settings.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        with offline():
            results = evaluate(
                lm=lm,
                task_dict=self.loaded,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self.settings.apply_chat_template,
                verbosity="ERROR",
            )
        return {
            name: {
                k: float(v)
                for k, v in results["results"][name].items()
                if isinstance(v, (int, float)) and not k.endswith("_stderr,none")
            }
            for name in self.tasks
        }

    def fitness(self, scores: Scores) -> float:
        """Weighted mean of the chosen metrics, each signed so higher is better."""
        total = weight = 0.0
        for spec in self.specs:
            value = scores[spec.name][metric_key(spec.metric)]
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


def _quiet_hflm():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM without its per-call progress bars."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


class ResidentModel:
    """One HF causal LM kept in memory; candidates' weights are copied into it."""

    def __init__(self, like: Path, settings: EvalSettings):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        QuietHFLM = _quiet_hflm()
        quiet_lm_eval()
        self.device = resolve_device(settings.device)
        dtype = getattr(torch, settings.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(
            like, dtype=dtype, trust_remote_code=settings.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(
            like, trust_remote_code=settings.trust_remote_code
        )
        self.lm = QuietHFLM(
            pretrained=self.model,
            tokenizer=self.tokenizer,
            batch_size=settings.batch_size,
            device=self.device,
        )
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

    def score(self, state: Mapping[str, torch.Tensor], suite: Suite) -> Scored:
        import time

        start = time.perf_counter()
        digest = content_hash(state)
        hit = self.cache.cached_scores(digest, suite.key)
        if hit is not None:
            return Scored(hit, digest, True, time.perf_counter() - start)
        self.resident.load(state)
        scores = suite.run(self.resident.lm)
        self.cache.cache_scores(digest, suite.key, scores)
        return Scored(scores, digest, False, time.perf_counter() - start)
