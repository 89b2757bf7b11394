"""Statistics collection: Grams and Fisher equal their definitions, padding is
excluded, the stats dir is written atomically and read back through a cache,
and the `stats` command turns bad input into one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_evolver.cli import stats_command
from mergekit_evolver.errors import UserError
from mergekit_evolver.stats.store import MANIFEST, open_stats, write_stats
from mergekit_evolver.stats.collect import (
    Source,
    collect_statistics,
    linear_layers,
    task_texts,
    token_batches,
)
from tiny_models import make_model
from toy_world import reverse_items, write_task

TEXTS = [
    "rev:abcd=dcba",
    "a",
    "",  # <s> alone: in the Grams, but nothing to predict, so not in the Fisher
    "hello world, a longer line of text",
    "xy",
    "the quick brown fox",
    "zz top",
    "mergekit",
]


@pytest.fixture(scope="module")
def toy(shared_world):
    # The dir is only read; --out always points under the test's tmp_path.
    path = shared_world.models[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, model, tokenizer


def unpadded_ids(tokenizer, text):
    return tokenizer(text, return_tensors="pt")["input_ids"]


def direct_grams(model, tokenizer, texts):
    """XᵀX/n from each nn.Linear's inputs captured by wrapping Linear.forward
    (no hooks), one unpadded example at a time."""
    names = {id(module): f"{name}.weight" for name, module in model.named_modules()}
    rows: dict[str, list[torch.Tensor]] = {}
    original = torch.nn.Linear.forward

    def recording(self, x):
        rows.setdefault(names[id(self)], []).append(x.detach().reshape(-1, x.shape[-1]).double())
        return original(self, x)

    torch.nn.Linear.forward = recording
    try:
        with torch.no_grad():
            for text in texts:
                model(input_ids=unpadded_ids(tokenizer, text))
    finally:
        torch.nn.Linear.forward = original
    grams = {}
    for name, parts in rows.items():
        x = torch.cat(parts)
        grams[name] = x.T @ x / x.shape[0]
    return grams


def direct_fisher(model, tokenizer, texts):
    """Mean over examples of the squared gradient of each example's LM loss."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    n = 0
    for text in texts:
        ids = unpadded_ids(tokenizer, text)
        if ids.shape[1] < 2:
            continue
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        for name, p in model.named_parameters():
            total[name] += p.grad.square()
        n += 1
    model.zero_grad()
    return {k: v / n for k, v in total.items()}, n


@pytest.mark.parametrize("batch_size, side", [(1, "right"), (3, "right"), (4, "left")])
def test_gram_is_xtx_over_n_of_non_padding_tokens(toy, batch_size, side):
    _, model, tokenizer = toy
    tokenizer.padding_side = side
    try:
        batches = list(token_batches(tokenizer, TEXTS, batch_size=batch_size))
    finally:
        tokenizer.padding_side = "right"
    padded = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    assert (padded > 0) == (batch_size > 1)  # the batched cases really carry padding
    collected = collect_statistics(model, batches, ["gram"])
    expected = direct_grams(model, tokenizer, TEXTS)
    assert set(collected.grams) == set(expected) == set(linear_layers(model))
    assert len(expected) == 15  # 7 projections x 2 layers + lm_head
    assert collected.gram_tokens == sum(unpadded_ids(tokenizer, t).shape[1] for t in TEXTS)
    for name, gram in expected.items():
        assert collected.grams[name].dtype == torch.float64
        torch.testing.assert_close(collected.grams[name], gram, rtol=1e-5, atol=1e-7, msg=name)


def test_fisher_is_mean_squared_gradient_and_ignores_padding(toy):
    _, model, tokenizer = toy
    expected, n = direct_fisher(model, tokenizer, TEXTS)
    batches = token_batches(tokenizer, TEXTS, batch_size=3)
    collected = collect_statistics(model, batches, ["fisher"])
    assert collected.fisher_examples == n == len(TEXTS) - 1  # "" has nothing to predict
    assert collected.fisher_tokens == sum(unpadded_ids(tokenizer, t).shape[1] - 1 for t in TEXTS if t)
    assert set(collected.fisher) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(collected.fisher[name], value, rtol=1e-5, atol=1e-12, msg=name)
    assert all(p.grad is None for p in model.parameters())


