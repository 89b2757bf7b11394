"""Gram and Fisher statistics for RegMean and Fisher merging: collect, write, read.

Collecting (`mergekit-evolver stats MODEL --data SOURCE --out DIR`)
    One pass over the data, batch by batch (memory bounded by the model and its
    accumulators, never by the data):

    gram    for every nn.Linear (and GPT-2 Conv1D) layer, the Gram matrix of its
            inputs G = XᵀX / n, X the layer's input rows over all NON-padding
            tokens (the attention mask selects them), n their number. Summed in
            float64 from a forward pre-hook. Keyed by the layer's weight name
            ("model.layers.0.self_attn.q_proj.weight" -> its in×in Gram). A layer
            whose weight is tied to an embedding (a tied lm_head) is skipped: its
            tensor is the embedding, which is merged by averaging.
    fisher  the diagonal empirical Fisher of every parameter: the mean over
            examples of the squared gradient of the example's LM loss (the mean
            token negative log-likelihood of the example's own text, as HF
            computes it with labels = input ids). One forward/backward per example
            on its unpadded tokens, so padding never enters; accumulated in
            float32. Keyed by parameter name. Examples of fewer than 2 tokens
            (nothing to predict) are skipped.

    Padded batches carry position ids computed from the attention mask, so a
    left-padded example sees the same positions as an unpadded one.

SOURCE is one of
    *.jsonl   one JSON object per line, its "text" field is one example;
    *.txt     one example per non-empty line;
    NAME      an lm-eval task found by name through a TaskManager: in the
              --include-path folders when given, else among lm-eval's own tasks
              (their data must already be cached). Its docs come from
              --split (train / validation / test; default: the first the
              task has, in that order); one example is
              doc_to_text(doc) + target_delimiter + the target text (for a
              multiple-choice task, the gold choice). Loaded offline: nothing is
              downloaded.

A stats dir holds
    manifest.json        format, version, model, source, dtype, and per kind:
                         file, n_examples, n_tokens, shapes (and for gram the
                         layout of each weight: "linear" = out×in as nn.Linear
                         stores it, "conv1d" = in×out as GPT-2's Conv1D does)
    gram.safetensors     weight name -> Gram (in×in)
    fisher.safetensors   parameter name -> diagonal Fisher (the parameter's shape)
It is written to a temporary sibling and renamed into place; an existing stats
dir at --out is replaced whole (kinds not collected again are not kept).

Reading: `open_stats(dir)` returns a cached, lazily read `StatsDir` (manifest plus
safetensors handles; re-opened when the manifest changes on disk), and
`check_stats_recipe(config)` checks a regmean/fisher recipe's statistics from
manifests and safetensors headers only, before anything is merged.

Where a merge finds a model's statistics (the convention of regmean and fisher):
the per-model string parameter `stats: DIR`; when absent, `<model dir>/stats`.
DIR is used as written (a relative DIR is relative to the working directory, as
model paths are). An offspring of an evolutionary search has no statistics of its
own: point its `stats:` at the original model's dir.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import click
import torch

from mergekit_evolver.errors import UserError, exits_cleanly
from mergekit_evolver.population import safetensors_shapes

FORMAT = "mergekit-evolver-stats"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("gram", "fisher")
FILES = {"gram": "gram.safetensors", "fisher": "fisher.safetensors"}
LAYOUTS = ("linear", "conv1d")
DEFAULT_STATS_SUBDIR = "stats"
# Which statistic each merge method reads.
METHOD_KINDS = {"regmean": "gram", "fisher": "fisher"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class StatsError(UserError):
    """Statistics that are missing, malformed or do not fit the model."""


# ---------------------------------------------------------------- locations


def model_path(model: Any) -> Optional[str]:
    """The path string of a mergekit ModelReference (or a plain path)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "path"):
        return inner.path
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    return None


