"""A small fusion problem, built on CPU in well under three minutes.

Three sources of different architectures and tokenizers, each trained on one
of the testbed's synthetic task families (mergekit_evolver.testbed.families):

    llama_rev      LlamaForCausalLM, the testbed's character tokenizer      rev
    gpt2_shift     GPT2LMHeadModel, a byte-level BPE ("Ġ"/"Ċ" alphabet)     shift
    neox_argmax    GPTNeoXForCausalLM, a metaspace BPE ("▁", sentencepiece
                   style)                                                 argmax

and a target of the testbed's Llama architecture (character tokenizer),
trained briefly on the mix so that it starts near chance on every family. The
BPEs are trained here with `tokenizers` on the corpus. The corpus is texts
``<prompt><answer>`` of the three families, none of them a dev or test input.

Layout of ``out_dir``::

    data/, tasks/          lm-eval tasks tb_<family>_{dev,test} (tasks/ is the include_path)
    corpus.jsonl           the fusion corpus ("text" per line)
    models/target, models/<source>    HF model dirs (safetensors, tokenizer)
    fuse.yml               a fusion config over all of it (absolute paths)
    manifest.json          written last: seed, paths, the score table

A dir whose manifest has the same seed and version is reused as it is.
Everything is seeded: the same seed gives the same bits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import yaml

MANIFEST = "manifest.json"
VERSION = 1
STR_LEN = 5
FAMILIES = {"llama_rev": "rev", "gpt2_shift": "shift", "neox_argmax": "argmax"}
N_DEV, N_TEST = 100, 200
CORPUS_SIZE = 1500
HIDDEN, INTERMEDIATE, LAYERS, HEADS = 64, 256, 2, 4
SOURCE_STEPS, TARGET_STEPS, BATCH = 800, 60, 32
MERGES = 16  # BPE merges past the alphabet: the op names and a few letter pairs


@dataclass(frozen=True)
class FusionTestbed:
    root: Path
    include_path: Path
    corpus: Path
    target: Path
    sources: dict[str, Path]  # name -> model dir
    families: dict[str, str]  # source name -> the family it was trained on
    config: Path  # fuse.yml over this testbed
    scores: dict[str, dict[str, float]]  # model -> test task -> accuracy
    table_text: str

    def test_tasks(self) -> list[str]:
        from mergekit_evolver.testbed import task_name

        return [task_name(f, "test") for f in self.families.values()]

    def dev_tasks(self) -> list[str]:
        from mergekit_evolver.testbed import task_name

        return [task_name(f, "dev") for f in self.families.values()]


# ---------------------------------------------------------------- tokenizers


def byte_level_tokenizer(texts: Sequence[str], merges: int = MERGES):
    """A GPT-2-style byte-level BPE trained on `texts`; <|endoftext|> is bos and eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer splits letters from punctuation: "rev", ":", "cagbf", "=", ...
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + len(special) + merges, special_tokens=special,
        initial_alphabet=alphabet, show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=special[0], eos_token=special[0], unk_token=special[0],
        pad_token=special[1], model_max_length=64,
    )


def metaspace_tokenizer(texts: Sequence[str], merges: int = MERGES):
    """A sentencepiece-style BPE: spaces become "▁" (a metaspace pre-tokenizer,
    "▁" before the first word too); it adds <s> in front of a text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Punctuation isolated, so "=" never merges into the answer that follows it.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="first"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    chars = sorted({c for t in texts for c in t.replace(" ", "▁")} | {"▁"})
    trainer = trainers.BpeTrainer(
        vocab_size=len(special) + len(chars) + merges, special_tokens=special,
        initial_alphabet=chars, show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=64,
    )


# ---------------------------------------------------------------- models


def _ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def llama(tokenizer, seed: int):
    from mergekit_evolver.testbed.train import init_model, model_config

    cfg = model_config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_layers=LAYERS, num_heads=HEADS)
    return init_model(cfg, seed)


def gpt2(tokenizer, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS,
        n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_ids(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(cfg).float()


def gpt_neox(tokenizer, seed: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=64, tie_word_embeddings=False, **_ids(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(cfg).float()


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids, attention mask and labels for (prompt, answer) pairs: the whole
    text tokenized at once, as lm-eval and the fusion corpus see it, plus eos;
    the loss covers every token, as a language model's does (a model trained
    on the answers alone has no distribution worth distilling on prompts)."""
    rows, labels = [], []
    for prompt, answer in pairs:
        whole = list(tokenizer(prompt + answer)["input_ids"]) + [tokenizer.eos_token_id]
        rows.append(whole)
        labels.append(whole)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)], mask[i, : len(r)], lab[i, : len(lb)] = torch.tensor(r), 1, torch.tensor(lb)
    return ids, mask, lab


