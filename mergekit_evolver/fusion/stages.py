"""Stages 1 and 2 over the corpus, shard by shard, each shard resumable.

Stage 1 runs each source over the corpus (one source in memory at a time)
and writes its top-k rows and per-sequence CE. Stage 2 maps every source
vocabulary onto the target's, aligns each text's tokenizations and writes the
target-side rows training reads. Both stream the corpus: memory holds one
shard's texts and records, whatever the corpus size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from mergekit_evolver.errors import UserError
from mergekit_evolver.fusion.align import align_sequence, pair_tokens
from mergekit_evolver.fusion.distributions import forward_rows, plan_span, source_ids
from mergekit_evolver.fusion.inputs import Inputs, ModelInfo, corpus_texts, load_causal_lm
from mergekit_evolver.fusion.shards import chunks, read_shard, remove_debris, shard_path, split_rows, split_tokens, write_atomic
from mergekit_evolver.fusion.vocab import VocabMap, token_table

Log = Callable[[str], None]


def n_shards(count: int, shard_size: int) -> int:
    return math.ceil(count / shard_size)


def source_dir(work: Path, name: str) -> Path:
    return Path(work) / "sources" / name


def aligned_dir(work: Path) -> Path:
    return Path(work) / "aligned"


def _flat(rows: list[torch.Tensor], k: int, dtype) -> torch.Tensor:
    return torch.cat(rows) if rows else torch.zeros((0, k), dtype=dtype)


def run_sources(config, inputs: Inputs, count: int, work: Path, log: Log) -> None:
    """Stage 1 for every source; shards already written are kept as they are."""
    total = n_shards(count, config.shard_size)
    for src in inputs.sources:
        folder = source_dir(work, src.name)
        remove_debris(folder)
        todo = {i for i in range(total) if not shard_path(folder, i).is_file()}
        if not todo:
            log(f"fuse: stage 1, {src.name}: all {total} shard(s) already written")
            continue
        log(f"fuse: stage 1, {src.name} ({src.architecture}): {len(todo)} of {total} shard(s) to write")
        model = load_causal_lm(src, config.dtype, config.trust_remote_code, config.device)
        model.eval()
        for index, texts in chunks(corpus_texts(config.corpus), config.shard_size):
            if index not in todo:
                continue
            write_source_shard(model, src, inputs.target, texts, config, shard_path(folder, index))
        del model


def write_source_shard(model, src: ModelInfo, target: ModelInfo, texts: list[str], config, path: Path) -> None:
    seqs = [source_ids(src.tokenizer, plan_span(target.tokenizer, t, config.seq_len), src.max_len) for t in texts]
    records = []
    for start in range(0, len(seqs), config.batch_size):
        records += forward_rows(model, seqs[start : start + config.batch_size], config.top_k, src.pad_id, config.device)
    k = config.top_k
    tensors = {
        "input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.long),
        "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.long),
        "topk_ids": _flat([r.topk_ids for r in records], k, torch.long),
        "topk_logits": _flat([r.topk_logits for r in records], k, torch.float32),
        "ce": torch.tensor([r.ce for r in records], dtype=torch.float32),
    }
    write_atomic(path, tensors, {"source": src.name, "count": str(len(texts)), "top_k": str(k)})


def run_alignment(config, inputs: Inputs, count: int, work: Path, maps: dict[str, VocabMap], log: Log) -> list[Path]:
    """Stage 2; returns the aligned shards in order."""
    total = n_shards(count, config.shard_size)
    folder = aligned_dir(work)
    remove_debris(folder)
    paths = [shard_path(folder, i) for i in range(total)]
    todo = {i for i, p in enumerate(paths) if not p.is_file()}
    if not todo:
        log(f"fuse: stage 2: all {total} aligned shard(s) already written")
        return paths
    log(f"fuse: stage 2: aligning {len(todo)} of {total} shard(s)")
    target_table = token_table(inputs.target.tokenizer, inputs.target.vocab_size)
    tables = {s.name: token_table(s.tokenizer, s.vocab_size) for s in inputs.sources}
    for index, texts in chunks(corpus_texts(config.corpus), config.shard_size):
        if index not in todo:
            continue
        spans = [plan_span(inputs.target.tokenizer, t, config.seq_len) for t in texts]
        targets = [list(s.target_ids) for s in spans]
        t_texts = [[target_table.texts[i] for i in ids] for ids in targets]
        t_roles = [[target_table.roles.get(i) for i in ids] for ids in targets]
        tensors = {
            "input_ids": torch.tensor([t for ids in targets for t in ids], dtype=torch.long),
            "lengths": torch.tensor([len(ids) for ids in targets], dtype=torch.long),
        }
        ces = []
        for src in inputs.sources:
            shard = read_shard(shard_path(source_dir(work, src.name), index))
            lengths = shard["lengths"].tolist()
            if len(lengths) != len(texts):
                raise UserError(f"stage 1 shard {index} of {src.name} holds {len(lengths)} texts, the corpus {len(texts)}: the work dir is stale")
            table, vmap = tables[src.name], maps[src.name].ids
            ids_rows, logit_rows, distilled = [], [], []
            for n, (s_ids, top_ids, top_logits) in enumerate(
                zip(split_tokens(shard["input_ids"], lengths), split_rows(shard["topk_ids"], lengths), split_rows(shard["topk_logits"], lengths))
            ):
                s_list = s_ids.tolist()
                pairs = pair_tokens(
                    [table.texts[i] for i in s_list], [table.roles.get(i) for i in s_list], t_texts[n], t_roles[n]
                )
                out = align_sequence(targets[n], s_list, top_ids.numpy(), top_logits.numpy(), vmap, pairs)
                ids_rows.append(torch.from_numpy(out.ids))
                logit_rows.append(torch.from_numpy(out.logits))
                distilled.append(out.distilled)
            tensors[f"ids.{src.name}"] = _flat(ids_rows, config.top_k, torch.long)
            tensors[f"logits.{src.name}"] = _flat(logit_rows, config.top_k, torch.float32)
            tensors[f"distilled.{src.name}"] = torch.tensor(distilled, dtype=torch.long)
            ces.append(shard["ce"])
        tensors["ce"] = torch.stack(ces, dim=1)
        write_atomic(paths[index], tensors, {"count": str(len(texts)), "sources": ",".join(s.name for s in inputs.sources)})
    return paths


def alignment_stats(paths: list[Path], names: list[str], method: str) -> dict[str, dict[str, float]]:
    """Per source: mean CE on the corpus, share of target predictions that
    carry its distribution, and how it weighs in the fusion."""
    from mergekit_evolver.fusion.loss import source_weights

    sums = {n: {"ce": 0.0, "distilled": 0, "weight": 0.0} for n in names}
    rows = seqs = 0
    for path in paths:
        shard = read_shard(path)
        lengths = shard["lengths"]
        rows += int((lengths - 1).clamp_min(0).sum())
        seqs += len(lengths)
        weights = source_weights(shard["ce"], method)
        for s, name in enumerate(names):
            finite = shard["ce"][:, s][torch.isfinite(shard["ce"][:, s])]
            sums[name]["ce"] += float(finite.double().sum())
            sums[name]["distilled"] += int(shard[f"distilled.{name}"].sum())
            sums[name]["weight"] += float(weights[:, s].double().sum())
    return {
        n: {
            "mean_ce": v["ce"] / max(seqs, 1),
            "distilled": v["distilled"] / max(rows, 1),
            "weight": v["weight"] / max(seqs, 1),
        }
        for n, v in sums.items()
    }