def stats_dir_for(model: Any, explicit: Optional[str] = None) -> str:
    """`explicit` if given, else `<model dir>/stats` (see the module docstring)."""
    if explicit:
        return os.path.expanduser(explicit)
    path = model_path(model)
    if path is None:
        raise StatsError(f"model {model}: no `stats:` parameter and no model path to default from")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise StatsError(
            f"model {model}: not a local directory, so its statistics have no default "
            f"location; give them with the per-model parameter `stats: DIR`"
        )
    return os.path.join(path, DEFAULT_STATS_SUBDIR)


# ---------------------------------------------------------------- reading


def read_manifest(stats_dir: str | os.PathLike) -> dict:
    path = Path(stats_dir) / MANIFEST
    if not path.is_file():
        raise StatsError(
            f"no statistics at {stats_dir} (no {MANIFEST}; "
            f"collect them with `mergekit-evolver stats MODEL --out {stats_dir}`)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StatsError(f"unreadable {path}: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StatsError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise StatsError(f"{path}: unsupported version {manifest.get('version')!r} (expected {VERSION})")
    return manifest




@dataclass(frozen=True)
class Stat:
    tensor: torch.Tensor
    layout: Optional[str] = None  # gram only: "linear" / "conv1d" / None (unknown)


@dataclass
class StatsDir:
    """One stats dir: its manifest, and tensors read lazily from safetensors."""

    path: str
    manifest: dict
    _handles: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k in self.manifest.get("kinds", {}))

    def require(self, kind: str) -> dict:
        info = self.manifest.get("kinds", {}).get(kind)
        if info is None:
            have = ", ".join(self.kinds) or "none"
            raise StatsError(f"statistics at {self.path} have no {kind} (they have: {have})")
        return info

    def file(self, kind: str) -> Path:
        info = self.require(kind)
        path = Path(self.path) / info.get("file", FILES[kind])
        if not path.is_file():
            raise StatsError(f"statistics at {self.path}: {kind} file {path.name} is missing")
        return path

    def shapes(self, kind: str) -> dict[str, tuple[int, ...]]:
        """From the safetensors header: the authority on what the file holds."""
        key = ("shapes", kind)
        if key not in self._handles:
            self._handles[key] = safetensors_shapes([self.file(kind)])
        return self._handles[key]

    def layout(self, name: str) -> Optional[str]:
        return self.manifest.get("kinds", {}).get("gram", {}).get("layouts", {}).get(name)

    def get(self, kind: str, name: str) -> Optional[Stat]:
        """The statistic of tensor `name`, or None if this dir has none for it."""
        from safetensors import safe_open

        with self._lock:
            opened = self._handles.get(kind)
            if opened is None:
                handle = safe_open(str(self.file(kind)), framework="pt")
                opened = self._handles[kind] = (handle, frozenset(handle.keys()))
            handle, names = opened
            if name not in names:
                return None
            tensor = handle.get_tensor(name)
        return Stat(tensor, self.layout(name) if kind == "gram" else None)


_CACHE: dict[str, tuple[tuple, StatsDir]] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 32


def _signature(stats_dir: str) -> tuple:
    st = os.stat(os.path.join(stats_dir, MANIFEST))
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def open_stats(stats_dir: str | os.PathLike) -> StatsDir:
    """A cached StatsDir; re-read when the dir's manifest changed (a rewrite)."""
    key = os.path.realpath(os.path.expanduser(str(stats_dir)))
    try:
        signature = _signature(key)
    except OSError:
        read_manifest(stats_dir)  # raises the clear message
        raise
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
    opened = StatsDir(str(stats_dir), read_manifest(key))
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (signature, opened)
    return opened


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def load_stat(stats_dir: str | os.PathLike, kind: str, name: str) -> Optional[Stat]:
    """What the merge kernels ask for: one model's statistic of one tensor."""
    return open_stats(stats_dir).get(kind, name)


# ---------------------------------------------------------------- recipe check


