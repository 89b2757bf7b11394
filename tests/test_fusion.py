"""Knowledge fusion (FuseLLM): vocabulary mapping, sequence alignment, the
fusion loss against hand-computed values, stage-1 shards against direct
forward passes, resume equivalence, and the checks at the door.

The models are tiny and random (built here in well under a second): a Llama
target with the testbed's character tokenizer, a GPT-2 source with a
byte-level BPE and a GPT-NeoX source with a metaspace BPE, both BPEs trained
here on the test corpus."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergekit_evolver.errors import UserError
from mergekit_evolver.fusion import loss, train as train_mod, stages
from mergekit_evolver.fusion.align import align_sequence, dtw_path, one_to_one, pair_tokens
from mergekit_evolver.fusion.distributions import plan_span, source_ids
from mergekit_evolver.fusion.run import fuse
from mergekit_evolver.fusion.shards import chunks, split_rows, split_tokens
from mergekit_evolver.fusion.testbed import byte_level_tokenizer, metaspace_tokenizer
from mergekit_evolver.fusion.vocab import (
    EXACT,
    NEAREST,
    SPECIAL,
    Markers,
    TokenTable,
    _probe_space,
    detect_markers,
    map_vocab,
    token_table,
    token_text,
)
from mergekit_evolver.testbed.tokenizer import build_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "hello", "world", "rev:abc=cba", "shf:abd=bce", "dog"]


def corpus_texts(n: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(n)]
    texts[3] = "hello world\nthe cat"  # a newline: Ċ in byte-level, itself in the others
    return texts


@pytest.fixture(scope="module")
def toks():
    texts = corpus_texts(200, seed=1)
    return {"char": build_tokenizer(), "byte": byte_level_tokenizer(texts, merges=30), "meta": metaspace_tokenizer(texts, merges=30)}


# ---------------------------------------------------------------- vocabulary


def test_markers_are_read_off_each_tokenizer(toks):
    assert detect_markers(toks["byte"]) == Markers(byte_level=True)
    assert detect_markers(toks["meta"]).spaces == ("▁",)
    assert not detect_markers(toks["meta"]).byte_level
    char = detect_markers(toks["char"])
    assert (char.byte_level, char.spaces) == (False, ())
    # Without a backend to read, the spelling of a space comes from tokenizing "a b".
    assert _probe_space(toks["meta"]) == ("▁",) and _probe_space(toks["char"]) == ()


def test_llama2_style_normalizer_and_byte_fallback_are_detected():
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=special, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    found = detect_markers(fast)
    assert found.spaces == ("▁",) and found.byte_fallback


def test_token_text_undoes_markers():
    byte, meta = Markers(byte_level=True), Markers(spaces=("▁",))
    assert token_text("Ġworld", byte) == " world"
    assert token_text("Ċ", byte) == "\n"
    assert token_text("▁world", meta) == " world"
    assert token_text("world", meta) == "world"
    # Half a UTF-8 character: byte-level 'Ã' is byte 0xC3, as is byte fallback's <0xC3>.
    assert token_text("Ã", byte) == token_text("<0xC3>", Markers(byte_fallback=True)) == b"\xc3".decode("utf-8", "surrogateescape")
    assert token_text("<0x0A>", Markers(byte_fallback=True)) == "\n"
    assert token_text("##ing", Markers(continuation="##")) == "ing"
    assert token_text("walk", Markers(continuation="##")) == " walk"


def test_map_vocab_exact_special_nearest_by_hand():
    source = TokenTable(texts=(None, "a", " world", "xyz", "qq", None), roles={0: "eos", 5: "bos"})
    # Target: eos at 4, no bos; "a" twice (the byte-fallback copy is chosen last).
    target = TokenTable(texts=("a", " world", "xy", "q", None, "b", "a"), roles={4: "eos"}, fallback=frozenset({0}))
    m = map_vocab(source, target)
    assert m.ids.tolist() == [4, 6, 1, 2, 3, -1]
    assert m.how.tolist() == [SPECIAL, EXACT, EXACT, NEAREST, NEAREST, 0]
    # "qq" is 1 edit from "q" (id 3) and 2 from everything else; "xyz" is 1 from "xy".
    # A tie goes to the earliest candidate: "c" is 1 edit from "a", "b" and "q".
    tie = map_vocab(TokenTable(texts=("c",)), TokenTable(texts=("q", "b", "a")))
    assert tie.ids.tolist() == [0]


def test_map_vocab_matches_across_byte_level_and_metaspace(toks):
    byte, meta = toks["byte"], toks["meta"]
    m = map_vocab(token_table(byte), token_table(meta))
    vocab_b, vocab_m = byte.get_vocab(), meta.get_vocab()
    assert "Ġcat" in vocab_b and "▁cat" in vocab_m
    assert m.ids[vocab_b["Ġcat"]] == vocab_m["▁cat"]
    assert m.how[vocab_b["Ġcat"]] == EXACT
    assert m.ids[vocab_b["<|endoftext|>"]] == meta.eos_token_id  # by role
    # To the character tokenizer: "Ċ" is "\n" exactly; "Ġcat" has no exact match.
    char = toks["char"]
    to_char = map_vocab(token_table(byte), token_table(char))
    assert to_char.ids[vocab_b["Ċ"]] == char.get_vocab()["\n"] and to_char.how[vocab_b["Ċ"]] == EXACT
    assert to_char.how[vocab_b["Ġcat"]] == NEAREST


# ---------------------------------------------------------------- alignment


def test_dtw_one_to_one():
    path = dtw_path(["a", "b", "c"], ["a", "b", "c"])
    assert path == [(0, 0), (1, 1), (2, 2)]
    assert one_to_one(path) == {0: 0, 1: 1, 2: 2}


def test_dtw_one_to_many_and_many_to_one():
    # Hand-computed: cost(ab,a)=1 cost(ab,b)=1 cost(ab,c)=2 / cost(c,a)=1 cost(c,b)=1 cost(c,c)=0;
    # accumulated [[1,2,4],[2,2,2]]; from (1,2) diagonal (2) ties left (2): diagonal wins -> (0,1), then (0,0).
    path = dtw_path(["ab", "c"], ["a", "b", "c"])
    assert path == [(0, 0), (0, 1), (1, 2)]
    assert one_to_one(path) == {2: 1}
    back = dtw_path(["a", "b", "c"], ["ab", "c"])
    assert back == [(0, 0), (1, 0), (2, 1)]
    assert one_to_one(back) == {1: 2}
    # Space markers cost nothing: " the" pairs with "the".
    assert one_to_one(dtw_path([" the", " cat"], ["the", "cat"])) == {0: 0, 1: 1}


def test_dtw_empty_side():
    assert dtw_path([], ["a"]) == [] and dtw_path(["a"], []) == []
    assert pair_tokens([], [], ["a", "b"], [None, None]) == {}


def test_pair_tokens_pairs_specials_by_role():
    # target: <s> a b </s>; source (no bos): a b <eos>
    pairs = pair_tokens(["a", "b", None], [None, None, "eos"], [None, "a", "b", None], ["bos", None, None, "eos"])
    assert pairs == {1: 0, 2: 1, 3: 2}


def test_align_sequence_rows_by_hand():
    # Target ids: <s>=0 a=1 b=2 cd=3 </s>=4 ; source ids: a=10 b=11 c=12 d=13 eos=14
    # Source tokens a b c d eos; target tokens <s> a b cd </s>.
    vmap = np.full(20, -1, dtype=np.int64)
    vmap[[10, 11, 12, 13, 14, 15]] = [1, 2, 3, 3, 4, 2]  # 15 maps to "b" too
    target_ids, src_ids = [0, 1, 2, 3, 4], [10, 11, 12, 13, 14]
    k = 3
    top_ids = np.array([[11, 15, 19], [12, 13, 10], [13, 12, 11], [14, 10, 11]])  # rows predict tokens 1..4
    top_logits = np.array([[3.0, 2.0, 1.0], [5.0, 4.0, 0.5], [2.0, 1.0, 0.0], [9.0, 1.0, 0.0]], dtype=np.float32)
    pairs = {1: 0, 2: 1, 4: 4}  # "cd" is 1:2 with "c","d": no pair
    out = align_sequence(target_ids, src_ids, top_ids, top_logits, vmap, pairs)
    # Row 0 predicts target "a" (pairs with source 0, which has no prediction): one-hot.
    assert out.ids[0].tolist() == [1, -1, -1] and out.logits[0, 0] == 0.0
    # Row 1 predicts "b" (source 1, row 0): 11->2, 15->2 again (dropped), 19 unmapped.
    assert out.ids[1].tolist() == [2, -1, -1] and out.logits[1, 0] == 3.0
    # Row 2 predicts "cd": not 1:1, one-hot of 3.
    assert out.ids[2].tolist() == [3, -1, -1]
    # Row 3 predicts </s> (source eos at 4, row 3): 14->4, 10->1, 11->2.
    assert out.ids[3].tolist() == [4, 1, 2] and out.logits[3].tolist() == [9.0, 1.0, 0.0]
    assert out.distilled == 2
    # A 1:1 pair whose tokens disagree under the mapping gives a one-hot.
    bad = align_sequence([0, 1, 2], [10, 12, 14], top_ids[:2], top_logits[:2], vmap, {1: 0, 2: 1})
    assert bad.ids[1].tolist() == [2, -1, -1] and bad.distilled == 0
    assert out.ids.shape == (4, k) and out.logits.dtype == np.float32


# ---------------------------------------------------------------- loss


def test_source_weights_by_hand():
    ce = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    assert loss.source_weights(ce, "min_ce").tolist() == [[1.0, 0.0], [1.0, 0.0]]  # a tie: the first
    w = loss.source_weights(ce, "avg_ce")
    r1, r2 = math.exp(-1.0), math.exp(-2.0)  # reward = 1 / exp(CE)
    expect = math.exp(r1) / (math.exp(r1) + math.exp(r2))
    assert w[0, 0].item() == pytest.approx(expect, abs=1e-6)
    assert w[1].tolist() == pytest.approx([0.5, 0.5])


def test_fusion_loss_by_hand():
    # One sequence of 3 tokens, vocabulary 3, two sources with k=2; target logits fixed.
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]])
    input_ids = torch.tensor([[0, 1, 2]])
    rows = torch.tensor([[True, True]])
    t_ids = torch.tensor([[[[1, 2], [1, -1]], [[2, 0], [0, 1]]]])  # [B, L-1, S, k]
    t_logits = torch.tensor([[[[0.0, 0.0], [0.0, -math.inf]], [[math.log(3.0), 0.0], [0.0, 0.0]]]])
    ce = torch.tensor([[0.5, 1.5]])
    T, lam = 1.0, 0.9

    def logp(row):
        z = [math.exp(v) for v in row]
        return [math.log(v / sum(z)) for v in z]

    lp0, lp1 = logp([1.0, 0.0, 0.0]), logp([0.0, 2.0, 0.0])
    clm = -(lp0[1] + lp1[2]) / 2
    # Source 0: row 0 is {1: .5, 2: .5}, row 1 {2: .75, 0: .25}; source 1: row 0 {1: 1}, row 1 {0: .5, 1: .5}.
    kd_s0 = [-(0.5 * lp0[1] + 0.5 * lp0[2]), -(0.75 * lp1[2] + 0.25 * lp1[0])]
    kd_s1 = [-lp0[1], -(0.5 * lp1[0] + 0.5 * lp1[1])]
    r0, r1 = math.exp(-0.5), math.exp(-1.5)
    w0 = math.exp(r0) / (math.exp(r0) + math.exp(r1))
    for method, (a, b) in {"min_ce": (1.0, 0.0), "avg_ce": (w0, 1 - w0)}.items():
        kd = sum(a * x + b * y for x, y in zip(kd_s0, kd_s1)) / 2
        parts = loss.fusion_loss(logits, input_ids, rows, t_ids, t_logits, ce, method=method, lam=lam, temperature=T)
        assert parts.clm.item() == pytest.approx(clm, abs=1e-6)
        assert parts.fusion.item() == pytest.approx(kd, abs=1e-6)
        assert parts.loss.item() == pytest.approx(lam * clm + (1 - lam) * kd, abs=1e-6)
    # Temperature divides the logits: at T=2, source 0's row 1 is softmax(log 3 / 2, 0).
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    probs = loss.teacher_probs(t_logits[0, 1, 0], 2.0)
    assert probs.tolist() == pytest.approx([p, 1 - p])
    # The sparse fused distribution densified is the weighted mixture.
    ids, pr = loss.fused_sparse(t_ids[0], t_logits[0], torch.tensor([[w0, 1 - w0]] * 2), 1.0)
    dense = loss.densify(ids, pr, 3)
    assert dense[0].tolist() == pytest.approx([0.0, 0.5 * w0 + (1 - w0), 0.5 * w0])


# ---------------------------------------------------------------- end to end


def _save_gpt2(path: Path, tok, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def _save_neox(path: Path, tok, seed: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPTNeoXForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, toks):
    from toy_world import save_model

    root = tmp_path_factory.mktemp("fusion_world")
    texts = corpus_texts(20)
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    target = save_model(root / "target", seed=5, hidden=16, layers=1)
    gpt2 = _save_gpt2(root / "gpt2", toks["byte"], 6)
    neox = _save_neox(root / "neox", toks["meta"], 7)
    return {"root": root, "texts": texts, "target": target, "gpt2": gpt2, "neox": neox}


def write_config(world, path: Path, **overrides) -> Path:
    config = {
        "target": str(world["target"]),
        "sources": [str(world["gpt2"]), {"model": str(world["neox"]), "name": "neox"}],
        "corpus": {"path": str(world["root"] / "corpus.jsonl")},
        "top_k": 4, "fusion": "avg_ce", "lambda": 0.5, "temperature": 2.0,
        "steps": 6, "learning_rate": 1e-2, "warmup_steps": 2, "batch_size": 4, "seq_len": 24,
        "seed": 3, "checkpoint_every": 3, "shard_size": 8,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def straight(world, tmp_path_factory):
    """One uninterrupted run."""
    root = tmp_path_factory.mktemp("straight")
    cfg = write_config(world, root / "fuse.yml")
    out = root / "out"
    logs = []
    model = fuse(cfg, out, False, log=logs.append)
    return {"config": cfg, "out": out, "model": model, "logs": logs}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / "model.safetensors"))


def test_output_is_an_hf_model_dir_with_a_card(straight):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = straight["model"]
    assert model_dir == straight["out"] / "model"
    assert (model_dir / "model.safetensors").is_file()
    assert not list(model_dir.glob("*.bin")) and not list(model_dir.glob("*.pt"))
    AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
    assert len(AutoTokenizer.from_pretrained(model_dir)) == len(build_tokenizer())
    card = (model_dir / "README.md").read_text()
    assert "FuseLLM" in card and "AvgCE" in card and "gpt2" in card and "neox" in card
    assert "GPT2LMHeadModel" in card and "GPTNeoXForCausalLM" in card
    assert any("step 6/6" in line for line in straight["logs"])


def test_stage1_shards_equal_a_direct_forward_pass(world, straight):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target_tok = AutoTokenizer.from_pretrained(world["target"])
    seen = cut = 0
    for name, key in (("gpt2", "gpt2"), ("neox", "neox")):
        tok = AutoTokenizer.from_pretrained(world[key])
        model = AutoModelForCausalLM.from_pretrained(world[key]).eval()
        shards = sorted((straight["out"] / "work" / "sources" / name).glob("shard-*.safetensors"))
        assert len(shards) == 3  # 20 texts in shards of 8
        texts = iter(world["texts"])
        for shard_file in shards:
            shard = load_file(str(shard_file))
            lengths = shard["lengths"].tolist()
            assert set(shard) == {"input_ids", "lengths", "topk_ids", "topk_logits", "ce"}
            for ids, top_ids, top_logits, ce in zip(
                split_tokens(shard["input_ids"], lengths), split_rows(shard["topk_ids"], lengths),
                split_rows(shard["topk_logits"], lengths), shard["ce"],
            ):
                text = next(texts)
                span = plan_span(target_tok, text, 24)
                assert ids.tolist() == source_ids(tok, span, 64)
                if span.whole:
                    assert ids.tolist() == list(tok(text)["input_ids"]) + [tok.eos_token_id]
                else:  # the target kept 24 tokens: the source sees the text they cover, no eos
                    cut += 1
                    assert len(span.target_ids) == 24 and text.startswith(span.text)
                    assert ids.tolist() == list(tok(span.text)["input_ids"])
                with torch.no_grad():
                    logits = model(input_ids=ids[None]).logits[0]
                values, indices = torch.topk(logits[:-1], 4)
                assert top_ids.shape == (len(ids) - 1, 4)  # only k per position, never the vocabulary
                assert torch.equal(top_ids, indices)
                torch.testing.assert_close(top_logits, values, atol=1e-5, rtol=1e-5)
                direct = torch.nn.functional.cross_entropy(logits[:-1], ids[1:]).item()
                assert ce.item() == pytest.approx(direct, abs=1e-5)
                seen += 1
    assert seen == 40 and cut > 0


def test_resume_after_interrupts_gives_the_same_bits(world, straight, tmp_path, monkeypatch):
    cfg = write_config(world, tmp_path / "fuse.yml")
    out = tmp_path / "out"

    # 1. Killed in stage 1, after gpt2's first shard was written.
    real_write = stages.write_source_shard
    calls = {"n": 0}

    def dies_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed in stage 1")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(stages, "write_source_shard", dies_on_second)
    with pytest.raises(RuntimeError, match="killed in stage 1"):
        fuse(cfg, out, False, log=None)
    first = out / "work" / "sources" / "gpt2" / "shard-00000.safetensors"
    assert first.is_file() and not (out / "work" / "sources" / "gpt2" / "shard-00001.safetensors").exists()
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    monkeypatch.setattr(stages, "write_source_shard", real_write)

    # 2. Resumed, then killed in training after the step-3 checkpoint.
    real_loss = train_mod.fusion_loss
    steps = {"n": 0}

    def dies_after_three(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 4:
            raise RuntimeError("killed in training")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "fusion_loss", dies_after_three)
    with pytest.raises(RuntimeError, match="killed in training"):
        fuse(cfg, out, True, log=None)
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # a written shard is never redone
    assert [p.name for p in (out / "work" / "checkpoints").iterdir()] == ["step-0000003"]
    monkeypatch.setattr(train_mod, "fusion_loss", real_loss)

    # 3. Resumed to the end: the same bits as the run that never stopped.
    logs = []
    model_dir = fuse(cfg, out, True, log=logs.append)
    assert any("resuming training at step 3" in line for line in logs)
    a, b = _weights(straight["model"]), _weights(model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for rel in ("sources/gpt2", "sources/neox", "aligned"):
        for shard in sorted((straight["out"] / "work" / rel).glob("shard-*")):
            x, y = load_file(str(shard)), load_file(str(out / "work" / rel / shard.name))
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # A finished run resumed is left as it is.
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert fuse(cfg, out, True, log=None) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_aligned_rows_carry_source_distributions(straight):
    shard = load_file(str(straight["out"] / "work" / "aligned" / "shard-00000.safetensors"))
    rows = int((shard["lengths"] - 1).sum())
    for name in ("gpt2", "neox"):
        ids = shard[f"ids.{name}"]
        assert ids.shape == (rows, 4)
        distilled = int(shard[f"distilled.{name}"].sum())
        # Distilled rows hold several candidates; one-hot rows exactly one.
        assert int(((ids >= 0).sum(1) > 1).sum()) <= distilled and 0 < distilled < rows
    assert shard["ce"].shape == (8, 2)


def test_chunks_reads_lazily():
    pulled = []

    def texts():
        for i in range(100):
            pulled.append(i)
            yield i

    it = chunks(texts(), 8)
    index, group = next(it)
    assert (index, group) == (0, list(range(8))) and len(pulled) == 8


# ---------------------------------------------------------------- bad input


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_target", "target: model not found"),
        ("missing_source", r"sources\[1\]: model not found"),
        ("no_tokenizer", r"sources\[0\] has no tokenizer"),
        ("missing_corpus", "corpus not found"),
        ("top_k", r"top_k 9999 is larger than the vocabulary of sources\[0\]"),
        ("lambda", r"lambda must be in \[0, 1\], got 1.5"),
        ("unknown_key", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, case, message):
    overrides = {}
    if case == "missing_target":
        overrides["target"] = str(tmp_path / "nope")
    elif case == "missing_source":
        overrides["sources"] = [str(world["gpt2"]), str(tmp_path / "nope")]
    elif case == "no_tokenizer":
        bare = tmp_path / "bare"
        shutil.copytree(world["gpt2"], bare)
        for f in bare.iterdir():
            if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
                f.unlink()
        overrides["sources"] = [str(bare)]
    elif case == "missing_corpus":
        overrides["corpus"] = {"path": str(tmp_path / "nope.jsonl")}
    elif case == "top_k":
        overrides["top_k"] = 9999
    elif case == "lambda":
        overrides["lambda"] = 1.5
    elif case == "unknown_key":
        overrides["lamda"] = 0.5
    cfg = write_config(world, tmp_path / "fuse.yml", **overrides)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=message) as caught:
        fuse(cfg, out, False, log=None)
    assert "\n" not in str(caught.value)
    assert list(out.iterdir()) == []


def test_out_dir_of_another_run_is_refused_and_kept(world, straight, tmp_path):
    out = straight["out"]
    before = _snapshot(out)
    other = write_config(world, tmp_path / "other.yml", seed=4)
    with pytest.raises(UserError, match="holds another fusion run") as caught:
        fuse(other, out, True, log=None)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="already holds this fusion run; pass --resume"):
        fuse(straight["config"], out, False, log=None)
    assert _snapshot(out) == before


def test_out_dir_states(world, tmp_path):
    cfg = write_config(world, tmp_path / "fuse.yml")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty and holds no fusion run"):
        fuse(cfg, busy, False, log=None)
    with pytest.raises(UserError, match="nothing to resume"):
        fuse(cfg, tmp_path / "absent", True, log=None)
    assert _snapshot(busy) == {"keep.txt": b"mine"} and not (tmp_path / "absent").exists()
    with pytest.raises(UserError, match="config not found"):
        fuse(tmp_path / "nope.yml", tmp_path / "o", False, log=None)


# ---------------------------------------------------------------- corpus, example, testbed


def test_task_corpus_reads_lm_eval_documents(tmp_path):
    from toy_world import reverse_items, write_task

    from mergekit_evolver.fusion.config import CorpusConfig
    from mergekit_evolver.fusion.inputs import corpus_texts as read_corpus, scan_corpus

    rows = reverse_items(4, 5)
    write_task(tmp_path, "fuse_toy", rows)
    corpus = CorpusConfig(task="fuse_toy", include_path=(str(tmp_path),), limit=3)
    # doc_to_text + target delimiter (" ") + the gold choice.
    assert list(read_corpus(corpus)) == [f"{r['q']} {r['choices'][0]}" for r in rows[:3]]
    assert scan_corpus(corpus).count == 3
    with pytest.raises(UserError, match="corpus task 'nope' not found"):
        scan_corpus(CorpusConfig(task="nope", include_path=(str(tmp_path),)))


def test_example_config_is_the_testbed_recipe(monkeypatch):
    from mergekit_evolver.fusion.config import load_fusion_config
    from mergekit_evolver.fusion.testbed import example_config

    monkeypatch.setenv("FUSION_TESTBED", "/fusion")
    example = Path(__file__).resolve().parent.parent / "mergekit_evolver" / "examples" / "fuse.yml"
    config = load_fusion_config(example)
    built = example_config(Path("/fusion/models/target"),
                           {n: Path(f"/fusion/models/{n}") for n in ("llama_rev", "gpt2_shift", "neox_argmax")},
                           Path("/fusion/corpus.jsonl"), 0)
    assert config.dump() == load_fusion_config_data(built).dump()


def load_fusion_config_data(data: dict):
    from mergekit_evolver.fusion.config import parse_fusion_config

    return parse_fusion_config(data)


def test_fusion_testbed_layout(tmp_path):
    """A build with a few training steps: the layout and the three kinds of
    tokenizer (its skills come from the full step counts, in benchmarks/fusion.py)."""
    from transformers import AutoConfig, AutoTokenizer

    from mergekit_evolver.fusion.config import load_fusion_config
    from mergekit_evolver.fusion.testbed import build_fusion_testbed

    tb = build_fusion_testbed(tmp_path / "tb", seed=0, log=None, source_steps=2, target_steps=2)
    archs = {n: AutoConfig.from_pretrained(p).architectures[0] for n, p in tb.sources.items()}
    assert archs == {"llama_rev": "LlamaForCausalLM", "gpt2_shift": "GPT2LMHeadModel", "neox_argmax": "GPTNeoXForCausalLM"}
    assert AutoConfig.from_pretrained(tb.target).architectures == ["LlamaForCausalLM"]
    markers = {n: detect_markers(AutoTokenizer.from_pretrained(p)) for n, p in tb.sources.items()}
    assert markers["gpt2_shift"].byte_level and markers["neox_argmax"].spaces == ("▁",)
    assert not markers["llama_rev"].byte_level and not markers["llama_rev"].spaces
    assert set(tb.scores) == {"target", *tb.sources} and set(tb.scores["target"]) == set(tb.test_tasks())
    config = load_fusion_config(tb.config)
    assert config.target == str(tb.target) and len(config.sources) == 3
    texts = [json.loads(line)["text"] for line in tb.corpus.read_text().splitlines()]
    held_out = {json.loads(l)["input"] for f in (tb.root / "data").glob("*.jsonl") for l in f.read_text().splitlines()}
    assert len(texts) == 1500 and not any(t.split(":")[1].split("=")[0] in held_out for t in texts)
    again = build_fusion_testbed(tmp_path / "tb", seed=0, log=None, source_steps=2, target_steps=2)
    assert again == tb


def _textbook_dtw(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """The reference's recurrence and backtrack, cell by cell."""
    from rapidfuzz.distance import Levenshtein

    n, m = len(a), len(b)
    acc = [[math.inf] * (m + 1) for _ in range(n + 1)]
    acc[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            c = Levenshtein.distance(a[i - 1].replace(" ", ""), b[j - 1].replace(" ", ""))
            acc[i][j] = c + min(acc[i - 1][j], acc[i][j - 1], acc[i - 1][j - 1])
    i, j, path = n - 1, m - 1, [(n - 1, m - 1)]
    while i > 0 or j > 0:
        options = [acc[i][j] if i and j else math.inf, acc[i][j + 1] if i else math.inf, acc[i + 1][j] if j else math.inf]
        move = options.index(min(options))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
        path.append((i, j))
    return path[::-1]


def test_dtw_equals_the_textbook_recurrence():
    rng = random.Random(0)
    pieces = ["a", "b", "ab", "ba", " a", "abc", "c", "", "cab"]
    for _ in range(200):
        a = [rng.choice(pieces) for _ in range(rng.randint(1, 9))]
        b = [rng.choice(pieces) for _ in range(rng.randint(1, 9))]
        assert dtw_path(a, b) == _textbook_dtw(a, b), (a, b)


def test_resume_with_a_vanished_source_changes_nothing(world, tmp_path, monkeypatch):
    source = shutil.copytree(world["gpt2"], tmp_path / "gpt2_copy")
    cfg = write_config(world, tmp_path / "fuse.yml", sources=[str(source)], steps=3, checkpoint_every=1)
    out = tmp_path / "out"
    real_loss = train_mod.fusion_loss
    calls = {"n": 0}

    def dies_at_step_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_mod, "fusion_loss", dies_at_step_two)
    with pytest.raises(RuntimeError):
        fuse(cfg, out, False, log=None)
    before = _snapshot(out)
    assert any(name.startswith("work/checkpoints/step-") for name in before)
    shutil.rmtree(source)
    with pytest.raises(UserError, match=r"sources\[0\]: model not found") as caught:
        fuse(cfg, out, True, log=None)
    assert "\n" not in str(caught.value)
    assert _snapshot(out) == before


