"""Shards on disk: safetensors files of flat tensors, written atomically.

A shard holds the records of `shard_size` consecutive corpus texts. Per
sequence tensors are concatenated: `lengths[i]` tokens of sequence i in
`input_ids`, and its `lengths[i] - 1` prediction rows in the row tensors. A
shard appears under its final name only once it is whole (written to a
temporary file in the same folder, flushed, then renamed), so a shard that
exists is never computed again, and one a kill interrupted leaves only a
temporary file, which the next run removes.

Stage 1 (one folder per source): input_ids, lengths, topk_ids [R, k],
topk_logits [R, k], ce [n].
Stage 2 (aligned/): input_ids and lengths of the target's tokens, ce [n, S],
and per source s: ids.{s} and logits.{s} [R, k] in target ids (-1 / -inf
pads), distilled.{s} [n] (rows carrying that source's distribution).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TMP_PREFIX = ".tmp-"


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.safetensors"


def write_atomic(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a safetensors file that appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_debris(folder: Path) -> list[Path]:
    """Temporary files a killed run left in `folder`."""
    removed = []
    if Path(folder).is_dir():
        for p in sorted(Path(folder).glob(TMP_PREFIX + "*")):
            if p.is_file():
                p.unlink()
                removed.append(p)
    return removed


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def chunks(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    """(shard index, items) for consecutive groups of `size`; memory holds one group."""
    group: list = []
    index = 0
    for item in items:
        group.append(item)
        if len(group) == size:
            yield index, group
            index, group = index + 1, []
    if group:
        yield index, group


def offsets(lengths: Sequence[int]) -> tuple[list[int], list[int]]:
    """Start of each sequence's tokens and of its rows in the flat tensors."""
    tok, row = [], []
    t = r = 0
    for n in lengths:
        tok.append(t)
        row.append(r)
        t += n
        r += max(n - 1, 0)
    return tok, row


def split_rows(flat: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """A row tensor cut back into its sequences' rows."""
    _, starts = offsets(lengths)
    return [flat[s : s + max(n - 1, 0)] for s, n in zip(starts, lengths)]


def split_tokens(flat: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    starts, _ = offsets(lengths)
    return [flat[s : s + n] for s, n in zip(starts, lengths)]


class AlignedReader:
    """Random access to the sequences of the aligned shards without loading
    them: per sequence its shard and offsets (int64 arrays, 40 bytes a
    sequence), and slices read through safetensors' memory-mapped files."""

    def __init__(self, paths: Sequence[Path], sources: Sequence[str]):
        self.paths = [Path(p) for p in paths]
        self.sources = list(sources)
        parts = []
        for shard, path in enumerate(self.paths):
            with safe_open(str(path), framework="pt") as fh:
                lengths = fh.get_tensor("lengths").numpy().astype(np.int64)
            tok = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
            rows = np.maximum(lengths - 1, 0)
            row = np.concatenate([[0], np.cumsum(rows)[:-1]]) if len(lengths) else lengths
            parts.append(np.stack([np.full_like(lengths, shard), np.arange(len(lengths)), tok, lengths, row], axis=1))
        self.index = np.concatenate(parts) if parts else np.zeros((0, 5), dtype=np.int64)
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def _handle(self, shard: int):
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.paths[shard]), framework="pt")
        return self._open[shard]

    def sequence(self, i: int) -> dict[str, torch.Tensor]:
        """input_ids [T], ids/logits [T-1, S, k], ce [S] of sequence i."""
        shard, local, token_start, length, row_start = (int(v) for v in self.index[i])
        fh = self._handle(shard)
        rows = slice(row_start, row_start + max(length - 1, 0))
        return {
            "input_ids": fh.get_slice("input_ids")[token_start : token_start + length],
            "ids": torch.stack([fh.get_slice(f"ids.{s}")[rows] for s in self.sources], dim=1),
            "logits": torch.stack([fh.get_slice(f"logits.{s}")[rows] for s in self.sources], dim=1),
            "ce": fh.get_slice("ce")[local : local + 1][0],
        }