def test_tied_lm_head_has_no_gram(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    assert "lm_head.weight" not in linear_layers(model)
    assert "model.layers.0.self_attn.q_proj.weight" in linear_layers(model)


def test_write_is_atomic_replaces_and_cache_sees_the_new_dir(tmp_path):
    out = tmp_path / "stats"
    write_stats(out, model="a", fisher={"w": torch.ones(3)})
    assert open_stats(out).get("fisher", "w").tensor.tolist() == [1.0, 1.0, 1.0]
    write_stats(out, model="a", fisher={"w": torch.full((3,), 2.0)}, counts={"fisher": {"n_examples": 4}})
    stats = open_stats(out)
    assert stats.get("fisher", "w").tensor.tolist() == [2.0, 2.0, 2.0]
    assert stats.get("fisher", "nope") is None
    assert stats.manifest["kinds"]["fisher"]["n_examples"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]  # no temp dirs left
    assert sorted(p.name for p in out.iterdir()) == ["fisher.safetensors", MANIFEST]


def test_a_write_that_would_drop_a_held_kind_is_refused(tmp_path):
    out = tmp_path / "stats"
    write_stats(out, model="a", grams={"w": torch.eye(2)})
    with pytest.raises(UserError, match="holds gram statistics that writing only fisher would drop"):
        write_stats(out, model="a", fisher={"w": torch.ones(2)})
    assert open_stats(out).kinds == ("gram",)
    write_stats(out, model="a", grams={"w": 2 * torch.eye(2)}, fisher={"w": torch.ones(2)})
    assert open_stats(out).kinds == ("gram", "fisher")
    assert open_stats(out).get("gram", "w").tensor.tolist() == [[2.0, 0.0], [0.0, 2.0]]


def invoke(*args):
    return CliRunner().invoke(stats_command, [str(a) for a in args], catch_exceptions=False)


def test_cli_writes_manifest_and_statistics(toy, tmp_path):
    path, model, tokenizer = toy
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "stats"
    result = invoke(path, "--data", data, "--out", out, "--max-examples", 5, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["model"] == str(Path(path).resolve())
    assert manifest["source"] == {"kind": "jsonl", "path": str(data.resolve())}
    gram, fisher = manifest["kinds"]["gram"], manifest["kinds"]["fisher"]
    assert gram["n_examples"] == 5
    assert gram["n_tokens"] == sum(unpadded_ids(tokenizer, t).shape[1] for t in TEXTS[:5])
    assert gram["layouts"]["model.layers.0.mlp.down_proj.weight"] == "linear"
    assert gram["shapes"]["model.layers.0.mlp.down_proj.weight"] == [64, 64]
    assert fisher["shapes"]["model.embed_tokens.weight"] == list(model.model.embed_tokens.weight.shape)
    stats = open_stats(out)
    expected = direct_grams(model, tokenizer, TEXTS[:5])
    torch.testing.assert_close(
        stats.get("gram", "model.layers.1.self_attn.o_proj.weight").tensor.double(),
        expected["model.layers.1.self_attn.o_proj.weight"], rtol=1e-5, atol=1e-7,
    )


def test_txt_and_lm_eval_task_sources(toy, tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\n two \nthree\n")
    assert list(Source(str(txt)).texts()) == ["one", " two ", "three"]
    write_task(tmp_path, "toy_stats", reverse_items(3, 4))
    rows = reverse_items(3, 4)
    texts = list(task_texts("toy_stats", [str(tmp_path)]))
    assert texts == [f"{r['q']} {r['choices'][r['label']]}" for r in rows]
    result = invoke(toy[0], "--data", "toy_stats", "--include-path", tmp_path, "--out", tmp_path / "s", "--kind", "gram")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["source"] == {"kind": "lm-eval", "task": "toy_stats", "split": None, "include_path": [str(tmp_path)]}
    assert list(manifest["kinds"]) == ["gram"] and manifest["kinds"]["gram"]["n_examples"] == 4


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_model", "is not a model directory"),
        ("no_data_file", "data file not found"),
        ("bad_kind", "--kind must be gram, fisher or gram,fisher; got 'grams'"),
        ("no_text_field", 'needs a string "text" field'),
        ("empty_data", "no examples"),
        ("zero_examples", "--max-examples must be at least 1; got 0"),
        ("foreign_out", "exists and is not a stats dir"),
        ("drops_kind", "holds gram statistics that writing only fisher would drop; collect --kind gram,fisher"),
        ("unknown_task", "not a .jsonl/.txt file nor an lm-eval task"),
        ("no_tokenizer", "no usable tokenizer"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(toy, tmp_path, case, message):
    model, _, _ = toy
    good = tmp_path / "good.txt"
    good.write_text("abc\n")
    args = {"model": model, "--data": good, "--out": tmp_path / "out"}
    extra: list = []
    if case == "no_model":
        args["model"] = tmp_path / "missing"
    elif case == "no_data_file":
        args["--data"] = tmp_path / "missing.jsonl"
    elif case == "bad_kind":
        extra = ["--kind", "grams"]
    elif case == "no_text_field":
        args["--data"] = tmp_path / "d.jsonl"
        args["--data"].write_text('{"prompt": "x"}\n')
    elif case == "empty_data":
        args["--data"] = tmp_path / "e.txt"
        args["--data"].write_text("\n\n")
    elif case == "zero_examples":
        extra = ["--max-examples", "0"]
    elif case == "foreign_out":
        args["--out"].mkdir()
        (args["--out"] / "precious.txt").write_text("keep me")
    elif case == "drops_kind":
        write_stats(args["--out"], model="m", grams={"w": torch.eye(2)}, fisher={"w": torch.ones(2)})
        extra = ["--kind", "fisher"]
    elif case == "unknown_task":
        args["--data"] = "no_such_task"
        extra = ["--include-path", tmp_path]
    elif case == "no_tokenizer":
        args["model"] = make_model(tmp_path / "bare", seed=1)
    result = invoke(args["model"], "--data", args["--data"], "--out", args["--out"], *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    if case == "foreign_out":
        assert (args["--out"] / "precious.txt").read_text() == "keep me"
        assert [p.name for p in args["--out"].iterdir()] == ["precious.txt"]
    elif case == "drops_kind":
        stats = open_stats(args["--out"])
        assert stats.kinds == ("gram", "fisher")
        assert stats.get("gram", "w").tensor.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    else:
        assert not (tmp_path / "out").exists()


def test_cli_help():
    result = CliRunner().invoke(stats_command, ["--help"])
    assert result.exit_code == 0
    assert "--data" in result.output and "--kind" in result.output
