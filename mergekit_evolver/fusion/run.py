"""`fuse(config, out_dir)`: the three stages end to end, resumable.

Layout of the out dir::

    fusion.json                    the run's identity (config digest, corpus digest), written first
    work/sources/<name>/shard-*    stage 1: each source's top-k rows and CEs
    work/vocab/<name>.safetensors  the source -> target vocabulary mapping
    work/aligned/shard-*           stage 2: the target-side rows training reads
    work/checkpoints/step-*        stage 3: the latest checkpoint
    model/                         the fused target, an HF model dir (written last)

A new run needs an absent or empty out dir; `resume` continues the run in
it (the same config and corpus), skipping every shard already written and
training from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from mergekit_evolver.errors import UserError
from mergekit_evolver.fusion.card import model_card
from mergekit_evolver.fusion.config import FusionConfig, load_fusion_config
from mergekit_evolver.fusion.inputs import CorpusScan, Inputs, check_inputs, load_causal_lm, quiet_hf, scan_corpus
from mergekit_evolver.fusion.shards import AlignedReader, write_atomic
from mergekit_evolver.fusion.stages import alignment_stats, run_alignment, run_sources
from mergekit_evolver.fusion.train import cpu_env, train_target
from mergekit_evolver.fusion.vocab import VocabMap, map_vocab, token_table

META_FILE = "fusion.json"
MODEL_DIR = "model"
VERSION = 1

Log = Callable[[str], None]


def read_meta(out: Path) -> dict | None:
    path = out / META_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable ({error}); choose another --out") from None
    return data if isinstance(data, dict) else {}


def check_out_dir(out: Path, config: FusionConfig, resume: bool) -> dict | None:
    """What the out dir holds, checked against what was asked; only looks."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is not a directory")
    meta = read_meta(out) if out.is_dir() else None
    if meta is not None:
        if meta.get("config_digest") != config.digest():
            raise UserError(f"{out} holds another fusion run (its config differs); choose another --out")
        if not resume:
            raise UserError(f"{out} already holds this fusion run; pass --resume to continue it")
        return meta
    if resume:
        raise UserError(f"nothing to resume: {out} holds no fusion run")
    held = [p for p in out.iterdir() if not _setup_debris(p)] if out.is_dir() else []
    if held:
        raise UserError(f"{out} is not empty and holds no fusion run; choose another --out")
    return None


def _setup_debris(path: Path) -> bool:
    """What a run killed while writing fusion.json leaves: its temporary file."""
    return path.is_file() and path.name.startswith(".tmp-") and path.name.endswith(".json")


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _vocab_maps(inputs: Inputs, work: Path) -> dict[str, VocabMap]:
    """Each source's mapping, computed once and kept (the nearest-token
    search is the slow part on a large vocabulary)."""
    folder = work / "vocab"
    maps = {}
    target = None
    for src in inputs.sources:
        path = folder / f"{src.name}.safetensors"
        if path.is_file():
            saved = load_file(str(path))
            maps[src.name] = VocabMap(saved["ids"].numpy(), saved["how"].numpy())
            continue
        target = target or token_table(inputs.target.tokenizer, inputs.target.vocab_size)
        vmap = map_vocab(token_table(src.tokenizer, src.vocab_size), target)
        write_atomic(path, {"ids": torch.from_numpy(vmap.ids), "how": torch.from_numpy(vmap.how)})
        maps[src.name] = vmap
    return maps


def fuse(config_path: "Path | FusionConfig", out_dir: Path, resume: bool = False, log: Log = print) -> Path:
    """Fuse the config's sources into its target; returns the fused model's dir.
    `config_path`: a fusion config file, or the config itself (a run's `fuse:`).

    Every input is checked before anything is written: bad input raises
    UserError (one line) and leaves the out dir as it was."""
    log = log or (lambda _msg: None)
    with quiet_hf():
        return _fuse(config_path, out_dir, resume, log)


def _fuse(config_path: Path, out_dir: Path, resume: bool, log: Log) -> Path:
    config = config_path if isinstance(config_path, FusionConfig) else load_fusion_config(config_path)
    out = Path(out_dir).resolve()
    meta = check_out_dir(out, config, resume)
    inputs = check_inputs(config)
    corpus = scan_corpus(config.corpus)
    if meta is not None and (meta.get("corpus_digest"), meta.get("examples")) != (corpus.digest, corpus.count):
        raise UserError(f"the corpus changed since the run in {out} began ({config.corpus.describe()}); choose another --out")
    # Everything checked out: only now is the out dir written.
    out.mkdir(parents=True, exist_ok=True)
    if meta is None:
        for debris in filter(_setup_debris, out.iterdir()):
            debris.unlink()
        _write_json(out / META_FILE, {
            "version": VERSION, "config_digest": config.digest(), "corpus_digest": corpus.digest,
            "examples": corpus.count, "config": config.dump(),
        })
    final = out / MODEL_DIR
    if (final / "config.json").is_file():
        log(f"fuse: already complete: {final}")
        return final
    with cpu_env(config.threads):
        return _run(config, inputs, corpus, out, log)


def _run(config: FusionConfig, inputs: Inputs, corpus: CorpusScan, out: Path, log: Log) -> Path:
    work = out / "work"
    names = [s.name for s in inputs.sources]
    run_sources(config, inputs, corpus.count, work, log)
    maps = _vocab_maps(inputs, work)
    for name, vmap in maps.items():
        c = vmap.counts()
        log(f"fuse: vocabulary {name} -> target: {c['exact']} exact, {c['nearest']} nearest, {c['special']} special, {c['none']} unmapped")
    shards = run_alignment(config, inputs, corpus.count, work, maps, log)
    stats = alignment_stats(shards, names, config.fusion)
    for name in names:
        s = stats[name]
        log(f"fuse: {name}: mean CE {s['mean_ce']:.4f}, {s['distilled']:.1%} of target predictions distilled")
    reader = AlignedReader(shards, names)
    model = load_causal_lm(inputs.target, config.dtype, config.trust_remote_code, config.device)
    trained = train_target(config, model, reader, work / "checkpoints", inputs.target.pad_id, log)
    return write_model(config, inputs, maps, stats, trained.history, corpus.count, trained.model, out / MODEL_DIR, log)


def write_model(config, inputs, maps, stats, history, examples, model, dest: Path, log: Log) -> Path:
    """The fused target as an HF model dir, appearing whole (renamed into place)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to("cpu").save_pretrained(tmp, safe_serialization=True)
    inputs.target.tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(model_card(config, inputs, maps, stats, history, examples), encoding="utf-8")
    (tmp / "fusion_config.json").write_text(json.dumps(config.dump(), indent=2, sort_keys=True) + "\n")
    if dest.exists():  # a dir without config.json: not a model this run finished
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    log(f"fuse: wrote {dest}")
    return dest