def test_a_fuse_section_fuses_first_and_the_fused_model_joins_the_search(tmp_path):
    """FuseChat's order in one run config: fuse, then evolve with the fused
    target as the population's last model; a second run finds the fusion done."""
    from mergekit_evolver.config import EvolveConfig
    from mergekit_evolver.errors import UserError
    from mergekit_evolver.fusion.testbed import build_fusion_testbed, example_config
    from mergekit_evolver.ledger import Ledger
    from mergekit_evolver.run import evolve
    from mergekit_evolver.testbed import task_name

    tb = build_fusion_testbed(tmp_path / "tb", seed=0, log=None, source_steps=2, target_steps=2)
    fusion = example_config(tb.target, tb.sources, tb.corpus, 0, steps=2, checkpoint_every=1, batch_size=4)
    data = {
        "seed": 0,
        "fuse": {"config": fusion, "out": str(tmp_path / "fused")},
        "population": {"models": [str(tb.sources["llama_rev"]), str(tb.target)], "base_model": str(tb.target)},
        "de": {"generations": 1, "F": 0.5, "CR": 0.9},
        "fitness": {"tasks": [task_name(f, "dev") for f in tb.families.values()],
                    "include_path": str(tb.include_path), "device": "cpu"},
        "report": {"tasks": [], "baselines": []},
    }
    config = EvolveConfig.model_validate(data)
    fused = str(tmp_path / "fused" / "model")
    assert config.population.models[-1] == fused and len(config.population.models) == 3
    lines: list[str] = []
    evolve(config, tmp_path / "run", log=lines.append)
    assert (Path(fused) / "model.safetensors").is_file()
    starting = [c.member for c in Ledger(tmp_path / "run").candidates() if c.step.startswith("init/m")]
    assert fused in starting
    again: list[str] = []
    evolve(EvolveConfig.model_validate(data), tmp_path / "run2", log=again.append)
    assert any("already complete" in line for line in again)
    inside = {**data, "fuse": {"config": fusion, "out": str(tmp_path / "run3" / "fused")}}
    with pytest.raises(UserError, match="is inside the run dir"):
        evolve(EvolveConfig.model_validate(inside), tmp_path / "run3")
    with pytest.raises(Exception, match="lambda must be in"):
        EvolveConfig.model_validate({**data, "fuse": {"config": {**fusion, "lambda": 2.0}, "out": str(tmp_path / "x")}})
