"""Individuals on disk (HF dirs of safetensors) and in memory, as mergekit models.

Every individual is a mergekit ModelReference. On disk it is an ordinary HF
model dir, read lazily by mergekit's loader. A candidate that is only in memory
(an offspring being scored) is served to mergekit's graph by a MemoryLoader
registered in mergekit's LoaderCache under a reference whose dir holds only
config.json: recipes over it run through the same planner and executor, and
nothing is written to disk to score it.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex, ShardInfo
from mergekit.io.tasks import LoaderCache
from safetensors.torch import save_file

StateDict = Mapping[str, torch.Tensor]

# Files that travel with the weights so an individual is a complete HF model.
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def model_ref(path: str | os.PathLike) -> ModelReference:
    return ModelReference.model_validate(str(path))


def copy_side_files(source: Path, dest: Path) -> None:
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)


def write_individual(state: StateDict, dest: Path, like: Path) -> Path:
    """Write an HF model dir atomically: into a temp dir beside dest, fsync'd,
    then renamed, so a crash never leaves a half-written individual that a
    resume would trust. Config and tokenizer files come from `like`."""
    dest = Path(dest)
    if dest.exists():
        return dest  # written before a crash; same seed, same content
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        copy_side_files(Path(like), tmp)
        for file in tmp.iterdir():
            _fsync(file)
        os.rename(tmp, dest)
        _fsync(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class _OwnLoader(LazyTensorLoader):
    """mergekit's loader interface over our own storage: subclasses say how
    one name is looked up; aliases and errors work as mergekit's do."""

    def _lookup(self, name: str) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: Optional[list[str]] = None,
        raise_on_missing: bool = True,
    ) -> Optional[torch.Tensor]:
        for name in [key, *(aliases or [])]:
            tensor = self._lookup(name)
            if tensor is not None:
                return tensor.to(device)
        if raise_on_missing:
            raise KeyError(key)
        return None

    def flush(self) -> None:
        pass  # nothing held open between tensors


class FileLoader(_OwnLoader):
    """mergekit's loader interface, reading each tensor with pread.

    safetensors' reader maps whole shards, and the pages it touches stay in the
    process's resident set while the map is open: merging N members would hold
    N models. Reading just the bytes of one tensor keeps memory to the tensors
    the graph holds, whatever the population size."""

    def __init__(self, model_dir: Path):
        index = ShardedTensorIndex.from_disk(str(model_dir))
        if not index.is_safetensors:
            raise ValueError(f"{model_dir}: only safetensors weights are read (never pickles)")
        super().__init__(index, lazy_unpickle=False)
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for shard in {index.tensor_paths[k] for k in index.tensor_paths}:
            path = Path(index.base_path) / shard
            header, start = _safetensors_header(path)
            for name, entry in header.items():
                self._entries[name] = (path, start, entry)

    def _lookup(self, name: str) -> Optional[torch.Tensor]:
        return self._read(*self._entries[name]) if name in self._entries else None

    @staticmethod
    def _read(path: Path, start: int, entry: dict) -> torch.Tensor:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(entry["shape"], dtype=dtype)
        buffer = bytearray(end - begin)
        with open(path, "rb", buffering=0) as f:
            f.seek(start + begin)
            view, got = memoryview(buffer), 0
            while got < len(buffer):
                n = f.readinto(view[got:])
                if not n:
                    raise OSError(f"{path}: truncated tensor data")
                got += n
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def read_from_files(refs: Iterable[ModelReference]) -> None:
    """Have mergekit read these on-disk individuals through FileLoader."""
    cache = LoaderCache()
    for ref in refs:
        if not isinstance(cache.loaders.get(ref), (FileLoader, MemoryLoader)):
            cache.loaders[ref] = FileLoader(Path(ref.model.path))


class MemoryLoader(_OwnLoader):
    """mergekit's loader interface over tensors already in memory."""

    def __init__(self, state: StateDict, base_path: str):
        keys = list(state)
        index = ShardedTensorIndex(
            base_path=base_path,
            is_safetensors=True,
            tensor_paths={k: "<memory>" for k in keys},
            shards=[ShardInfo(filename="<memory>", contained_keys=keys)],
        )
        super().__init__(index, lazy_unpickle=False)
        self._state = dict(state)

    def _lookup(self, name: str) -> Optional[torch.Tensor]:
        return self._state.get(name)


class MemorySlot:
    """A reusable mergekit model reference whose weights live in memory.

    Its dir holds config.json (mergekit reads the architecture from it);
    `serve(state)` makes recipes over `self.ref` read `state`."""

    def __init__(self, scratch: Path, like: Path, name: str = "in-memory"):
        self.path = Path(scratch) / name
        self.path.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(like) / "config.json", self.path / "config.json")
        self.ref = model_ref(self.path)

    def serve(self, state: StateDict) -> ModelReference:
        LoaderCache().loaders[self.ref] = MemoryLoader(state, str(self.path))
        return self.ref

    def clear(self) -> None:
        LoaderCache().loaders.pop(self.ref, None)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def safetensors_shapes(files: Iterable[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        header, _ = _safetensors_header(Path(file))
        shapes.update({name: tuple(entry["shape"]) for name, entry in header.items()})
    return shapes


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model dir's tensors, without reading weights."""
    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    return safetensors_shapes(shards)


def architecture(model_dir: Path) -> str:
    config = read_json(Path(model_dir) / "config.json")
    return ",".join(config.get("architectures") or [config.get("model_type", "?")])


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an on-disk individual (safetensors only: never unpickle)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state
