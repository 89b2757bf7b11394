"""DE offspring through a real mergekit run: formulas, crossover, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mergekit.sparsify import magnitude

from de_run import run_yaml, write_config
from mergekit_evolver.methods.masks import crossover_mask, keep_mask
from tiny_models import load_tensors, make_model

F = 0.7
CLI = str(Path(sys.executable).parent / "mergekit-evolver")

# The formulas as the issue writes them, in float32; x is the target, d the donors.
FORMULAS = {
    "de_rand1": (3, lambda x, d: d[0] + F * (d[1] - d[2])),
    "de_best1": (3, lambda x, d: d[0] + F * (d[1] - d[2])),
    "de_current_to_best1": (3, lambda x, d: x + F * (d[0] - x) + F * (d[1] - d[2])),
    "de_current_to_rand1": (1, lambda x, d: x + F * (d[0] - x)),
}


def evolve(tmp_path, population, method, **params):
    n_donors = FORMULAS[method][0]
    x, donors = population[0], population[1 : 1 + n_donors]
    config = write_config(tmp_path / "c.yml", method, x, donors, **params)
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = load_tensors(tmp_path / "out")
    return out, load_tensors(x), [load_tensors(d) for d in donors]


def mutant(method, xs, donors, name):
    return FORMULAS[method][1](xs[name], [d[name] for d in donors])


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_formula_exact_tensor_by_tensor_when_cr_is_one(tmp_path, population, method):
    out, xs, donors = evolve(tmp_path, population, method, F=F, CR=1.0, seed=3)
    assert set(out) == set(xs)
    for name in xs:
        expected = mutant(method, xs, donors, name)
        assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_binomial_trial_is_the_keyed_mask_over_mutant_and_target(tmp_path, population, method):
    out, xs, donors = evolve(tmp_path, population, method, F=F, CR=0.3, seed=11)
    for name, x in xs.items():
        mask = crossover_mask(x.shape, 0.3, seed=11, name=name)
        expected = torch.where(mask, mutant(method, xs, donors, name), x)
        assert torch.equal(out[name], expected), name


@pytest.mark.parametrize("cr", [0.1, 0.5, 0.9])
def test_share_of_elements_from_mutant_is_cr(tmp_path, population, cr):
    out, xs, donors = evolve(tmp_path, population, "de_rand1", F=F, CR=cr, seed=5)
    from_v = total = 0
    for name, x in xs.items():
        v = mutant("de_rand1", xs, donors, name)
        took_v = out[name] == v
        assert torch.all(took_v | (out[name] == x)), name
        from_v += int(took_v.sum())
        total += x.numel()
    assert total > 20_000
    assert abs(from_v / total - cr) < 0.015


def test_cr_zero_still_takes_one_element_per_tensor(tmp_path, population):
    out, xs, _ = evolve(tmp_path, population, "de_rand1", F=F, CR=0.0, seed=5)
    for name, x in xs.items():
        assert int((out[name] != x).sum()) == 1, name


def test_row_granularity_moves_whole_rows(tmp_path, population):
    out, xs, donors = evolve(
        tmp_path, population, "de_rand1", F=F, CR=0.5, seed=9, granularity="row"
    )
    rows_v = rows = 0
    for name, x in xs.items():
        v = mutant("de_rand1", xs, donors, name)
        for row_out, row_v, row_x in zip(out[name], v, x):
            took_v = torch.equal(row_out, row_v)
            assert took_v or torch.equal(row_out, row_x), name
            rows_v += took_v
            rows += 1
    assert abs(rows_v / rows - 0.5) < 0.06


def test_tensor_granularity_moves_whole_tensors(tmp_path, population):
    out, xs, donors = evolve(
        tmp_path, population, "de_rand1", F=F, CR=0.5, seed=9, granularity="tensor"
    )
    whole = [torch.equal(out[n], mutant("de_rand1", xs, donors, n)) for n in xs]
    for name, took_v in zip(xs, whole):
        assert took_v or torch.equal(out[name], xs[name]), name
    assert 0 < sum(whole) < len(whole)


def test_exponential_crossover_takes_one_cyclic_run(tmp_path, population):
    out, xs, donors = evolve(
        tmp_path, population, "de_rand1", F=F, CR=0.9, seed=2, crossover="exponential"
    )
    lengths = []
    for name, x in xs.items():
        took_v = (out[name] != x).reshape(-1)
        idx = torch.nonzero(took_v).reshape(-1)
        assert idx.numel() >= 1, name
        # One contiguous run, possibly wrapping: at most one gap between hits.
        gaps = int((torch.diff(idx) > 1).sum())
        wraps = bool(took_v[0] and took_v[-1])
        assert gaps <= (1 if wraps else 0), name
        if x.numel() > 100:
            lengths.append(idx.numel())
    mean = sum(lengths) / len(lengths)
    assert 5 < mean < 20  # geometric run, mean 1/(1-CR) = 10


def test_dare_sparsified_difference(tmp_path, population):
    out, xs, donors = evolve(
        tmp_path, population, "de_rand1", F=F, CR=1.0, seed=4, sparsify="dare", density=0.25
    )
    kept = total = 0
    for name, x in xs.items():
        d = donors[1][name] - donors[2][name]
        keep = keep_mask(x.shape, 0.25, seed=4, name=name, term=0)
        expected = donors[0][name] + F * torch.where(keep, d / 0.25, torch.zeros(()))
        assert torch.equal(out[name], expected), name
        kept += int(keep.sum())
        total += keep.numel()
    assert abs(kept / total - 0.25) < 0.015


def test_magnitude_trimmed_differences(tmp_path, population):
    out, xs, donors = evolve(
        tmp_path,
        population,
        "de_current_to_best1",
        F=F,
        CR=1.0,
        seed=4,
        sparsify="magnitude",
        density=0.3,
    )
    for name, x in xs.items():
        best, r1, r2 = (d[name] for d in donors)
        expected = x + F * magnitude(best - x, 0.3) + F * magnitude(r1 - r2, 0.3)
        assert torch.equal(out[name], expected), name


def test_bf16_models_use_float32_math_and_configured_out_dtype(tmp_path):
    models = [make_model(tmp_path / f"b{i}", seed=i, dtype=torch.bfloat16) for i in range(4)]
    config = write_config(
        tmp_path / "c.yml",
        "de_rand1",
        models[0],
        models[1:],
        F=F,
        CR=1.0,
        seed=1,
        dtype="bfloat16",
        out_dtype="bfloat16",
    )
    assert run_yaml(config, tmp_path / "out").exit_code == 0
    out = load_tensors(tmp_path / "out")
    d = [load_tensors(m) for m in models[1:]]
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16
        r1, r2, r3 = (m[name].float() for m in d)
        assert torch.equal(tensor, (r1 + F * (r2 - r3)).to(torch.bfloat16)), name


def test_same_config_is_bit_identical_across_thread_counts(tmp_path, population):
    # Separate processes: torch fixes its interop thread count once per process.
    x, donors = population[0], population[1:4]
    config = write_config(tmp_path / "c.yml", "de_rand1", x, donors, F=F, CR=0.5, seed=21)
    # Both at once: each spends most of its time importing torch and mergekit.
    procs = {}
    for threads in (1, 2):
        out_dir = tmp_path / f"out{threads}"
        procs[out_dir] = subprocess.Popen(
            [CLI, "yaml", str(config), str(out_dir), "--no-copy-tokenizer", "--quiet",
             "--num-threads", str(threads)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    outputs = []
    for out_dir, proc in procs.items():
        _, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        outputs.append((out_dir / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]


def test_mask_depends_only_on_its_key():
    a = crossover_mask((64, 32), 0.5, seed=1, name="w")
    assert torch.equal(a, crossover_mask((64, 32), 0.5, seed=1, name="w"))
    for other in (
        crossover_mask((64, 32), 0.5, seed=2, name="w"),
        crossover_mask((64, 32), 0.5, seed=1, name="v"),
        crossover_mask((32, 64), 0.5, seed=1, name="w").reshape(64, 32),
    ):
        assert not torch.equal(a, other)
    # CR only moves the threshold: masks are nested as CR grows.
    low = crossover_mask((64, 32), 0.2, seed=1, name="w")
    assert torch.all(a | ~low)


def evolve_tv(tmp_path, population, method, **params):
    n_donors = FORMULAS[method][0]
    x, donors, ref = population[0], population[1 : 1 + n_donors], population[4]
    config = write_config(
        tmp_path / "c.yml", method, x, donors, references=(ref,), space="task_vectors", **params
    )
    result = run_yaml(config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    return (load_tensors(tmp_path / "out"), load_tensors(x), [load_tensors(d) for d in donors],
            load_tensors(ref))


@pytest.mark.parametrize("method", sorted(FORMULAS))
def test_task_vector_space_is_the_formula_on_task_vectors(tmp_path, population, method):
    out, xs, donors, ref = evolve_tv(tmp_path, population, method, F=F, CR=1.0, seed=2)
    for name, x in xs.items():
        theta0 = ref[name]
        tau = FORMULAS[method][1](x - theta0, [d[name] - theta0 for d in donors])
        assert torch.equal(out[name], tau + theta0), name
        # Differences cancel the base: the same arithmetic as weight space, up to rounding.
        assert torch.allclose(out[name], mutant(method, xs, donors, name), atol=1e-5)


def test_task_vector_space_sparsifies_each_task_vector(tmp_path, population):
    out, xs, donors, ref = evolve_tv(
        tmp_path, population, "de_rand1", F=F, CR=0.5, seed=8, sparsify="dare", density=0.4
    )
    for name, x in xs.items():
        theta0 = ref[name]

        def dare(t, term):
            keep = keep_mask(t.shape, 0.4, seed=8, name=name, term=term)
            return torch.where(keep, (t - theta0) / 0.4, torch.zeros(()))

        r1, r2, r3 = (dare(d[name], k + 1) for k, d in enumerate(donors))
        v = r1 + F * (r2 - r3) + theta0
        mask = crossover_mask(x.shape, 0.5, seed=8, name=name)
        assert torch.equal(out[name], torch.where(mask, v, x)), name
