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
from mergekit.io.tensor_writer import TensorWriter

from mergekit_evolver.errors import UserError
from mergekit_evolver.population.cache import POPULATION_CACHE

# A model's weights by tensor name: the one spelling, used across the package.
StateDict = dict[str, torch.Tensor]

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


# A kept offspring written as its merge streams (run/executor.py write) goes
# into shards of at most this size: the write holds one shard, never the model.
STREAM_SHARD_BYTES = 1 << 30


def write_individual(
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], dest: Path, like: Path,
    shard_bytes: int = 0,
) -> Path:
    """Write an HF model dir atomically: into a temp dir beside dest, fsync'd,
    then renamed, so a crash never leaves a half-written individual that a
    resume would trust. Config and tokenizer files come from `like`.

    `tensors`: a state dict, or (name, tensor) pairs as a merge streams them;
    written by mergekit's TensorWriter in shards of `shard_bytes` (0: one
    file). One shard's file is the same bytes whatever order the tensors came in."""
    dest = Path(dest)
    if dest.exists():
        return dest  # written before a crash; same seed, same content
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        writer = TensorWriter(str(tmp), max_shard_size=shard_bytes)
        for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
            writer.save_tensor(name, tensor.detach().cpu())
        writer.finalize()
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
    """A safetensors file's tensor entries and where its data starts; a file
    that cannot be a whole safetensors file (cut short, or not one at all) is
    a UserError naming it, before any reader maps it."""
    path = Path(path)
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        try:
            (size,) = struct.unpack("<Q", prefix)
            if size > total - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            header.pop("__metadata__", None)
            end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
        except (struct.error, ValueError, KeyError, TypeError, IndexError):
            raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt)") from None
    # The format has no slack: the data ends where the file does.
    if 8 + size + end != total:
        raise UserError(f"{path}: not a valid safetensors file (truncated or corrupt)")
    return header, 8 + size


_NEVER_UNPICKLED = "convert it to safetensors first — pickled weights are never loaded"
# Files mergekit and transformers fall back to when a dir has neither
# model.safetensors nor its index: their presence means a pickle would be read.
_PICKLE_FALLBACKS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin.index.json")


def require_safetensors(model_dir: str | os.PathLike, *, missing_ok: bool = False) -> list[Path]:
    """The safetensors files a loader reads for this model dir, with sound
    headers; a UserError naming the dir when its weights would have to be
    unpickled. Only file names, the index and safetensors headers are read:
    nothing that could be a pickle is opened.

    A pickle beside model.safetensors (or its index) is allowed: every loader
    takes the safetensors first. `missing_ok` returns [] for a dir with no
    weights at all, leaving that error to the caller."""
    return list(_checked_weights(Path(model_dir), missing_ok))


def _checked_weights(model_dir: Path, missing_ok: bool = False) -> dict[Path, tuple[dict, int]]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no weight_map in this safetensors index")
        shards = sorted({str(name) for name in weight_map.values()})
        pickled = [name for name in shards if not name.endswith(".safetensors")]
        if pickled:
            raise UserError(
                f"{model_dir}: its safetensors index names other weights ({', '.join(pickled[:3])}); {_NEVER_UNPICKLED}"
            )
        files = [model_dir / name for name in shards]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        names = sorted(p.name for p in model_dir.iterdir() if p.is_file()) if model_dir.is_dir() else []
        files = [model_dir / n for n in names if n.endswith(".safetensors")]
        if not files or any(n in _PICKLE_FALLBACKS for n in names):
            others = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
            if others:
                raise UserError(f"{model_dir}: no safetensors weights (found {', '.join(others[:3])}); {_NEVER_UNPICKLED}")
            if missing_ok:
                return {}
            raise UserError(f"{model_dir}: no safetensors weights found")
    return {file: _safetensors_header(file) for file in files}


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
                # One held on an accelerator (population/cache.py) stays there:
                # mergekit's executor moves each task's result where it keeps them.
                return tensor if tensor.device.type != "cpu" else tensor.to(device)
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
        # Built from the checked headers, not mergekit's from_disk, which
        # torch.loads a pytorch_model.bin it finds first.
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        contents: dict[str, list[str]] = {}
        for path, (header, start) in _checked_weights(Path(model_dir)).items():
            contents[path.name] = list(header)
            for name, entry in header.items():
                self._entries[name] = (path, start, entry)
        index = ShardedTensorIndex(
            base_path=str(model_dir),
            is_safetensors=True,
            tensor_paths={name: path.name for name, (path, _, _) in self._entries.items()},
            shards=[ShardInfo(filename=f, contained_keys=keys) for f, keys in contents.items()],
        )
        super().__init__(index, lazy_unpickle=False)
        self.key = str(model_dir)
        self.nbytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for _, _, e in self._entries.values())

    def _lookup(self, name: str) -> Optional[torch.Tensor]:
        return POPULATION_CACHE.tensor(self, name) if name in self._entries else None

    def names(self) -> list[str]:
        return list(self._entries)

    def read(self, name: str) -> torch.Tensor:
        """The tensor from its file, never from the cache."""
        return self._read(*self._entries[name])

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
    """A JSON file's content; one that does not parse is a UserError naming it."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None


def safetensors_shapes(files: Iterable[str | os.PathLike]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        header, _ = _safetensors_header(Path(file))
        shapes.update({name: tuple(entry["shape"]) for name, entry in header.items()})
    return shapes


def tensor_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model dir's tensors, without reading weights."""
    shapes: dict[str, tuple[int, ...]] = {}
    for header, _ in _checked_weights(Path(model_dir)).values():
        shapes.update({name: tuple(entry["shape"]) for name, entry in header.items()})
    return shapes


def check_same_shapes(first: Path, other: Path, shapes: Optional[dict] = None, *, names_too: bool = True) -> None:
    """The same tensors with the same shapes in two model dirs, or one line
    saying where not (`names_too` False: only the tensors both hold)."""
    shapes = tensor_shapes(first) if shapes is None else shapes
    theirs = tensor_shapes(other)
    if names_too and set(theirs) != set(shapes):
        diff = sorted(set(theirs) ^ set(shapes))
        raise UserError(f"models differ in tensors: {first} vs {other}: {diff[:3]}")
    for name, shape in shapes.items():
        if name in theirs and theirs[name] != shape:
            raise UserError(
                f"models differ in tensor shape: {name} is {list(shape)} in {first} "
                f"but {list(theirs[name])} in {other}"
            )


def architecture(model_dir: Path) -> str:
    config = read_json(Path(model_dir) / "config.json")
    return ",".join(config.get("architectures") or [config.get("model_type", "?")])


def clean_population(population_dir: Path, members: Iterable[str]) -> list[Path]:
    """Remove what a killed run left and no ledger row refers to: temp dirs of
    atomic writes (".g002_s03.<random>", "x.partial") and member dirs written
    just before a kill, whose rows were never committed (they are made again).
    Returns what was removed."""
    # By name: rows hold absolute paths, and a run dir may have been moved.
    keep = {Path(m).name for m in members}
    removed = []
    if not population_dir.is_dir():
        return removed
    for entry in sorted(population_dir.iterdir()):
        stray = entry.name.startswith(".") or entry.name.endswith(".partial") or entry.name not in keep
        if entry.is_dir() and stray:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of an on-disk individual (safetensors only: never unpickle)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in require_safetensors(model_dir):
        state.update(load_file(str(shard)))
    return state
