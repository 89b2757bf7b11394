"""Scoring an in-memory causal LM with lm-eval: the project's one scoring path.

`score_model` wraps an already-built `transformers` model (the resident model a
search copies candidate weights into) in lm-eval's `HFLM` and runs lm-eval's own
evaluation on tasks found by name through a `TaskManager`. Nothing is reloaded
per call except what lm-eval itself does (it builds the task objects and reads
their data); task managers are cached per include path.

Every call is quiet (lm-eval's loggers raised to ERROR, progress bars off),
offline (Hugging Face hub and datasets offline flags set for the call, restored
afterwards) and leaves the caller's global random state alone.

It runs lm-eval's `evaluate` after the per-task setup `simple_evaluate` does
(few-shot count and seed), not `simple_evaluate` itself: that one reseeds
Python, numpy and torch globally and collects environment information
(`torch.utils.collect_env`, git) on every call, which costs more than scoring
the testbed's four dev tasks does (scoring them took 0.35-0.55 s per call this
way against 0.67-1.39 s through `simple_evaluate`, two runs on 2 shared CPU cores).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import yaml

from mergekit_evolver.rng import keep_global_rng

__all__ = [
    "score_model",
    "hflm",
    "load_tasks",
    "run_tasks",
    "metric_name",
    "task_manager",
    "resolve_task_manager",
    "forget_task_manager",
    "unreadable_task_files",
]

_CACHE: dict[tuple[tuple[str, ...], bool], object] = {}
_CACHE_LOCK = threading.Lock()
_QUIET_LOGGERS = ("lm_eval", "datasets", "huggingface_hub", "transformers")


IncludePath = str | os.PathLike | Sequence[str | os.PathLike] | None


def _paths(include_path: IncludePath, *, must_exist: bool = True) -> tuple[str, ...]:
    """`include_path` as a tuple of absolute folder names (the cache key)."""
    if include_path is None:
        return ()
    if isinstance(include_path, (str, os.PathLike)):
        include_path = [include_path]
    out = []
    for p in include_path:
        path = Path(p).resolve()
        if must_exist and not path.is_dir():
            raise ValueError(f"include_path {str(p)!r} is not a directory")
        out.append(str(path))
    return tuple(out)


def task_manager(include_path: IncludePath = None, *, include_defaults: bool = False):
    """A cached lm-eval `TaskManager` over `include_path` (plus lm-eval's own tasks
    when `include_defaults`; indexing those takes several seconds, once)."""
    from lm_eval.tasks import TaskManager

    key = (_paths(include_path), include_defaults)
    with _CACHE_LOCK:
        tm = _CACHE.get(key)
        if tm is None:
            tm = TaskManager(include_path=list(key[0]) or None, include_defaults=include_defaults)
            _CACHE[key] = tm
    return tm


def forget_task_manager(include_path: IncludePath = None) -> None:
    """Drop cached task managers that index `include_path` (all of them when None),
    e.g. after the task YAMLs there were rewritten."""
    paths = set(_paths(include_path, must_exist=False)) if include_path is not None else None
    with _CACHE_LOCK:
        for key in list(_CACHE):
            if paths is None or paths & set(key[0]):
                del _CACHE[key]


def resolve_task_manager(
    tasks: Sequence[str], include_path: IncludePath = None, include_defaults: bool | None = None
):
    """The task manager that knows every name in `tasks`, or ValueError naming the unknown ones.

    `include_defaults=None` looks in `include_path` first and adds lm-eval's
    built-in tasks only if some name is not found there.
    """
    if include_defaults is None:
        tm = task_manager(include_path, include_defaults=False)
        if not _missing(tm, tasks):
            return tm
        include_defaults = True
    tm = task_manager(include_path, include_defaults=include_defaults)
    missing = _missing(tm, tasks)
    if missing:
        where = f"include_path {list(_paths(include_path))}" if include_path else "no include_path"
        scope = " and lm-eval's built-in tasks" if include_defaults else ""
        broken = unreadable_task_files(include_path)
        why = ""
        if broken:
            shown = "; ".join(f"{path}: {error}" for path, error in broken[:3])
            more = f" (and {len(broken) - 3} more)" if len(broken) > 3 else ""
            why = f"; lm-eval skipped task file(s) it could not read: {shown}{more}"
        raise ValueError(f"unknown lm-eval task(s) {missing}: not found in {where}{scope}{why}")
    return tm


class _TaskYamlLoader(yaml.SafeLoader):
    """Safe YAML that reads any tag (lm-eval's `!function` and the like) as
    None: only whether a file parses is asked, and nothing is imported or run."""


_TaskYamlLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def unreadable_task_files(include_path: IncludePath) -> list[tuple[str, str]]:
    """(file, one-line reason) for every task YAML under `include_path` that is
    not a YAML mapping. lm-eval's task index skips such a file silently
    (logged at debug level), so the task in it is reported as unknown."""
    from mergekit_evolver.errors import one_line

    broken = []
    for root in _paths(include_path, must_exist=False):
        # lm-eval's own walk: **/*.yaml, sorted, skipping cache dirs.
        files = sorted(
            (p for p in Path(root).glob("**/*.yaml") if not {"__pycache__", ".ipynb_checkpoints"} & set(p.parts)),
            key=lambda p: p.as_posix(),
        )
        for file in files:
            try:
                data = yaml.load(file.read_bytes(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader)
            except (yaml.YAMLError, OSError) as error:
                broken.append((str(file), one_line(error)))
                continue
            if not isinstance(data, dict):
                broken.append((str(file), "not a YAML mapping"))
    return broken


def _missing(tm, tasks: Sequence[str]) -> list[str]:
    known = set(tm.all_tasks)
    return [t for t in tasks if t not in known]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets offline for the duration; environment and flags restored after."""
    keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: os.environ.get(k) for k in keys}
    flags = []
    for mod_name, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        mod = sys.modules.get(mod_name)
        for attr in attrs:
            if mod is not None and hasattr(mod, attr):
                flags.append((mod, attr, getattr(mod, attr)))
    try:
        for k in env:
            os.environ[k] = "1"
        for mod, attr, _ in flags:
            setattr(mod, attr, True)
        yield
    finally:
        for mod, attr, old in flags:
            setattr(mod, attr, old)
        for k, old in env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """lm-eval & co. loggers at ERROR and progress bars off, restored afterwards."""
    if not enabled:
        yield
        return
    import datasets
    import lm_eval.api.task

    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    bars = datasets.is_progress_bar_enabled()
    task_tqdm = lm_eval.api.task.tqdm
    try:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        # Task.build_all_requests draws a progress bar per task with no switch to turn it off.
        lm_eval.api.task.tqdm = _silent_tqdm
        yield
    finally:
        lm_eval.api.task.tqdm = task_tqdm
        if bars:
            datasets.enable_progress_bars()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _silent_tqdm(iterable=None, *args, **kwargs):
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(iterable, *args, **kwargs)