def train_lm(model, tokenizer, stream: Iterator[tuple[str, str]], *, steps: int, batch_size: int = BATCH,
             lr: float = 1e-3, warmup: int = 20) -> list[float]:
    """AdamW, linear warmup, cosine decay to a tenth; deterministic on CPU."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses = []
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        ids, mask, lab = encode_pairs(tokenizer, [next(stream) for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------- the build


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


def _load(root: Path, seed: int, steps: dict) -> Optional[FusionTestbed]:
    from mergekit_evolver.testbed.lmeval_tasks import task_name

    tasks = [task_name(f, "test") for f in FAMILIES.values()]
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (data.get("version"), data.get("seed"), data.get("steps"), data.get("families")) != (VERSION, seed, steps, FAMILIES):
        return None
    try:
        scores = {m: {t: float(data["scores"][m][t]) for t in tasks} for m in ("target", *FAMILIES)}
    except (KeyError, TypeError, ValueError):
        return None
    tb = FusionTestbed(
        root=root, include_path=root / "tasks", corpus=root / "corpus.jsonl", target=root / "models" / "target",
        # In the build's order (the manifest's keys are sorted): sources are listed in it.
        sources={n: root / "models" / n for n in FAMILIES}, families=dict(FAMILIES),
        config=root / "fuse.yml", scores=scores, table_text=str(data.get("table_text", "")),
    )
    models = [tb.target, *tb.sources.values()]
    return tb if all((m / "model.safetensors").is_file() for m in models) and tb.corpus.is_file() else None


def score_dir(path: Path, tasks: list[str], include_path: Path) -> dict[str, float]:
    """Test accuracy of the model in `path`, through the project's lm-eval scoring."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_evolver.fusion.inputs import quiet_hf
    from mergekit_evolver.scoring.lmeval import score_model

    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    results = score_model(model, tokenizer, tasks, include_path=include_path, batch_size=64)
    return {t: results[t]["acc"] for t in tasks}


def format_scores(scores: dict[str, dict[str, float]], tasks: list[str]) -> str:
    width = max(len(m) for m in scores) + 2
    head = "model".ljust(width) + "".join(t.ljust(16) for t in tasks) + "mean"
    lines = [head]
    for name, row in scores.items():
        vals = [row[t] for t in tasks]
        lines.append(name.ljust(width) + "".join(f"{v:<16.3f}" for v in vals) + f"{sum(vals) / len(vals):.3f}")
    return "\n".join(lines)


def build_fusion_testbed(
    out_dir: Path, seed: int = 0, *, reuse: bool = True, log: Callable[[str], None] | None = print,
    source_steps: int = SOURCE_STEPS, target_steps: int = TARGET_STEPS,
) -> FusionTestbed:
    """Build the fusion testbed in `out_dir` (or reuse the one there) and print
    its score table. The step counts are for tests that need its layout, not
    its skills (a manifest records them: a build with others is not reused)."""
    from mergekit_evolver.fusion.inputs import quiet_hf

    with quiet_hf():
        return _build(Path(out_dir), seed, reuse, log or (lambda _msg: None), source_steps, target_steps)


