"""fitness.score_model: real lm-eval on an in-memory model, quiet, offline, side-effect free."""

from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_evolver.scoring.lmeval import score_model, task_manager
from mergekit_evolver.testbed.train import encode_batch


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _direct_accuracy(model, tokenizer, items: list[dict]) -> float:
    """Multiple-choice accuracy by summing answer-token log-probs ourselves."""
    rows = [(it["prompt"], c) for it in items for c in it["choices"]]
    ids, labels = encode_batch(rows)
    labels[labels == tokenizer.eos_token_id] = -100  # lm-eval scores the answer only
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1)
    target = labels[:, 1:]
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_choice = (tok * (target != -100)).sum(-1).view(len(items), -1)
    gold = torch.tensor([it["label"] for it in items])
    return (per_choice.argmax(-1) == gold).float().mean().item()


def _items(tb, family, split):
    path = tb.root / "data" / f"{family}_{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_every_task_found_through_include_path(tiny_testbed):
    model, tok = _load(tiny_testbed.base)
    tasks = tiny_testbed.dev_tasks(ood=True)
    scores = score_model(model, tok, tasks, include_path=tiny_testbed.include_path)
    assert set(scores) == set(tasks)
    for metrics in scores.values():
        assert set(metrics) == {"acc"} and 0.0 <= metrics["acc"] <= 1.0


def test_scores_equal_direct_log_likelihood_accuracy(tiny_testbed):
    for name in ("base", "spec_rev"):
        model, tok = _load(tiny_testbed.models()[name])
        for fam in ("rev", "argmax", "rev_shift"):
            got = score_model(
                model, tok, [tiny_testbed.dev_task(fam)], include_path=tiny_testbed.include_path
            )[tiny_testbed.dev_task(fam)]["acc"]
            want = _direct_accuracy(model, tok, _items(tiny_testbed, fam, "dev"))
            assert got == pytest.approx(want), (name, fam)


def test_weights_copied_in_place_are_what_gets_scored(tiny_testbed):
    """The resident-model pattern: one module, new weights copied in, scored again."""
    tasks = tiny_testbed.test_tasks()
    resident, tok = _load(tiny_testbed.base)
    base_scores = score_model(resident, tok, tasks, include_path=tiny_testbed.include_path)
    for name in ("spec_shift", "average"):
        other, _ = _load(tiny_testbed.models()[name])
        with torch.no_grad():
            for p, q in zip(resident.parameters(), other.parameters()):
                p.copy_(q)
        scores = score_model(resident, tok, tasks, include_path=tiny_testbed.include_path)
        assert {t: m["acc"] for t, m in scores.items()} == tiny_testbed.scores[name]
    assert {t: m["acc"] for t, m in base_scores.items()} == tiny_testbed.scores["base"]


def test_unknown_task_raises_value_error_naming_it(tiny_testbed):
    model, tok = _load(tiny_testbed.base)
    with pytest.raises(ValueError, match="tb_nope_dev") as err:
        score_model(
            model,
            tok,
            [tiny_testbed.dev_task("rev"), "tb_nope_dev"],
            include_path=tiny_testbed.include_path,
            include_defaults=False,
        )
    assert "tb_rev_dev" not in str(err.value)
    with pytest.raises(ValueError, match="non-empty"):
        score_model(model, tok, [], include_path=tiny_testbed.include_path)
    with pytest.raises(ValueError, match="not a directory"):
        score_model(model, tok, ["tb_rev_dev"], include_path=tiny_testbed.root / "missing")


def test_options_limit_fewshot_chat_template(tiny_testbed):
    model, tok = _load(tiny_testbed.base)
    task = tiny_testbed.dev_task("count")
    for kwargs in ({"limit": 3}, {"num_fewshot": 2, "limit": 4}, {"apply_chat_template": True, "limit": 4}):
        acc = score_model(model, tok, [task], include_path=tiny_testbed.include_path, **kwargs)[task]["acc"]
        assert 0.0 <= acc <= 1.0, kwargs
    one = score_model(model, tok, [task], include_path=tiny_testbed.include_path, limit=1)[task]["acc"]
    assert one in (0.0, 1.0)


def test_call_leaves_env_rng_logging_and_mode_as_they_were(tiny_testbed):
    model, tok = _load(tiny_testbed.base)
    model.train()
    os.environ.pop("HF_DATASETS_OFFLINE", None)
    env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    levels = {n: logging.getLogger(n).level for n in ("lm_eval", "datasets")}
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    score_model(model, tok, [tiny_testbed.dev_task("rev")], include_path=tiny_testbed.include_path)
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.random.get_rng_state(), states[2])
    assert {k: os.environ.get(k) for k in env} == env
    assert {n: logging.getLogger(n).level for n in levels} == levels
    assert model.training


def test_scoring_never_touches_the_network(tiny_testbed, monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    model, tok = _load(tiny_testbed.base)
    scores = score_model(model, tok, tiny_testbed.test_tasks(), include_path=tiny_testbed.include_path)
    assert {t: m["acc"] for t, m in scores.items()} == tiny_testbed.scores["base"]


def test_task_manager_is_cached_per_include_path(tiny_testbed):
    a = task_manager(tiny_testbed.include_path)
    assert task_manager(str(tiny_testbed.include_path)) is a
    assert task_manager([tiny_testbed.include_path]) is a
    assert task_manager(tiny_testbed.include_path, include_defaults=False) is a
    assert "tb_rev_test" in a.all_tasks


def test_requests_built_once_score_like_freshly_built_ones(tiny_testbed):
    """Loaded tasks keep their built requests across calls (responses cleared),
    and the lm keeps each request's tokens: scoring another model's weights
    this way equals scoring with tasks and an lm made afresh."""
    from mergekit_evolver.scoring import lmeval as fitness

    names = [tiny_testbed.dev_task("rev"), tiny_testbed.dev_task("argmax")]
    manager = fitness.resolve_task_manager(names, tiny_testbed.include_path)
    model, tok = _load(tiny_testbed.base)
    lm = fitness.hflm(model, tok)
    kept = fitness.load_tasks(manager, names)
    fitness.run_tasks(lm, kept)
    built = {n: kept["tasks"][n].instances for n in names}
    first = [list(i.resps) for n in names for i in built[n]]
    spec, _ = _load(tiny_testbed.models()["spec_rev"])
    model.load_state_dict(spec.state_dict())
    again = fitness.run_tasks(lm, kept)
    assert all(kept["tasks"][n].instances is built[n] for n in names)
    # A fresh lm (nothing tokenized yet) on freshly built requests agrees.
    assert again == fitness.run_tasks(fitness.hflm(model, tok), fitness.load_tasks(manager, names))
    assert len(lm._encoded_pairs) == sum(len(built[n]) for n in names)  # each pair tokenized once
    second = [list(i.resps) for n in names for i in built[n]]
    # One response per request, the new model's (not appended to the first's).
    assert all(len(r) == 1 for r in second) and second != first


def test_shuffle_reorders_documents_the_same_way_every_time(tiny_testbed):
    from mergekit_evolver.scoring import lmeval as fitness

    name = tiny_testbed.dev_task("rev")
    manager = fitness.resolve_task_manager([name], tiny_testbed.include_path)

    def docs(shuffle):
        task = fitness.load_tasks(manager, [name], shuffle=shuffle)["tasks"][name]
        return [d["prompt"] for d in task.eval_docs]

    plain, shuffled = docs(False), docs(True)
    assert sorted(plain) == sorted(shuffled) and plain != shuffled
    assert docs(True) == shuffled