@functools.cache
def _hflm_class(quiet: bool):
    from lm_eval.models.huggingface import HFLM

    class SearchHFLM(HFLM):
        """HFLM for a search, which scores the same requests for every
        candidate with a model config and tokenizer that never change: each
        (context, continuation) pair is tokenized once (re-tokenizing took
        about 45% of the time to score the testbed's dev tasks), and the
        maximum length is resolved once. `quiet` turns the request progress
        bars off."""

        @property
        def max_length(self) -> int:
            # lm-eval resolves it from the model config for every request.
            if "_resolved_max_length" not in self.__dict__:
                self.__dict__["_resolved_max_length"] = HFLM.max_length.fget(self)
            return self.__dict__["_resolved_max_length"]

        def _encode_pair(self, context: str, continuation: str):
            cache = self.__dict__.setdefault("_encoded_pairs", {})
            key = (context, continuation)
            if key not in cache:
                cache[key] = super()._encode_pair(context, continuation)
            context_enc, continuation_enc = cache[key]
            return list(context_enc), list(continuation_enc)  # callers may extend them

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or quiet)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or quiet)

    return SearchHFLM


def _metrics(entry: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}`` -> ``{"acc": 0.5}``.

    Filters other than ``none`` keep their name: ``"exact_match,strict-match"``.
    """
    out: dict[str, float] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr" in key:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = float(value)
    return out


def hflm(model: torch.nn.Module, tokenizer, *, batch_size: int = 64, max_length: int | None = None, quiet: bool = True):
    """lm-eval's HF wrapper around an already-built model (scored as it stands)."""
    with _quiet(quiet):
        return _hflm_class(quiet)(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length
        )


def load_tasks(
    tm,
    tasks: Sequence[str],
    *,
    num_fewshot: int | None = None,
    fewshot_seed: int = 1234,
    shuffle: bool = False,
) -> dict:
    """Load and configure tasks once; the result can be scored many times.
    `shuffle` reorders each task's documents with fewshot_seed (mergekit-evolve
    shuffled unseeded), so a `limit` takes a sample of the split, the same one
    on every call."""
    with offline(), _quiet(True), keep_global_rng():
        loaded = tm.load(list(tasks))
        for task_obj in loaded["tasks"].values():
            # The per-task setup simple_evaluate does, minus its global reseeding.
            if num_fewshot is not None and task_obj.get_config("num_fewshot") != 0:
                task_obj.set_config(key="num_fewshot", value=num_fewshot)
            elif task_obj.get_config("num_fewshot") is None:
                task_obj.set_config(key="num_fewshot", value=0)
            task_obj.set_fewshot_seed(seed=fewshot_seed)
            if shuffle:
                _shuffle_documents(task_obj, fewshot_seed)
            _keep_documents(task_obj)
            _reuse_requests(task_obj)
    return loaded