def _build(out_dir: Path, seed: int, reuse: bool, log, source_steps: int, target_steps: int) -> FusionTestbed:
    from mergekit_evolver.scoring.lmeval import forget_task_manager
    from mergekit_evolver.testbed.families import get_family, make_splits, training_texts
    from mergekit_evolver.testbed.lmeval_tasks import task_name, write_tasks
    from mergekit_evolver.testbed.tokenizer import build_tokenizer
    from mergekit_evolver.fusion.train import cpu_env, derive_seed

    root = Path(out_dir).resolve()
    steps = {"source": source_steps, "target": target_steps}
    if reuse:
        found = _load(root, seed, steps)
        if found is not None:
            log(f"fusion testbed: reusing {root}")
            log(found.table_text)
            return found
    t0 = time.perf_counter()
    for name in (MANIFEST, "data", "tasks", "models", "corpus.jsonl", "fuse.yml"):
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)
    families = [get_family(f) for f in FAMILIES.values()]
    splits = {f.name: make_splits(f, seed, STR_LEN, N_DEV, N_TEST) for f in families}
    write_tasks(splits, root / "data", root / "tasks")
    forget_task_manager(root / "tasks")
    held_out = {item["input"] for s in splits.values() for items in s.values() for item in items}

    stream = training_texts(families, seed, STR_LEN, "fusion-corpus", held_out)
    corpus = ["".join(next(stream)) for _ in range(CORPUS_SIZE)]
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": t}) + "\n" for t in corpus)

    builders = {"llama_rev": (llama, build_tokenizer()), "gpt2_shift": (gpt2, byte_level_tokenizer(corpus)),
                "neox_argmax": (gpt_neox, metaspace_tokenizer(corpus))}
    paths = {}
    with cpu_env(1):
        for name, (make, tok) in builders.items():
            fam = get_family(FAMILIES[name])
            log(f"fusion testbed: training {name} ({FAMILIES[name]})")
            model = make(tok, derive_seed(seed, "fusion-testbed", name))
            train_lm(model, tok, training_texts([fam], seed, STR_LEN, f"fusion-{name}", held_out), steps=source_steps)
            paths[name] = _save(model, tok, root / "models" / name)
        log("fusion testbed: training the target (briefly, on the mix)")
        tok = build_tokenizer()
        target = llama(tok, derive_seed(seed, "fusion-testbed", "target"))
        train_lm(target, tok, training_texts(families, seed, STR_LEN, "fusion-target", held_out), steps=target_steps, lr=3e-3, warmup=min(30, target_steps))
        target_path = _save(target, tok, root / "models" / "target")
        t_train = time.perf_counter() - t0
        tasks = [task_name(f, "test") for f in FAMILIES.values()]
        scores = {"target": score_dir(target_path, tasks, root / "tasks")}
        scores.update({name: score_dir(p, tasks, root / "tasks") for name, p in paths.items()})
    config = example_config(target_path, paths, root / "corpus.jsonl", seed)
    (root / "fuse.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    table = format_scores(scores, tasks)
    table_text = f"{table}\nbuilt in {time.perf_counter() - t0:.1f} s (training {t_train:.1f} s)"
    log(table_text)
    _write_json(root / MANIFEST, {"version": VERSION, "seed": seed, "steps": steps, "families": FAMILIES,
                                  "scores": scores, "table_text": table_text})
    return FusionTestbed(root, root / "tasks", root / "corpus.jsonl", target_path, paths, dict(FAMILIES),
                         root / "fuse.yml", scores, table_text)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def example_config(target: Path, sources: dict[str, Path], corpus: Path, seed: int, **overrides) -> dict:
    """The fusion settings the testbed is meant to be run with."""
    config = {
        "target": str(target),
        "sources": [{"model": str(p), "name": n} for n, p in sources.items()],
        "corpus": {"path": str(corpus)},
        "top_k": 10,
        "fusion": "min_ce",
        "lambda": 0.5,  # chosen on dev tasks, seeds 0-2 (benchmarks/fusion.py)
        "temperature": 1.0,
        "steps": 1000,
        "learning_rate": 1e-3,
        "warmup_steps": 20,
        "batch_size": 32,
        "seq_len": 64,
        "seed": seed,
        "checkpoint_every": 250,
        "shard_size": 512,
    }
    config.update(overrides)
    return config
