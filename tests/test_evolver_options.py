"""The Evolver as its authors' code runs it: the annealed donor, immediate
replacement, permuted slot order and tensors left out of mutation. Each option
is checked for its semantics, and runs with them resume to the same model."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergekit_evolver.config import EvolveConfig
from mergekit_evolver.ledger import Ledger
from mergekit_evolver.population.store import load_state
from mergekit_evolver.run import evolve
from mergekit_evolver.run.loop import CandidateLoop
from mergekit_evolver.search.evolver import Evolver
from mergekit_evolver.search.protocol import Result
from mergekit_evolver.search.seeds import derive_rng
from toy_world import run_config

CLI = str(Path(sys.executable).parent / "mergekit-evolver")


def drive(s: Evolver, fitness) -> list:
    """The protocol to the end; `fitness(proposal)` is told for each."""
    asked = []
    while not s.done:
        p = s.ask()
        if p is None:
            s.end_generation()
            continue
        asked.append((p, list(s.members)))
        s.tell(p, Result(fitness(p)))
    return asked


def evolver(n=4, **kw) -> Evolver:
    kw.setdefault("operator", "de_current_to_rand1")
    return Evolver([f"m{i}" for i in range(n)], [0.1 * (i + 1) for i in range(n)],
                   mode=kw.pop("mode", "individual"), generations=kw.pop("generations", 3), seed=kw.pop("seed", 5), **kw)


def test_immediate_replacement_lets_a_later_slot_take_this_generations_offspring():
    # de_rand1 over four members: slot 1's three donors are all the others, slot 0 among them.
    for update, seen in (("immediate", True), ("generation", False)):
        s = evolver(operator="de_rand1", update=update, generations=1)
        s.end_generation()
        first = s.ask()
        assert s.tell(first, Result(0.99))  # better than m0's 0.1
        assert (s.members[0] == first.child) is seen
        second = s.ask()
        assert (first.child in second.donors) is seen
        assert ("m0" in second.donors) is not seen


def test_permuted_slot_order_is_a_fresh_seeded_permutation_each_generation():
    orders = {}
    for order in ("fixed", "permuted"):
        s = evolver(slot_order=order, generations=6)
        asked = drive(s, lambda p: 0.0)
        by_generation = {}
        for p, _ in asked:
            by_generation.setdefault(p.generation, []).append(p.slot)
        orders[order] = by_generation
        assert all(sorted(slots) == [0, 1, 2, 3] for slots in by_generation.values())
        assert len({p.step for p, _ in asked}) == len(asked)
    assert all(slots == [0, 1, 2, 3] for slots in orders["fixed"].values())
    assert len({tuple(slots) for slots in orders["permuted"].values()}) > 1
    again = drive(evolver(slot_order="permuted", generations=6), lambda p: 0.0)
    assert [p.slot for p, _ in again] == [s for g in sorted(orders["permuted"]) for s in orders["permuted"][g]]


def test_annealed_donor_is_the_fittest_other_member_with_probability_1_minus_p():
    T = 8
    s = evolver(donor="annealed_best", generations=T, n=5)
    best_picks = total = 0
    for p, members in drive(s, lambda p: 0.0):  # nothing is accepted: fitness stays put
        g, i = p.generation, p.slot
        rng = derive_rng(5, "donors", g, i)
        chance = 0.5 / (T - (g - 1)) + 0.5
        others = [j for j in range(5) if j != i]
        if rng.random() >= chance:
            expected = members[max(others, key=lambda j: (s.fitness[j], -j))]
            best_picks += 1
        else:
            expected = members[int(rng.choice(others, size=1, replace=False)[0])]
        assert p.donors == (expected,)
        total += 1
        if g == T:
            assert chance == 1.0  # the last generation always draws at random
    assert 0 < best_picks < total


def test_annealed_donor_is_refused_outside_the_authors_setting(shared_world):
    with pytest.raises(ValueError, match="de.donor annealed_best is for de.operator de_current_to_rand1"):
        EvolveConfig.model_validate(run_config(shared_world, de={"operator": "de_rand1", "donor": "annealed_best"}))
    with pytest.raises(ValueError, match="selection.mode individual"):
        EvolveConfig.model_validate(run_config(shared_world, de={"donor": "annealed_best"}, selection={"mode": "merged"}))
    with pytest.raises(ValueError, match="not a regular expression"):
        EvolveConfig.model_validate(run_config(shared_world, de={"exclude": ["lm_head("]}))


OPTIONS = {
    "immediate": dict(selection={"update": "immediate"}),
    "permuted": dict(selection={"mode": "merged", "slot_order": "permuted"}, output={"kind": "merged"}),
    "annealed": dict(de__donor="annealed_best"),
    "exclude": dict(de__exclude=["lm_head", r"layers\.1\..*mlp"]),
}


def option_config(world, name: str) -> dict:
    config = run_config(world, de__generations=2, **OPTIONS[name])
    config["report"] = {"tasks": [], "baselines": []}
    return config


@pytest.fixture(scope="module")
def finished(shared_world, tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("options")
    out = {}
    for name in OPTIONS:
        out[name] = runs / name
        evolve(EvolveConfig.model_validate(option_config(shared_world, name)), out[name], log=lambda _: None)
    return out


def test_excluded_tensors_keep_the_targets_weights(shared_world, finished):
    rows = Ledger(finished["exclude"]).candidates("offspring")
    assert rows and all(yaml.safe_load(r.recipe)["parameters"]["exclude"] for r in rows)
    left, mutated = 0, 0
    for row in rows:
        if row.status != "accepted":
            continue
        target = yaml.safe_load(row.recipe)["base_model"]
        child, parent = load_state(Path(row.member)), load_state(Path(target))
        for name in child:
            if name == "lm_head.weight" or (".layers.1." in name and "mlp" in name):
                assert torch.equal(child[name], parent[name]), name
                left += 1
            else:
                mutated += not torch.equal(child[name], parent[name])
    assert left and mutated, "no accepted offspring to check, or nothing was mutated"


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_run_with_each_option_resumes_to_the_same_model(shared_world, finished, tmp_path, monkeypatch, name):
    real, calls = CandidateLoop._compute, []

    def dies_on_the_fifth(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(CandidateLoop, "_compute", dies_on_the_fifth)
    config = EvolveConfig.model_validate(option_config(shared_world, name))
    with pytest.raises(KeyboardInterrupt):
        evolve(config, tmp_path / "cut", log=lambda _: None)
    monkeypatch.setattr(CandidateLoop, "_compute", real)
    evolve(config, tmp_path / "cut", resume=True, log=lambda _: None)
    steps = lambda out: [(c.step, c.status, c.fitness) for c in Ledger(out).candidates()]  # noqa: E731
    assert steps(tmp_path / "cut") == steps(finished[name])
    model = "model/model.safetensors"
    assert (tmp_path / "cut" / model).read_bytes() == (finished[name] / model).read_bytes()


def test_every_option_at_once_survives_kill_9(shared_world, tmp_path):
    config = run_config(shared_world, de={"operator": "de_current_to_rand1", "generations": 2, "donor": "annealed_best",
                                          "exclude": ["lm_head"]},
                        selection={"update": "immediate", "slot_order": "permuted"})
    config["report"] = {"tasks": [], "baselines": []}
    path = tmp_path / "all.yml"
    path.write_text(yaml.safe_dump(config))
    evolve(EvolveConfig.model_validate(config), tmp_path / "whole", log=lambda _: None)
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([CLI, "evolve", str(path), "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger, deadline = run_dir / "ledger.sqlite", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            n = sqlite3.connect(ledger).execute("SELECT COUNT(*) FROM candidates WHERE role='offspring'").fetchone()[0]
        except sqlite3.Error:
            n = 0
        if n >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run([CLI, "evolve", str(path), "--out", str(run_dir), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    model = "model/model.safetensors"
    assert (run_dir / model).read_bytes() == (tmp_path / "whole" / model).read_bytes()