def gram_input_axis(weight_shape: Sequence[int], size: int, layout: Optional[str]) -> Optional[int]:
    """The axis of a 2-D weight that a Gram of `size`×`size` multiplies (its input
    axis), or None if it fits neither. nn.Linear stores out×in (axis 1), Conv1D
    in×out (axis 0). The manifest's layout decides; without one, the axis of
    matching size, and for a square weight nn.Linear's axis 1 (a Conv1D Gram
    without a layout would be read transposed: collect with this module, which
    always records the layout)."""
    if len(weight_shape) != 2:
        return None
    if layout == "linear":
        return 1 if weight_shape[1] == size else None
    if layout == "conv1d":
        return 0 if weight_shape[0] == size else None
    if weight_shape[1] == size:
        return 1
    if weight_shape[0] == size:
        return 0
    return None


def check_stat_shape(kind: str, name: str, shape: Sequence[int], weight_shape: Sequence[int], layout: Optional[str]) -> Optional[str]:
    """None if a statistic fits its tensor, else what is wrong."""
    shape, weight_shape = tuple(shape), tuple(weight_shape)
    shown = "×".join(map(str, weight_shape))
    if kind == "fisher":
        if shape != weight_shape:
            return f"fisher for {name} has shape {list(shape)} but the tensor is {shown}"
        return None
    if len(shape) != 2 or shape[0] != shape[1]:
        return f"gram for {name} has shape {list(shape)}, not square"
    if gram_input_axis(weight_shape, shape[0], layout) is None:
        how = f" ({layout} layout)" if layout else ""
        return f"gram for {name} is {shape[0]}×{shape[0]} but the weight is {shown}{how}"
    return None


