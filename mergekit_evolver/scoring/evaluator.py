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
from typing import Iterable, Mapping, Optional, Protocol, Sequence

import torch

from mergekit_evolver.scoring import lmeval as fitness
from mergekit_evolver.scoring import racing as racing_math
from mergekit_evolver.scoring.subset import TaskSubset
from mergekit_evolver.config import EvalSettings, TaskSpec
from mergekit_evolver.errors import UserError
from mergekit_evolver.merging.fingerprint import content_hash, tensor_is_finite

Scores = dict[str, dict[str, float]]  # task -> metric -> value
# Racing's chunks are one fixed draw, the same in every run: the order documents
# are scored in changes no complete score, only how soon a loser is stopped.
RACING_SEED = 20241


@dataclass
class Scoring:
    """A suite's scores of one candidate: complete, or raced out with the best
    fitness it could still have reached (an upper bound, below its bar)."""

    scores: Scores
    complete: bool
    best: Optional[float]
    documents: tuple[int, int]  # scored, of
    # A complete run's per-document values of each task's fitness metric, in
    # document order (what subset estimators stratify on).
    per_document: Optional[dict[str, list[float]]] = None
    estimated: bool = False  # scores estimated from a subset (subset.py)


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
        self.order: Optional[racing_math.Order] = None  # None: the seeded order
        self.plan = self._plan()
        self.sizes = {name: sum(len(r.get(name, ())) for r in self.plan) for name in self.tasks}

    def race_in(self, order: Optional[racing_math.Order]) -> None:
        """Score documents in `order` from now on (None: the seeded order).
        Only how soon a loser is stopped changes: a complete score is
        aggregated in index order, whatever order its documents came in."""
        if order != self.order:
            self.order = order
            self.plan = self._plan()

    def hardest_first(self, per_member: Sequence[Mapping[str, Sequence[float]]]) -> racing_math.Order:
        """The racing order from fully scored models' per-document values of each task."""
        return racing_math.Order.hardest_first(
            {name: [row[name] for row in per_member if name in row] for name in self.sizes},
            self.higher_is_better, self.sizes, seed=RACING_SEED,
        )

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

    def _plan(self) -> list[dict[str, list[int]]]:
        """The documents each round scores: every document (after `limit`), in
        seeded chunks; `fitness.racing.rounds` rounds (1 where none is set)."""
        from lm_eval.evaluator_utils import get_sample_size

        sizes = {}
        for name, task_obj in self.tasks.items():
            n = len(task_obj.eval_docs)
            limit = get_sample_size(task_obj, self.settings.limit)
            sizes[name] = n if limit is None else min(n, limit)
        racing = getattr(self.settings, "racing", None)
        return racing_math.rounds_of(sizes, racing.rounds if racing else 1, seed=RACING_SEED, order=self.order)

    @property
    def raceable(self) -> bool:
        """Whether a partly scored candidate's best case is known: each metric
        per-document bounded and mean-aggregated, and no custom fitness function."""
        if getattr(self.settings, "function", None) is not None:
            return False
        for spec in self.specs:
            metric = fitness.metric_name(spec.metric)
            if "," in metric:
                return False
            if not racing_math.can_race(metric, self.tasks[spec.name].aggregation().get(metric)):
                return False
        return True

    def run(self, lm, bar: Optional[racing_math.Bar] = None) -> "Scoring":
        """Score every document round by round, lm-eval scoring each document and
        its own aggregation making each task's score. With a bar, a candidate
        whose best case cannot pass it stops after the round that shows it."""
        per_doc: dict[str, dict[int, dict[str, float]]] = {name: {} for name in self.tasks}
        bar = bar if bar is not None and self.raceable else None
        for k, chunk in enumerate(self.plan):
            got = fitness.score_documents(
                lm, self.loaded, chunk, apply_chat_template=self.settings.apply_chat_template,
                fewshot_as_multiturn=self.settings.fewshot_as_multiturn,
            )
            for name, docs in got.items():
                per_doc[name].update(docs)
            if bar is not None and k + 1 < len(self.plan):
                best = self.best_fitness(per_doc, bar)
                if not racing_math.still_possible(best, bar):
                    return Scoring(self._partial(per_doc), False, best, self._counted(per_doc))
        return Scoring(self._aggregate(per_doc), True, None, self._counted(per_doc), self._values(per_doc))

    def _values(self, per_doc) -> dict[str, list[float]]:
        out = {}
        for spec in self.specs:
            values = self._metric_values(per_doc, spec)
            out[spec.name] = [values[i] for i in sorted(values)]
        return out

    def estimate(
        self, lm, subset: Mapping[str, TaskSubset], reference: Optional[racing_math.Reference] = None
    ) -> Scoring:
        """Each task's score estimated from its subset's documents (subset.py),
        paired with `reference` where there is one, recorded with how many of
        how many documents it used."""
        chunk = {name: list(s.indices) for name, s in subset.items()}
        got = fitness.score_documents(
            lm, self.loaded, chunk, apply_chat_template=self.settings.apply_chat_template,
            fewshot_as_multiturn=self.settings.fewshot_as_multiturn,
        )
        scores: Scores = {}
        for spec in self.specs:
            metric = fitness.metric_name(spec.metric)
            docs = got[spec.name]
            paired = None if reference is None else reference.task(spec.name)
            value = subset[spec.name].estimate({i: d[metric] for i, d in docs.items()}, paired)
            scores[spec.name] = {metric: value, "estimated": 1.0, "documents": float(len(docs)),
                                 "of": float(self.sizes[spec.name])}
        done = sum(len(d) for d in got.values())
        return Scoring(scores, True, None, (done, sum(self.sizes.values())), estimated=True)

    def _aggregate(self, per_doc) -> Scores:
        """Each task's metrics over its documents in index order, by the task's
        own aggregation, exactly as lm-eval's evaluate() makes them."""
        out: Scores = {}
        for name, docs in per_doc.items():
            aggregation = self.tasks[name].aggregation()
            ordered = [docs[i] for i in sorted(docs)]
            out[name] = {
                metric: float(aggregation[metric.split(",")[0]]([d[metric] for d in ordered]))
                for metric in (ordered[0] if ordered else {})
            }
        return out

    def best_fitness(self, per_doc, bar: racing_math.Bar) -> float:
        """The best fitness a partly scored candidate could still reach: for
        certain (exact racing), or at the configured confidence (statistical:
        paired with the bar's reference where it has one, else a bound per task)."""
        exact = self.fitness(self._best_case(per_doc, racing_math.best_case))
        racing = getattr(self.settings, "racing", None)
        if racing is None or racing.mode != "statistical":
            return exact
        if bar.reference is not None:
            paired = racing_math.paired_best(
                {spec.name: self._metric_values(per_doc, spec) for spec in self.specs}, bar.reference,
                self.sizes, self._coefficients(), {spec.name: self._span(spec) for spec in self.specs},
                racing_math.look_z(racing.confidence, len(self.plan)),
            )
            return exact if paired is None else min(exact, paired)
        delta = (1 - racing.confidence) / len(self.specs)
        return self.fitness(self._best_case(per_doc, lambda *args: racing_math.confident_best(*args, delta)))

    def _best_case(self, per_doc, bound) -> Scores:
        """Each task's metric at `bound`(values seen, documents, higher_is_better, metric, aggregation)."""
        out: Scores = {}
        for spec in self.specs:
            metric = fitness.metric_name(spec.metric)
            values = self._metric_values(per_doc, spec)
            args = (
                [values[i] for i in sorted(values)], self.sizes[spec.name],
                self.higher_is_better[spec.name], metric, self.tasks[spec.name].aggregation()[metric],
            )
            out[spec.name] = {metric: bound(*args)}
        return out

    def _metric_values(self, per_doc, spec: TaskSpec) -> dict[int, float]:
        metric = fitness.metric_name(spec.metric)
        return {i: float(d[metric]) for i, d in per_doc[spec.name].items()}

    def _span(self, spec: TaskSpec) -> float:
        low, high = racing_math.BOUNDED[fitness.metric_name(spec.metric)]
        return high - low

    def _coefficients(self) -> dict[str, float]:
        """Each task's factor in the weighted mean fitness (signed: lower is better counts against)."""
        weight = sum(spec.weight for spec in self.specs)
        return {
            spec.name: spec.weight / weight * (1.0 if self.higher_is_better[spec.name] else -1.0)
            for spec in self.specs
        }

    def _partial(self, per_doc) -> Scores:
        """A raced-out candidate's record: each task's metrics over the documents
        it was scored on, and how many of how many those were."""
        partial = self._aggregate(per_doc)
        for name, docs in per_doc.items():
            partial[name] = {**partial[name], "documents": float(len(docs)), "of": float(self.sizes[name])}
        return partial

    def _counted(self, per_doc) -> tuple[int, int]:
        return sum(len(d) for d in per_doc.values()), sum(self.sizes.values())

    def fitness(self, scores: Scores) -> float:
        """Weighted mean of the chosen metrics, each signed so higher is better;
        or fitness.function's value, on the fitness tasks."""
        name = getattr(self.settings, "function", None)
        # The function is written for fitness.tasks; a report suite's fitness
        # (never selected on) keeps the weighted mean rather than handing the
        # function tasks it does not know.
        if name is not None and self.specs == tuple(self.settings.tasks):
            import copy
            import math
            import numbers

            from mergekit_evolver.config.evaluation import fitness_function

            try:
                function = fitness_function(name)
            except ValueError as error:
                raise UserError(f"fitness.function: {error}") from None
            # metric as the scores' key ("acc,none" is "acc"), so scores[t.name][t.metric] holds.
            tasks = [
                spec.model_copy(update={
                    "metric": fitness.metric_name(spec.metric),
                    "higher_is_better": self.higher_is_better[spec.name],
                })
                for spec in self.specs
            ]
            try:
                # A deep copy: what the function does to its arguments never reaches the ledger.
                value = function(copy.deepcopy(scores), tasks)
            except Exception as error:
                raise UserError(f"fitness.function {name} raised {type(error).__name__}: {error}") from error
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
                raise UserError(
                    f"fitness.function {name} returned {value!r} ({type(value).__name__}); "
                    "it must return a float that is not NaN"
                )
            return float(value)
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
    # Raced out: `scores` are partial and `best` bounds the fitness it could
    # have reached (racing.py). A complete score has best None.
    complete: bool = True
    best: Optional[float] = None
    documents: Optional[tuple[int, int]] = None  # scored, of (None: from the cache)
    per_document: Optional[dict[str, list[float]]] = None  # None: from the cache, or not complete
    estimated: bool = False


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
        from transformers.utils import logging as hf_logging

        # transformers draws a "Loading weights" bar on stderr, which would
        # stand beside a run's own lines (and a one-line error).
        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                like, dtype=dtype, trust_remote_code=settings.trust_remote_code
            ).to(self.device)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
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

    @torch.no_grad()
    def stream(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> Streamed:
        """Copy each tensor into the resident parameters as it comes (a merge's
        output, merging/merge.py merge_tensors), checking it is finite on the
        way: no whole candidate is ever held beside the resident model. Stops
        at the first tensor holding NaN or Inf (the candidate is rejected, and
        the next one overwrites every parameter, which `load`'s checks ask of
        it too)."""
        names: list[str] = []
        seen: set[int] = set()
        exact = True
        for name, tensor in tensors:
            param = self._params.get(name)
            if param is None:
                raise ValueError(f"weights not in the resident model: {[name]}")
            if not tensor_is_finite(tensor):
                return Streamed(names, name, False)
            # The resident copy is the candidate's exact bits only at its dtype,
            # and once per storage (tied weights share one parameter).
            exact = exact and tensor.dtype == param.dtype and param.data_ptr() not in seen
            seen.add(param.data_ptr())
            param.copy_(tensor)
            names.append(name)
        stale = [name for ptr, name in self._required.items() if ptr not in seen]
        if stale:
            raise ValueError(f"candidate lacks resident weights: {stale[:5]}")
        return Streamed(names, None, exact)

    def state(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The resident parameters under these names (a streamed candidate)."""
        return {name: self._params[name].detach() for name in names}


@dataclass
class Streamed:
    """A candidate streamed into the resident model: the names it set, the
    first tensor holding NaN or Inf (None: all finite), and whether the
    resident copy holds its exact bits (same dtypes, no tied names)."""

    names: list[str]
    non_finite: Optional[str]
    exact: bool


class Evaluator:
    """Scores state dicts on suites through the resident model, with a cache."""

    def __init__(self, like: Path, settings: EvalSettings, cache: ScoreCache):
        self.resident = ResidentModel(like, settings)
        self.cache = cache

    def score(
        self, state: Optional[Mapping[str, torch.Tensor]], suite: Suite, digest: Optional[str] = None,
        bar: Optional[racing_math.Bar] = None, subset: Optional[Mapping[str, TaskSubset]] = None,
    ) -> Scored:
        """`state` None: the resident model holds the candidate already
        (ResidentModel.stream). `digest`: the candidate's identity, when known
        (merging/identity.py); else the state's content hash. `bar`: what the candidate must pass
        to be kept; it is raced against it (racing.py), and a subset estimate is
        paired with its reference (subset.py). Only complete scores enter the cache."""
        import time

        start = time.perf_counter()
        if state is None and digest is None:
            raise ValueError("a streamed candidate (state None) is scored under its identity")
        digest = digest or content_hash(state)
        # An estimate is cached under its subset's own key (and its reference's):
        # never as a full score.
        paired = bar.reference if bar is not None and subset is not None else None
        key = suite.key if subset is None else f"{suite.key}/subset/{subset_key(subset, paired)}"
        hit = self.cache.cached_scores(digest, key)
        if hit is not None:
            return Scored(hit, digest, True, time.perf_counter() - start, estimated=subset is not None)
        if state is not None:  # None: streamed into the resident model already
            self.resident.load(state)
        if subset is None:
            scoring = suite.run(self.resident.lm, bar)
        else:
            scoring = suite.estimate(self.resident.lm, subset, paired)
        if scoring.complete:
            self.cache.cache_scores(digest, key, scoring.scores)
        return Scored(
            scoring.scores, digest, False, time.perf_counter() - start,
            scoring.complete, scoring.best, scoring.documents, scoring.per_document, scoring.estimated,
        )


def subset_key(subset: Mapping[str, TaskSubset], reference: Optional[racing_math.Reference] = None) -> str:
    blob = json.dumps({
        "subset": {t: [s.indices, s.weights] for t, s in sorted(subset.items())},
        "reference": None if reference is None else reference.values,
    })
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
