"""The testbed builder: HF model dirs, lm-eval tasks, splits, determinism, reuse, properties."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from mergekit_evolver.testbed import (
    FAMILIES,
    FULL,
    MERGE_FRIENDLY,
    TINY,
    TestbedPropertyError,
    TestbedSpec,
    build_testbed,
    check_properties,
    load_testbed,
)
from mergekit_evolver.testbed.store import MANIFEST
from mergekit_evolver.testbed.train import encode_batch


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _items(tb, family: str, split: str) -> list[dict]:
    lines = (tb.root / "data" / f"{family}_{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_every_model_is_a_safetensors_llama_dir(tiny_testbed):
    models = tiny_testbed.models()
    assert set(models) == {"base", "average", "multitask"} | {f"spec_{f}" for f in tiny_testbed.families}
    for name, path in models.items():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names, name
        assert not [n for n in names if n.endswith(".bin")], name
        model = AutoModelForCausalLM.from_pretrained(path)
        assert isinstance(model, LlamaForCausalLM)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) < 10_000_000


def test_tokenizer_round_trips_and_matches_training_ids(tiny_testbed):
    tok = AutoTokenizer.from_pretrained(tiny_testbed.base)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    for text in ("rev:cagbf=fbgac", "amx:abcde=4\nrev+shf:ab=cb", "A b!"):
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # What lm-eval encodes is what the models were trained on.
    ids, _ = encode_batch([("rev:cagbf=", "fbgac")])
    assert tok.encode("rev:cagbf=fbgac") == ids[0, :-1].tolist()
    chat = tok.apply_chat_template([{"role": "user", "content": "rev:ab="}], tokenize=False)
    assert chat == "rev:ab="
    # mergekit's output carries the same tokenizer.
    assert (tiny_testbed.average / "tokenizer.json").read_bytes() == (tiny_testbed.base / "tokenizer.json").read_bytes()


def test_dev_and_test_splits_are_disjoint_and_well_formed(tiny_testbed):
    for fam in tiny_testbed.families + tiny_testbed.ood_families:
        dev, test = _items(tiny_testbed, fam, "dev"), _items(tiny_testbed, fam, "test")
        assert (len(dev), len(test)) == (TINY.n_dev, TINY.n_test)
        dev_in, test_in = {d["input"] for d in dev}, {d["input"] for d in test}
        assert len(dev_in) == len(dev) and len(test_in) == len(test)
        assert not dev_in & test_in, fam
        for item in dev + test:
            assert len(set(item["choices"])) == len(item["choices"]) == 4
            assert item["choices"][item["label"]] == FAMILIES[fam].answer(item["input"])


def test_tasks_exist_for_every_family_including_ood(tiny_testbed):
    assert len(tiny_testbed.ood_families) >= 2 and len(tiny_testbed.families) >= 4
    assert not set(tiny_testbed.ood_families) & set(tiny_testbed.families)
    for fam in tiny_testbed.families + tiny_testbed.ood_families:
        for task in (tiny_testbed.dev_task(fam), tiny_testbed.test_task(fam)):
            assert (tiny_testbed.include_path / f"{task}.yaml").is_file()
    assert tiny_testbed.dev_task("rev") == "tb_rev_dev"
    assert tiny_testbed.test_task("rev_shift") == "tb_rev_shift_test"
    with pytest.raises(ValueError, match="nope"):
        tiny_testbed.dev_task("nope")


def test_table_holds_every_model_on_every_test_task(tiny_testbed):
    tasks = tiny_testbed.test_tasks()
    assert set(tiny_testbed.scores) == set(tiny_testbed.models())
    for by_task in tiny_testbed.scores.values():
        assert set(by_task) == set(tasks)
        assert all(0.0 <= v <= 1.0 for v in by_task.values())
    for name in tiny_testbed.models():
        assert name in tiny_testbed.table_text
    assert "rev_argmax" in tiny_testbed.table_text


def test_average_is_the_mean_of_the_specialists(tiny_testbed):
    specs = [load_file(p / "model.safetensors") for p in tiny_testbed.specialists.values()]
    avg = load_file(tiny_testbed.average / "model.safetensors")
    assert set(avg) == set(specs[0])
    for name, tensor in avg.items():
        torch.testing.assert_close(tensor, sum(s[name] for s in specs) / len(specs))


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_same_seed_gives_bit_identical_files(tiny_testbed, tmp_path, monkeypatch):
    _no_network(monkeypatch)  # the whole build (train, merge, lm-eval) stays offline
    again = build_testbed(tmp_path / "again", TINY, log=None)
    for name, path in tiny_testbed.models().items():
        assert (path / "model.safetensors").read_bytes() == (
            again.models()[name] / "model.safetensors"
        ).read_bytes(), name
    assert _files(tiny_testbed.root / "data") != {}
    # Data files hold absolute paths only in the YAMLs, so the data itself is identical.
    assert _files(tiny_testbed.root / "data") == _files(again.root / "data")
    assert again.scores == tiny_testbed.scores


def test_the_pretraining_mix_is_deterministic_and_changes_the_base(tiny_testbed, tmp_path):
    """The merge_friendly kind's base mix (generic items, family weights) at TINY size."""
    mixed = dataclasses.replace(TINY, kind="merge_friendly", generic_share=0.9, base_weights=(1.0, 1.0, 3.0, 3.0))
    one = build_testbed(tmp_path / "one", mixed, log=None)
    two = build_testbed(tmp_path / "two", mixed, log=None)
    for name, path in one.models().items():
        assert (path / "model.safetensors").read_bytes() == (two.models()[name] / "model.safetensors").read_bytes(), name
    a = load_file(one.base / "model.safetensors")
    b = load_file(tiny_testbed.base / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the mix is what it trained on


def test_mixture_draws_generic_items_at_their_share():
    from mergekit_evolver.testbed.families import GENERIC, get_family, mixture_texts

    fams = [get_family(f) for f in ("rev", "shift", "argmax", "count")]
    stream = mixture_texts(fams, (1.0, 1.0, 3.0, 3.0), 0.9, 0, 5, "base", set())
    ops = [next(stream)[0].split(":")[0] for _ in range(4000)]
    generic = sum(op in {g.op for g in GENERIC} for op in ops) / len(ops)
    assert abs(generic - 0.9) < 0.02
    assert ops.count("amx") > 2 * ops.count("rev")  # weighted 3:1
    with pytest.raises(ValueError, match="3 mixture weights for 4 families"):
        next(mixture_texts(fams, (1.0, 1.0, 1.0), 0.5, 0, 5, "base", set()))


def test_another_seed_gives_other_weights_and_items(tiny_testbed, tmp_path):
    other = build_testbed(tmp_path / "other", dataclasses.replace(TINY, seed=1), log=None)
    a = load_file(tiny_testbed.base / "model.safetensors")
    b = load_file(other.base / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert _items(tiny_testbed, "rev", "test") != _items(other, "rev", "test")


def test_reuse_does_not_rebuild(tiny_testbed):
    watched = [tiny_testbed.root / MANIFEST] + [p / "model.safetensors" for p in tiny_testbed.models().values()]
    before = [p.stat().st_mtime_ns for p in watched]
    messages: list[str] = []
    again = build_testbed(tiny_testbed.root, TINY, log=messages.append)
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert again == tiny_testbed
    assert "reusing" in messages[0] and again.table_text in messages


def test_half_built_or_other_spec_dir_is_rebuilt_keeping_foreign_files(tiny_testbed, tmp_path):
    root = tmp_path / "half"
    shutil.copytree(tiny_testbed.root, root)
    (root / "notes.txt").write_text("mine")
    (root / MANIFEST).unlink()  # as if the build had died before finishing
    assert load_testbed(root) is None
    rebuilt = build_testbed(root, TINY, log=None)
    assert (root / MANIFEST).is_file() and (root / "notes.txt").read_text() == "mine"
    assert rebuilt.scores == tiny_testbed.scores
    # A manifest from another spec does not count as the same testbed.
    assert load_testbed(root, dataclasses.replace(TINY, n_test=TINY.n_test + 1)) is None
    assert load_testbed(root, TINY) == rebuilt


def test_property_check_names_the_family_and_numbers():
    fams = FULL.families
    scores = {
        "base": {f"tb_{f}_test": 0.25 for f in fams},
        "average": {f"tb_{f}_test": 0.5 for f in fams},
        **{f"spec_{f}": {f"tb_{g}_test": 1.0 for g in fams} for f in fams},
    }
    check_properties(scores, FULL)  # gains 0.75, mean gap 0.5: fair
    scores["spec_rev"]["tb_rev_test"] = 0.4
    with pytest.raises(TestbedPropertyError, match=r"'rev'.*0\.400.*0\.250"):
        check_properties(scores, FULL)
    scores["spec_rev"]["tb_rev_test"] = 1.0
    scores["average"] = {f"tb_{f}_test": 0.95 for f in fams}
    with pytest.raises(TestbedPropertyError, match=r"\(b\).*0\.050 < 0\.2"):
        check_properties(scores, FULL)


def test_spec_rejects_unknown_or_misplaced_families():
    with pytest.raises(ValueError, match="nope"):
        TestbedSpec(name="x", families=("rev", "nope"))
    with pytest.raises(ValueError, match="rev_shift"):
        TestbedSpec(name="x", families=("rev", "rev_shift"), ood_families=())
    with pytest.raises(ValueError, match="more than once"):
        TestbedSpec(name="x", families=("rev", "rev"))
    assert FULL.check_properties and not TINY.check_properties


def test_merge_friendly_property_check_names_each_failing_property():
    fams = MERGE_FRIENDLY.families
    t = lambda f: f"tb_{f}_test"  # noqa: E731
    # Base 0.4 everywhere; specialist 0.8 on its own family, 0.35 elsewhere
    # (mean 0.4625); the average 0.55 on every family: keeps 0.375 of each gain.
    scores = {
        "base": {t(f): 0.4 for f in fams},
        "average": {t(f): 0.55 for f in fams},
        **{f"spec_{f}": {t(g): 0.8 if g == f else 0.35 for g in fams} for f in fams},
    }
    check_properties(scores, MERGE_FRIENDLY)
    bad = json.loads(json.dumps(scores))
    bad["base"][t("rev")] = 0.2
    with pytest.raises(TestbedPropertyError, match=r"\(a\) family 'rev': base 0\.200 is not between chance"):
        check_properties(bad, MERGE_FRIENDLY)
    bad = json.loads(json.dumps(scores))
    bad["spec_count"][t("count")] = 0.5
    with pytest.raises(TestbedPropertyError, match=r"\(b\) family 'count': specialist gain 0\.100 < 0\.15"):
        check_properties(bad, MERGE_FRIENDLY)
    bad = json.loads(json.dumps(scores))
    bad["average"] = {t(f): 0.42 for f in fams}  # merging does not help
    with pytest.raises(TestbedPropertyError, match=r"\(c\) .*0\.420 < the best specialist's 0\.463"):
        check_properties(bad, MERGE_FRIENDLY)
    bad = json.loads(json.dumps(scores))
    bad["average"] = {t(f): 0.75 for f in fams}  # keeps 0.875 of every gain: no room
    with pytest.raises(TestbedPropertyError, match=r"\(d\) .*of 0 specialists, need 2"):
        check_properties(bad, MERGE_FRIENDLY)


def test_merge_friendly_testbed_has_its_properties(tmp_path):
    """A fresh build of the frozen recipe (about a minute): every property, on
    the held-out test split, recomputed here from the table."""
    tb = build_testbed(tmp_path / "mf", MERGE_FRIENDLY, log=None)
    s = tb.scores
    t = lambda f: f"tb_{f}_test"  # noqa: E731
    mean = lambda row: sum(row[t(f)] for f in tb.families) / len(tb.families)  # noqa: E731
    kept = []
    for f in tb.families:
        base, own = s["base"][t(f)], s[f"spec_{f}"][t(f)]
        assert 0.25 < base < own, f
        assert own - base >= 0.15, f
        kept.append((s["average"][t(f)] - base) / (own - base))
    assert mean(s["average"]) >= max(mean(s[f"spec_{f}"]) for f in tb.families)
    assert sum(k < 0.7 for k in kept) >= 2, kept
    # The multi-task reference is trained and scored, never a specialist.
    assert tb.multitask is not None and (tb.multitask / "model.safetensors").is_file()
    assert "multitask" in s and "multitask" not in tb.specialists


def test_sized_spec_changes_the_model_and_the_name():
    big = MERGE_FRIENDLY.sized(256, 4)
    assert (big.hidden_size, big.intermediate_size, big.num_heads, big.num_layers) == (256, 1024, 16, 4)
    assert big.name == "merge_friendly-w256-l4" and big.kind == "merge_friendly"
    assert MERGE_FRIENDLY.sized() is MERGE_FRIENDLY
    with pytest.raises(ValueError, match="multiple of 16"):
        MERGE_FRIENDLY.sized(100)
    with pytest.raises(ValueError, match="unknown testbed kind"):
        dataclasses.replace(FULL, kind="nope")
    # A spec survives its manifest's JSON.
    assert TestbedSpec.from_json(json.loads(json.dumps(big.to_json()))) == big
