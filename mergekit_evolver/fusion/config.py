"""The fusion config: a YAML mapping, strict (a misspelt key is an error) and
frozen (its digest names a run).

    target: path/to/target          # an HF causal LM dir: the model trained
    sources:                        # HF causal LMs, any architecture and tokenizer
      - path/to/source_a
      - {model: path/to/source_b, name: b}
    corpus: {path: corpus.jsonl}    # .jsonl ("text" field) or .txt (one per line),
                                    # or {task: NAME, include_path: [DIR], split: test}
    top_k: 10                       # the sources' tokens kept per position
    fusion: min_ce                  # or avg_ce
    lambda: 0.9                     # weight of the causal LM loss
    temperature: 1.0
    steps: 100
    ...

Paths expand ~ and ${VARS} and are made absolute (relative to the working
directory), as the run config does.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mergekit_evolver.config.base import Strict
from mergekit_evolver.config.paths import model_path
from mergekit_evolver.errors import UserError, one_line

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


class CorpusConfig(Strict):
    """Where the training texts come from: a local file, or an lm-eval task's documents."""

    path: Optional[str] = None
    task: Optional[str] = None
    include_path: tuple[str, ...] = ()
    split: Optional[Literal["train", "validation", "test"]] = None
    limit: Optional[int] = Field(None, ge=1)  # the first `limit` texts only

    @field_validator("path")
    @classmethod
    def _file(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        if Path(value).suffix.lower() not in (".jsonl", ".txt"):
            raise ValueError(f"corpus file must be .jsonl or .txt, got {value!r}")
        return model_path(value)

    @field_validator("include_path")
    @classmethod
    def _dirs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(model_path(v) for v in value)

    @model_validator(mode="after")
    def _one_kind(self) -> "CorpusConfig":
        if (self.path is None) == (self.task is None):
            raise ValueError("give the corpus as either path (.jsonl/.txt) or task (an lm-eval task)")
        if self.path is not None and (self.include_path or self.split):
            raise ValueError("include_path and split are for an lm-eval task corpus")
        return self

    def describe(self) -> str:
        if self.path:
            return self.path
        where = f" in {', '.join(self.include_path)}" if self.include_path else ""
        return f"lm-eval task {self.task}{where} ({self.split or 'default split'})"


class SourceConfig(Strict):
    model: str
    name: Optional[str] = None  # how shards and the model card call it; default: the dir name

    @field_validator("model")
    @classmethod
    def _path(cls, value: str) -> str:
        return model_path(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not _NAME.match(value):
            raise ValueError(f"source name {value!r}: letters, digits, '_', '.', '-' only")
        return value


class FusionConfig(Strict):
    target: str
    sources: tuple[SourceConfig, ...]
    corpus: CorpusConfig
    top_k: int = Field(10, ge=1)
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    lambda_: float = Field(0.9, alias="lambda")
    temperature: float = Field(1.0, gt=0)
    steps: int = Field(100, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    seq_len: int = Field(512, ge=2)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # One intra-op thread gives the same bits on any machine (see train.py).
    threads: int = Field(1, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    shard_size: int = Field(256, ge=1)
    trust_remote_code: bool = False

    @field_validator("sources", mode="before")
    @classmethod
    def _plain_paths(cls, value):
        if isinstance(value, (list, tuple)):
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("sources")
    @classmethod
    def _some(cls, value: tuple[SourceConfig, ...]) -> tuple[SourceConfig, ...]:
        if not value:
            raise ValueError("at least one source model is needed")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return model_path(value)

    @field_validator("lambda_")
    @classmethod
    def _unit(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lambda must be in [0, 1], got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @model_validator(mode="after")
    def _names(self) -> "FusionConfig":
        names = self.source_names()
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"sources share a name: {twice}; give each a distinct name")
        return self

    def source_names(self) -> list[str]:
        out = []
        for src in self.sources:
            if src.name:
                out.append(src.name)
            else:
                base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(src.model).name) or "source"
                out.append(base if _NAME.match(base) else f"s_{base}")
        return out

    def dump(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A run's identity: a resume must agree with it."""
        text = yaml.safe_dump(self.dump(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_fusion_config(data: object, where: str = "config") -> FusionConfig:
    if not isinstance(data, dict):
        raise UserError(f"{where}: a fusion config must be a YAML mapping")
    try:
        return FusionConfig.model_validate(data)
    except ValidationError as error:
        raise UserError(f"{where}: {one_line(error)}") from None


def load_fusion_config(path: Union[str, Path]) -> FusionConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config is a directory, not a file: {path}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path}: {one_line(error)}") from None
    return parse_fusion_config(data, str(path))
