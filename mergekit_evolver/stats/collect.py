"""Collecting Gram and Fisher statistics: `mergekit-evolver stats MODEL --data SOURCE --out DIR`.

The stats dir format, reading, checks and writing live in stats.py.

Collecting
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
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

from mergekit_evolver.errors import UserError
from mergekit_evolver.population.store import require_safetensors
from mergekit_evolver.stats.store import DTYPES, KINDS, check_out_dir, write_stats


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
    from mergekit_evolver.scoring import lmeval as fitness

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
    require_safetensors(model_dir)  # before from_pretrained, which would unpickle a pytorch_model.bin
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1; got {max_examples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2; got {max_length}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_out_dir(out_dir, kinds)
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).to(_device(device))
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
