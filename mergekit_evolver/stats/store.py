"""Gram and Fisher statistics for RegMean and Fisher merging: the stats dir.

Collection (hooks, data sources, the `stats` command) is in stats_collect.py.

A stats dir holds
    manifest.json        format, version, model, source, dtype, and per kind:
                         file, n_examples, n_tokens, shapes (and for gram the
                         layout of each weight: "linear" = out×in as nn.Linear
                         stores it, "conv1d" = in×out as GPT-2's Conv1D does)
    gram.safetensors     weight name -> Gram (in×in)
    fisher.safetensors   parameter name -> diagonal Fisher (the parameter's shape)
It is written to a temporary sibling and renamed into place, replacing an
existing stats dir at --out whole; writing is refused when that would drop a
kind the existing dir holds and this write does not.

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

import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from mergekit_evolver.errors import UserError
from mergekit_evolver.population.store import safetensors_shapes

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
    """`explicit` if given, else `<model dir>/stats` (see the module docstring).

    Its StatsError does not name the model: every caller prefixes
    "<method>: model <model>: " itself, as it does for open_stats' errors."""
    if explicit:
        return os.path.expanduser(explicit)
    path = model_path(model)
    if path is None:
        raise StatsError("no `stats:` parameter and no model path to default from")
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise StatsError(
            "not a local directory, so its statistics have no default "
            "location; give them with the per-model parameter `stats: DIR`"
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


# ---------------------------------------------------------------- writing


def check_out_dir(out_dir: str | os.PathLike, kinds: Sequence[str]) -> None:
    """UserError unless writing `kinds` to out_dir loses nothing: it must be
    absent, empty, or a stats dir holding no kind that is not written again
    (a stats dir is replaced whole, so such a kind would be dropped)."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise UserError(f"--out {out} exists and is not a stats dir; refusing to replace it")
    try:
        held = read_manifest(out).get("kinds", {})
    except (StatsError, FileNotFoundError):
        return  # an unreadable manifest holds nothing to keep
    dropped = [k for k in KINDS if k in held and k not in kinds]
    if dropped:
        raise UserError(
            f"--out {out} holds {' and '.join(dropped)} statistics that writing only "
            f"{','.join(kinds)} would drop; collect --kind {','.join(k for k in KINDS if k in held or k in kinds)} "
            "or write to another --out"
        )


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
    place (an existing stats dir there is replaced, unless that would drop a
    kind it holds: see check_out_dir). `counts[kind]` holds
    n_examples / n_tokens for the manifest."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    check_out_dir(out, [k for k, t in (("gram", grams), ("fisher", fisher)) if t is not None])
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
