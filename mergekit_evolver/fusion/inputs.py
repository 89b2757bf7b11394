"""The checks at the door: every model and the corpus are looked at before
anything is written, and each problem is one line naming it.

Nothing here writes. Weights are never unpickled (population.store's
safetensors check runs before any loader), remote code runs only when the
config asks for it, and nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mergekit_evolver.errors import UserError, one_line
from mergekit_evolver.fusion.config import CorpusConfig, FusionConfig
from mergekit_evolver.fusion.distributions import max_positions

# Any one of these beside config.json is a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


@dataclass
class ModelInfo:
    role: str  # "target" or "sources[i]", as messages name it
    name: str
    path: Path
    tokenizer: object
    config: object
    vocab_size: int  # the model's output width
    max_len: int  # the longest input it takes

    @property
    def pad_id(self) -> int:
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.tokenizer.unk_token_id):
            if isinstance(tid, int):
                return tid
        return 0

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None) or [type(self.config).__name__]
        return archs[0]


def _causal_lm(config, trust_remote_code: bool) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    auto_map = getattr(config, "auto_map", None) or {}
    return trust_remote_code and "AutoModelForCausalLM" in auto_map


def check_model(path: Path, role: str, name: str, trust_remote_code: bool) -> ModelInfo:
    from transformers import AutoConfig, AutoTokenizer

    from mergekit_evolver.population.store import require_safetensors

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{role}: model not found: {path}")
    if not (path / "config.json").is_file():
        raise UserError(f"{role}: not a HF model dir (no config.json): {path}")
    try:
        require_safetensors(path)
    except UserError as error:
        raise UserError(f"{role}: {error}") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers says unknown model types many ways
        raise UserError(f"{role}: cannot read the model config in {path}: {one_line(error)}") from None
    if not _causal_lm(config, trust_remote_code):
        raise UserError(f"{role}: not a causal LM ({config.model_type}): {path}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{role} has no tokenizer: {path} (no tokenizer.json or tokenizer_config.json); every model needs its own")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as error:  # a broken tokenizer fails in many ways, all bad input
        raise UserError(f"{role}: cannot load the tokenizer in {path}: {one_line(error)}") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text_config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise UserError(f"{role}: the model config gives no vocab_size: {path}")
    limit = max_positions(text_config) or 1 << 20
    return ModelInfo(role, name, path, tokenizer, config, vocab, limit)


@dataclass
class Inputs:
    target: ModelInfo
    sources: list[ModelInfo]


def check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device mps: not available on this machine")


def check_inputs(config: FusionConfig) -> Inputs:
    check_device(config.device)
    target = check_model(Path(config.target), "target", "target", config.trust_remote_code)
    if config.seq_len > target.max_len:
        raise UserError(f"seq_len {config.seq_len} exceeds the target's {target.max_len} positions: {target.path}")
    sources = []
    for i, (src, name) in enumerate(zip(config.sources, config.source_names())):
        info = check_model(Path(src.model), f"sources[{i}]", name, config.trust_remote_code)
        vocab = min(len(info.tokenizer), info.vocab_size)
        if config.top_k > vocab:
            raise UserError(
                f"top_k {config.top_k} is larger than the vocabulary of sources[{i}] ({vocab} tokens): {info.path}"
            )
        sources.append(info)
    return Inputs(target, sources)


# ---------------------------------------------------------------- the corpus


def _jsonl(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UserError(f"corpus {path}:{number}: not a JSON line ({error})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise UserError(f'corpus {path}:{number}: needs a string "text" field')
            if text:
                yield text


def _txt(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.strip():
                yield line


def check_corpus_source(corpus: CorpusConfig) -> None:
    """That the corpus exists (a file, or a task lm-eval finds offline)."""
    if corpus.path is not None:
        if not Path(corpus.path).is_file():
            raise UserError(f"corpus not found: {corpus.path}")
        return
    from mergekit_evolver.scoring import lmeval

    for folder in corpus.include_path:
        if not Path(folder).is_dir():
            raise UserError(f"corpus include_path is not a directory: {folder}")
    paths = list(corpus.include_path)
    manager = lmeval.task_manager(paths or None, include_defaults=not paths)
    if corpus.task not in manager.all_tasks:
        where = ", ".join(paths) or "lm-eval's own tasks"
        raise UserError(f"corpus task {corpus.task!r} not found (looked in {where})")


def corpus_texts(corpus: CorpusConfig) -> Iterator[str]:
    """The corpus texts in order, read lazily (at most `limit`)."""
    if corpus.path is not None:
        path = Path(corpus.path)
        texts = _jsonl(path) if path.suffix.lower() == ".jsonl" else _txt(path)
    else:
        from mergekit_evolver.stats.collect import task_texts

        texts = (t for t in task_texts(corpus.task, corpus.include_path, corpus.split) if t)
    for n, text in enumerate(texts):
        if corpus.limit is not None and n >= corpus.limit:
            return
        yield text


@dataclass(frozen=True)
class CorpusScan:
    count: int
    digest: str


def scan_corpus(corpus: CorpusConfig) -> CorpusScan:
    """Every text read once (memory bounded): how many, and a digest of them
    that a resume compares, so that shards of another corpus are never reused."""
    check_corpus_source(corpus)
    digest = hashlib.sha256()
    count = 0
    for text in corpus_texts(corpus):
        data = text.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big") + data)
        count += 1
    if count == 0:
        raise UserError(f"corpus has no texts: {corpus.describe()}")
    return CorpusScan(count, digest.hexdigest()[:16])


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(info: ModelInfo, dtype: str, trust_remote_code: bool, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        info.path, dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device)


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """transformers' progress bars and warnings off (one bar per model loaded
    or saved); restored afterwards."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