def _keep_documents(task_obj) -> None:
    """evaluate() walks a task's documents on every call. lm-eval reads them
    from a datasets.Dataset row by row (Arrow decoding, after re-running the
    task's process_docs) each time, and that was the largest part of its own
    time per call on the testbed. A search's documents never change, so they
    are read once into a list that the task's eval_docs then returns."""
    docs = list(task_obj.eval_docs)
    cls = type(task_obj)
    task_obj.__class__ = type(cls.__name__, (cls,), {"eval_docs": property(lambda self: docs)})


def _reuse_requests(task_obj) -> None:
    """lm-eval's evaluate() rebuilds every request of a task (documents,
    prompts, few-shot contexts) on each call; a search scores the same requests
    for thousands of candidates. The task builds them once per set of
    arguments, and later calls get the same Instances with their responses
    cleared, which is all evaluate() writes into them."""
    build = task_obj.build_all_requests
    built: dict[str, list] = {}

    def build_all_requests(**kwargs) -> None:
        key = repr(sorted(kwargs.items()))
        if key not in built:
            build(**kwargs)
            built[key] = task_obj._instances
            return
        for instance in built[key]:
            instance.resps = []
            instance.filtered_resps = {}
        task_obj._instances = built[key]

    task_obj.build_all_requests = build_all_requests


def _shuffle_documents(task_obj, seed: int) -> None:
    dataset = getattr(task_obj, "dataset", None)
    if dataset is None or not hasattr(dataset, "keys"):
        raise ValueError(f"task {task_obj.config.task}: its documents cannot be shuffled")
    for split in list(dataset.keys()):
        dataset[split] = dataset[split].shuffle(seed=seed)


def run_tasks(
    lm,
    loaded: dict,
    *,
    limit: int | float | None = None,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool = True,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Score loaded tasks with lm-eval's own evaluate(); task -> metric -> value."""
    from lm_eval.evaluator import evaluate

    with offline(), _quiet(quiet), keep_global_rng():
        results = evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn,
        )
    return {name: _metrics(entry) for name, entry in results["results"].items()}


def score_documents(
    lm,
    loaded: dict,
    samples: dict[str, list[int]],
    *,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool = True,
    quiet: bool = True,
) -> dict[str, dict[int, dict[str, float]]]:
    """Score the given documents of each task with lm-eval's own evaluate();
    task -> document index -> metric -> that document's value (process_results'),
    keyed like run_tasks' metrics ("acc", or "metric,filter" for other filters)."""
    from lm_eval.evaluator import evaluate

    wanted = {name: loaded["tasks"][name] for name in samples}
    with offline(), _quiet(quiet), keep_global_rng():
        results = evaluate(
            lm=lm,
            task_dict={**loaded, "tasks": wanted},
            samples=samples,
            bootstrap_iters=0,
            log_samples=True,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=fewshot_as_multiturn,
        )
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in samples}
    for name, examples in results["samples"].items():
        for example in examples:
            values = out[name].setdefault(int(example["doc_id"]), {})
            suffix = "" if example["filter"] == "none" else "," + example["filter"]
            for metric in example["metrics"]:
                values[metric + suffix] = float(example[metric])
    return out


def metric_name(metric: str) -> str:
    """The key scores use: 'acc' and 'acc,none' are 'acc'; other filters stay."""
    name, _, filt = metric.partition(",")
    return name if filt in ("", "none") else metric


def score_model(
    model: torch.nn.Module,
    tokenizer,
    tasks: Sequence[str] | str,
    *,
    include_path: IncludePath = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    apply_chat_template: bool | str = False,
    include_defaults: bool | None = None,
    max_length: int | None = None,
    fewshot_seed: int = 1234,
    quiet: bool = True,
) -> dict[str, dict[str, float]]:
    """Score `model` on lm-eval `tasks` once; returns task -> metric -> value.

    model: an already-built HF causal LM (`PreTrainedModel`); it is scored as it
        is, in place, so copying new weights into it and calling again scores the
        new weights. `device`, if given, moves it there first (a no-op when it is
        already there); by default it stays where it is.
    tokenizer: a transformers tokenizer (instance) for the model.
    tasks: lm-eval task, group or tag names (a single string is one task).
    include_path: folder(s) of task YAMLs. With `include_defaults=None` lm-eval's
        built-in tasks are indexed only when a name is not found in `include_path`.
    limit, num_fewshot, apply_chat_template: as in `lm_eval.simple_evaluate`.

    Raises ValueError naming any task that is not known. To score many weight
    sets on the same tasks, load them once (evaluation.Suite does).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    tm = resolve_task_manager(tasks, include_path, include_defaults)
    if device is not None:
        model.to(device)
    was_training = model.training  # HFLM switches the model to eval mode
    try:
        lm = hflm(model, tokenizer, batch_size=batch_size, max_length=max_length, quiet=quiet)
        loaded = load_tasks(tm, tasks, num_fewshot=num_fewshot, fewshot_seed=fewshot_seed)
        return run_tasks(lm, loaded, limit=limit, apply_chat_template=apply_chat_template, quiet=quiet)
    finally:
        model.train(was_training)