def checkpoint_shapes(model_dir: str) -> Optional[dict[str, tuple[int, ...]]]:
    """Tensor shapes of a local safetensors checkpoint (headers only), or None."""
    root = Path(os.path.expanduser(model_dir))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({root / f for f in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    return safetensors_shapes(files) if files else None


def _find(name: str, shapes: Mapping[str, Any]) -> Optional[str]:
    """`name`, or a checkpoint alias of it without leading components
    (an old GPT-2 checkpoint stores "h.0..." for "transformer.h.0...")."""
    if name in shapes:
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[i:])
        if candidate in shapes:
            return candidate
    return None


def _explicit_stats(parameters: Optional[Mapping], model: Any, where: str) -> Optional[str]:
    value = (parameters or {}).get("stats")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise StatsError(f"model {model}: `stats` {where} must be a directory path; got {value!r}")
    return value


def _recipe_inputs(config) -> list[tuple[Any, Optional[Mapping]]]:
    if config.models:
        return [(m.model, m.parameters) for m in config.models]
    inputs = []
    for out_slice in config.slices or []:
        inputs.extend((s.model, s.parameters) for s in out_slice.sources)
    return inputs


def check_stats_recipe(config) -> None:
    """Check a regmean / fisher recipe's statistics before mergekit plans it.

    Reads manifests and safetensors headers only. Raises StatsError naming the
    model and the problem: a base_model given; no statistics; no statistics of
    the kind the method needs; statistics naming tensors the model lacks or of
    the wrong shape; or statistics covering different tensors than the other
    models' do. Other methods' recipes pass untouched."""
    method = config.merge_method
    kind = METHOD_KINDS.get(method)
    if kind is None:
        return
    if config.base_model is not None:
        raise StatsError(
            f"{method} takes no base_model (it merges the listed models only); remove "
            f"base_model: {config.base_model}"
        )
    shared = _explicit_stats(config.parameters, "(all)", "in parameters")
    covered: list[tuple[Any, str, set[str]]] = []
    for model, parameters in _recipe_inputs(config):
        explicit = _explicit_stats(parameters, model, "parameter") or shared
        try:
            directory = stats_dir_for(model, explicit)
            stats = open_stats(directory)
            shapes = stats.shapes(kind)
        except StatsError as error:
            raise StatsError(f"{method}: model {model}: {error}") from None
        local = model_path(model)
        weights = checkpoint_shapes(local) if local and os.path.isdir(os.path.expanduser(local)) else None
        if weights is not None:
            unknown = sorted(n for n in shapes if _find(n, weights) is None)
            if unknown:
                raise StatsError(
                    f"{method}: model {model}: its {kind} statistics at {directory} name "
                    f"{len(unknown)} tensor(s) the model does not have (e.g. {unknown[0]}); "
                    f"statistics of another architecture?"
                )
            for name, shape in shapes.items():
                problem = check_stat_shape(kind, name, shape, weights[_find(name, weights)], stats.layout(name))
                if problem:
                    raise StatsError(f"{method}: model {model}: statistics at {directory}: {problem}")
        covered.append((model, directory, set(shapes)))
    union = set().union(*(names for _, _, names in covered)) if covered else set()
    for model, directory, names in covered:
        lacking = sorted(union - names)
        if lacking:
            raise StatsError(
                f"{method}: model {model}: its statistics at {directory} lack {kind} for "
                f"{len(lacking)} tensor(s) that other models' statistics have (e.g. {lacking[0]})"
            )


# ---------------------------------------------------------------- text sources


@dataclass(frozen=True)
class Source:
    """Where the examples come from; `texts()` reads them afresh each call."""

    spec: str
    include_path: tuple[str, ...] = ()
    split: Optional[str] = None

    @property
    def kind(self) -> str:
        suffix = Path(self.spec).suffix.lower()
        return {".jsonl": "jsonl", ".txt": "txt"}.get(suffix, "lm-eval")

    def describe(self) -> dict:
        if self.kind == "lm-eval":
            return {"kind": "lm-eval", "task": self.spec, "split": self.split, "include_path": list(self.include_path)}
        return {"kind": self.kind, "path": os.path.abspath(self.spec)}

    def texts(self) -> Iterator[str]:
        if self.kind == "jsonl":
            return _jsonl_texts(Path(self.spec))
        if self.kind == "txt":
            return _txt_texts(Path(self.spec))
        return task_texts(self.spec, self.include_path, self.split)


def _open_data(path: Path):
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return open(path, encoding="utf-8")


def _jsonl_texts(path: Path) -> Iterator[str]:
    with _open_data(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UserError(f"{path}:{number}: not a JSON line ({error})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{number}: needs a string "text" field')
            yield text


def _txt_texts(path: Path) -> Iterator[str]:
    with _open_data(path) as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.strip():
                yield line


SPLITS = {"train": "training_docs", "validation": "validation_docs", "test": "test_docs"}


def load_task(name: str, include_path: Sequence[str] = ()):
    """An lm-eval task by name, loaded offline: from the --include-path folders
    when given, else from lm-eval's own tasks (whose data must be cached)."""
    from mergekit_evolver import fitness

    for path in include_path:
        if not Path(path).is_dir():
            raise UserError(f"--include-path is not a directory: {path}")
    paths = [str(p) for p in include_path]
    manager = fitness.task_manager(paths or None, include_defaults=not paths)
    if name not in manager.all_tasks:
        where = ", ".join(paths) or "lm-eval's own tasks"
        raise UserError(f"--data {name}: not a .jsonl/.txt file nor an lm-eval task (looked in {where})")
    with fitness.offline():
        loaded = manager.load([name])
    tasks = loaded["tasks"] if isinstance(loaded, dict) and "tasks" in loaded else loaded
    task = tasks.get(name) if isinstance(tasks, dict) else None
    if task is None or not hasattr(task, "doc_to_text"):
        raise UserError(f"--data {name}: an lm-eval group, not a single task")
    return task


def task_docs(task, split: Optional[str]):
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
        docs = getattr(task, SPLITS[split])()
        if docs is None:
            raise UserError(f"task has no {split} split")
        return docs
    for attr in SPLITS.values():
        docs = getattr(task, attr)()
        if docs is not None:
            return docs
    raise UserError("task has no train, validation or test split")


def doc_text(task, doc) -> str:
    """doc_to_text + target_delimiter + target; a choice index becomes its text."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int) and not isinstance(target, bool):
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        if choices:
            target = choices[target]
    delimiter = task.config.target_delimiter or ""
    return f"{text}{delimiter}{target}"


def task_texts(name: str, include_path: Sequence[str] = (), split: Optional[str] = None) -> Iterator[str]:
    task = load_task(name, include_path)
    for doc in task_docs(task, split):
        yield doc_text(task, doc)


# ---------------------------------------------------------------- collection


Batch = dict[str, torch.Tensor]  # input_ids, attention_mask: (B, T)


def token_batches(tokenizer, texts: Iterable[str], *, batch_size: int = 8, max_length: int = 512, limit: Optional[int] = None) -> Iterator[Batch]:
    """Tokenized, padded batches of the texts, read lazily."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    chunk: list[str] = []

    def encode(chunk):
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    for i, text in enumerate(texts):
        if limit is not None and i >= limit:
            break
        chunk.append(text)
        if len(chunk) == batch_size:
            yield encode(chunk)
            chunk = []
    if chunk:
        yield encode(chunk)


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """Weight name -> (layer, layout) for every nn.Linear / Conv1D whose weight is
    its own (not tied to an embedding or to another layer)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()
    canonical = {}
    for name, param in model.named_parameters():
        canonical.setdefault(id(param), name)
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layout = "linear"
        elif Conv1D and isinstance(module, Conv1D):
            layout = "conv1d"
        else:
            continue
        weight_name = f"{name}.weight"
        if id(module.weight) in embedded or canonical.get(id(module.weight)) != weight_name:
            continue
        layers[weight_name] = (module, layout)
    return layers


class GramCollector:
    """Forward pre-hooks summing XᵀX (float64) over the tokens the current mask keeps."""

    def __init__(self, model: torch.nn.Module):
        self.layers = linear_layers(model)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.skipped: set[str] = set()
        self.mask: Optional[torch.Tensor] = None
        self._handles = []

    def __enter__(self) -> "GramCollector":
        for name, (module, _) in self.layers.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str) -> Callable:
        def hook(module, args):
            mask = self.mask
            if mask is None:
                return  # not collecting (e.g. the Fisher pass)
            x = args[0]
            if tuple(x.shape[:-1]) != tuple(mask.shape):
                # e.g. routed MoE experts: rows cannot be matched to tokens
                self.skipped.add(name)
                return
            rows = x[mask.bool()].to(torch.float64)
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(rows.shape[-1], rows.shape[-1], dtype=torch.float64, device=rows.device)
            total.addmm_(rows.T, rows)
            self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

        return hook

    def grams(self) -> dict[str, torch.Tensor]:
        return {
            name: (total / self.counts[name]).cpu()
            for name, total in self.sums.items()
            if name not in self.skipped and self.counts.get(name)
        }


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class Collected:
    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    fisher: dict[str, torch.Tensor] = field(default_factory=dict)
    n_examples: int = 0
    gram_tokens: int = 0
    fisher_examples: int = 0
    fisher_tokens: int = 0
    skipped: list[str] = field(default_factory=list)


def collect_statistics(model: torch.nn.Module, batches: Iterable[Batch], kinds: Sequence[str] = KINDS) -> Collected:
    """Gram and/or diagonal Fisher statistics of `model` over `batches`."""
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise UserError(f"kinds must be among {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}")
    model.eval()
    device = next(model.parameters()).device
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params} if "fisher" in kinds else {}
    out = Collected()
    collector = GramCollector(model) if "gram" in kinds else None
    try:
        if collector is not None:
            collector.__enter__()
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            out.n_examples += ids.shape[0]
            if collector is not None:
                extra = {"position_ids": _position_ids(mask)} if takes_positions else {}
                collector.mask = mask
                try:
                    with torch.no_grad():
                        model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                finally:
                    collector.mask = None  # the Fisher pass below is not counted
                out.gram_tokens += int(mask.sum())
            if fisher:
                for row, row_mask in zip(ids, mask):
                    tokens = row[row_mask.bool()].unsqueeze(0)
                    if tokens.shape[1] < 2:
                        continue
                    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
                    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
                    for (name, _), grad in zip(params, grads):
                        if grad is not None:
                            fisher[name].add_(grad.float().square())
                    out.fisher_examples += 1
                    out.fisher_tokens += tokens.shape[1] - 1
    finally:
        if collector is not None:
            collector.__exit__(None, None, None)
    if collector is not None:
        out.grams = collector.grams()
        out.layouts = {n: collector.layers[n][1] for n in out.grams}
        out.skipped = sorted(collector.skipped)
    if fisher and out.fisher_examples:
        out.fisher = {n: (f / out.fisher_examples).cpu() for n, f in fisher.items()}
    return out


# ---------------------------------------------------------------- writing


def _is_replaceable(out_dir: Path) -> bool:
    if not out_dir.exists():
        return True
    if not out_dir.is_dir():
        return False
    return not any(out_dir.iterdir()) or (out_dir / MANIFEST).is_file()


def write_stats(
    out_dir: str | os.PathLike,
    *,
    model: str,
    source: Optional[dict] = None,
    grams: Optional[Mapping[str, torch.Tensor]] = None,
    layouts: Optional[Mapping[str, str]] = None,
    fisher: Optional[Mapping[str, torch.Tensor]] = None,
    counts: Optional[Mapping[str, Mapping[str, int]]] = None,
    dtype: str = "float32",
    extra: Optional[dict] = None,
) -> Path:
    """Write a stats dir atomically: into a temporary sibling, then renamed into
    place (an existing stats dir there is replaced). `counts[kind]` holds
    n_examples / n_tokens for the manifest."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if not _is_replaceable(out):
        raise UserError(f"--out {out} exists and is not a stats dir; refusing to replace it")
    layouts = dict(layouts or {})
    bad = {v for v in layouts.values() if v not in LAYOUTS}
    if bad:
        raise ValueError(f"layouts must be among {LAYOUTS}; got {sorted(bad)}")
    kinds: dict[str, dict] = {}
    tensors_of = {"gram": grams, "fisher": fisher}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for kind in KINDS:
            tensors = tensors_of[kind]
            if tensors is None:
                continue
            stored = {n: t.detach().to(DTYPES[dtype]).contiguous().cpu() for n, t in tensors.items()}
            save_file(stored, str(tmp / FILES[kind]), metadata={"format": FORMAT, "kind": kind})
            info = {"file": FILES[kind], **dict((counts or {}).get(kind, {}))}
            info["shapes"] = {n: list(t.shape) for n, t in stored.items()}
            if kind == "gram":
                info["layouts"] = {n: layouts[n] for n in stored if n in layouts}
            kinds[kind] = info
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "source": source or {},
            "dtype": dtype,
            "kinds": kinds,
            **(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- CLI


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise UserError(f"--kind must be gram, fisher or gram,fisher; got {text!r}")
    return tuple(k for k in KINDS if k in kinds)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def collect_to_dir(
    model_dir: str,
    source: Source,
    out_dir: str,
    *,
    kinds: Sequence[str] = KINDS,
    max_examples: Optional[int] = None,
    batch_size: int = 8,
    max_length: int = 512,
    dtype: str = "float32",
    device: str = "auto",
) -> tuple[Path, Collected]:
    """Validate cheap things first, then load, collect and write."""
    if not Path(model_dir).is_dir() or not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"MODEL {model_dir} is not a model directory (no config.json)")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1; got {max_examples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2; got {max_length}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if not _is_replaceable(Path(out_dir)):
        raise UserError(f"--out {out_dir} exists and is not a stats dir; refusing to replace it")
    texts = source.texts()
    try:
        first = next(texts)
    except StopIteration:
        raise UserError(f"--data {source.spec}: no examples") from None

    def all_texts():
        yield first
        yield from texts

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"MODEL {model_dir}: no usable tokenizer ({' '.join(str(error).split())[:200]})") from None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(_device(device))
    batches = token_batches(tokenizer, all_texts(), batch_size=batch_size, max_length=max_length, limit=max_examples)
    collected = collect_statistics(model, batches, kinds)
    if "fisher" in kinds and not collected.fisher_examples:
        raise UserError(f"--data {source.spec}: no example has 2 or more tokens; no Fisher to compute")
    if collected.skipped:
        warnings.warn(f"no Gram for {len(collected.skipped)} layer(s) whose inputs are not per token: {collected.skipped[:3]}")
    counts = {
        "gram": {"n_examples": collected.n_examples, "n_tokens": collected.gram_tokens},
        "fisher": {"n_examples": collected.fisher_examples, "n_tokens": collected.fisher_tokens},
    }
    path = write_stats(
        out_dir,
        model=os.path.abspath(model_dir),
        source=source.describe(),
        grams=collected.grams if "gram" in kinds else None,
        layouts=collected.layouts,
        fisher=collected.fisher if "fisher" in kinds else None,
        counts=counts,
        dtype=dtype,
        extra={"max_length": max_length, "max_examples": max_examples, "skipped": collected.skipped},
    )
    return path, collected


@click.command("stats")
@click.argument("model", type=click.Path(file_okay=False))
@click.option("--data", "data", required=True, help="A .jsonl (\"text\" field) or .txt file (one example per line), or an lm-eval task name.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Stats dir to write (default location for merges: MODEL/stats).")
@click.option("--kind", "kind", default="gram,fisher", show_default=True, help="gram (RegMean), fisher (Fisher merging), or both.")
@click.option("--max-examples", type=int, default=None, help="Use at most N examples.")
@click.option("--include-path", multiple=True, help="Folder of lm-eval task YAMLs (repeatable).")
@click.option("--split", default=None, help="lm-eval split: train, validation or test (default: the first the task has).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=512, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--dtype", default="float32", show_default=True, help="Storage dtype: float32 or float64 (accumulation is float64 for Grams).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, ...")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks instead of one-line errors.")
@exits_cleanly(debug=lambda kwargs: kwargs["verbose"])
def stats_command(model, data, out_dir, kind, max_examples, include_path, split, batch_size, max_length, dtype, device, verbose):
    """Collect the Gram (RegMean) and diagonal Fisher statistics of MODEL on --data.

    Padding tokens are excluded. Writes OUT_DIR/manifest.json plus
    gram.safetensors / fisher.safetensors, atomically. Merges with
    `merge_method: regmean` or `fisher` read MODEL/stats unless a model's
    `stats:` parameter names another dir."""
    kinds = parse_kinds(kind)
    source = Source(data, tuple(include_path), split)
    if source.kind == "lm-eval" and split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}; got {split!r}")
    path, collected = collect_to_dir(
        model, source, out_dir, kinds=kinds, max_examples=max_examples,
        batch_size=batch_size, max_length=max_length, dtype=dtype, device=device,
    )
    click.echo(
        f"wrote {', '.join(kinds)} statistics of {model} "
        f"({collected.n_examples} examples, {collected.gram_tokens or collected.fisher_tokens} tokens) to {path}"
    )


# ---------------------------------------------------------------- for the kernels


def group_stats(method: str, kind: str, group, stats: Mapping) -> Optional[list[Stat]]:
    """Each input's statistic of the group's tensor, in input order, for a merge
    kernel (`stats` is its per-input `stats` parameter). None when no input has
    one (the kernel then averages). StatsError naming the model when only some
    inputs have one or one does not fit the tensor: the kernel's last resort,
    as check_stats_recipe catches these before merging."""
    name = group.metadata.name or ""
    found: list[Optional[Stat]] = []
    for entry in group.entries:
        directory = None
        try:
            directory = stats_dir_for(entry.id, stats[entry.id] if stats is not None else None)
            found.append(load_stat(directory, kind, name))
        except StatsError as error:
            raise StatsError(f"{method}: model {entry.id}: {error}") from None
    if all(s is None for s in found):
        return None
    for entry, stat in zip(group.entries, found):
        if stat is None:
            raise StatsError(
                f"{method}: model {entry.id}: its statistics have no {kind} for {name}, "
                f"which other models' statistics have"
            )
        problem = check_stat_shape(kind, name, stat.tensor.shape, entry.tensor.shape, stat.layout)
        if problem:
            raise StatsError(f"{method}: model {entry.id}: {problem}")
    return found  # type: ignore[return-value]
