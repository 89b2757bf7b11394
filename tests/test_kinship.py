"""Model kinship: exact global metrics, streamed, checked against a direct float64 computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mergekit_evolver.cli import kinship_command
from mergekit_evolver.kinship.metrics import (
    compute_kinship,
    mean_kinship,
    pairwise_kinship,
)
from tiny_models import load_tensors, make_model

REL = 1e-6
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def write_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


def direct(base: dict, a: dict, b: dict) -> dict[str, float]:
    """The definition, done the memory-hungry way: concatenate every delta in
    float64 (tensors all three have, rows all three have) and compute."""
    names = sorted(set(base) & set(a) & set(b))
    xs, ys = [], []
    for name in names:
        rows = min(base[name].shape[0], a[name].shape[0], b[name].shape[0])
        ref = base[name][:rows].double()
        xs.append((a[name][:rows].double() - ref).reshape(-1).numpy())
        ys.append((b[name][:rows].double() - ref).reshape(-1).numpy())
    x, y = np.concatenate(xs), np.concatenate(ys)
    return {
        "pcc": float(np.corrcoef(x, y)[0, 1]),
        "cos": float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))),
        "ed": float(np.linalg.norm(x - y)),
    }


def assert_close(got: dict, want: dict, metrics=("pcc", "cos", "ed")) -> None:
    for m in metrics:
        assert abs(got[m] - want[m]) <= REL * abs(want[m]), (m, got[m], want[m])


def pair(result_pairs, a, b) -> dict:
    (found,) = [p for p in result_pairs if {p["a"], p["b"]} == {str(a), str(b)}]
    return found


def invoke(*args: str):
    return CliRunner().invoke(kinship_command, [str(a) for a in args])


@pytest.fixture
def fp32(population) -> list[Path]:
    """base, then three models: fp32 tiny Llamas, read only."""
    return population[:4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_pair_matches_direct_float64_computation(tmp_path, fp32, dtype):
    if dtype == torch.float32:
        base, *models = fp32
    else:
        base, *models = [make_model(tmp_path / f"b{i}", seed=300 + i, dtype=dtype) for i in range(4)]
    tensors = {p: load_tensors(p) for p in [base, *models]}
    assert all(t.dtype == dtype for t in tensors[base].values())

    pairs = pairwise_kinship(models, base)
    assert len(pairs) == 3
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        want = direct(tensors[base], tensors[models[a]], tensors[models[b]])
        assert_close(pair(pairs, models[a], models[b]), want)

    means = mean_kinship(models, base)
    for m in ("pcc", "cos", "ed"):
        assert means[m] == pytest.approx(sum(p[m] for p in pairs) / 3, rel=1e-12)


def test_chunk_boundaries_do_not_change_the_result(fp32):
    base, *models = fp32
    whole = compute_kinship(models, base).pairs
    # 97 elements: chunks end mid-row and straddle nothing in particular.
    chunked = compute_kinship(models, base, chunk_elements=97).pairs
    for p, q in zip(whole, chunked):
        assert_close(q, p)


def test_global_metric_is_not_the_per_tensor_average(tmp_path, fp32):
    """Large tensors move together, small ones independently: the global PCC
    is dominated by the large tensors, the "split" average is not."""
    base = load_tensors(fp32[0])
    gen = torch.Generator().manual_seed(7)
    a, b = {}, {}
    for name, t in base.items():
        shared = torch.randn(t.shape, generator=gen)
        own = torch.randn(t.shape, generator=gen)
        a[name] = t + shared
        b[name] = t + (shared if t.numel() >= 2048 else own)
    pa, pb = write_model(tmp_path / "a", a), write_model(tmp_path / "b", b)

    got = compute_kinship([pa, pb], fp32[0]).pairs[0]
    want = direct(base, a, b)
    split = {
        m: float(np.mean([direct({n: base[n]}, {n: a[n]}, {n: b[n]})[m] for n in base]))
        for m in ("pcc", "cos")
    }
    assert_close(got, want)
    for m in ("pcc", "cos"):
        assert abs(want[m] - split[m]) > 0.1, (m, want[m], split[m])
        assert abs(got[m] - split[m]) > 0.1


def test_sharded_model_reads_like_a_single_file(tmp_path, fp32):
    base, m1, m2, _ = fp32
    tensors = load_tensors(m2)
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    weight_map = {}
    for k, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard))
        weight_map.update({n: shard for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    single = compute_kinship([m1, m2], base).pairs[0]
    split = compute_kinship([m1, sharded], base).pairs[0]
    assert_close(split, single)


def test_vocab_mismatch_compares_shared_rows_and_warns_once_per_tensor(tmp_path, fp32):
    base, m1, m2, _ = fp32
    big = load_tensors(m2)
    gen = torch.Generator().manual_seed(3)
    for name in (EMBED, HEAD):
        big[name] = torch.cat([big[name], torch.randn(6, big[name].shape[1], generator=gen)])
    wide = write_model(tmp_path / "wide", big)
    assert big[EMBED].shape[0] == load_tensors(base)[EMBED].shape[0] + 6

    result = invoke(m1, wide, "--base", base, "--json")
    assert result.exit_code == 0, result.output
    (got,) = json.loads(result.stdout)
    want = direct(load_tensors(base), load_tensors(m1), big)
    assert_close(got, want)
    # The extra rows really are left out, not compared against anything.
    assert_close(got, direct(load_tensors(base), load_tensors(m1), load_tensors(m2)))

    warnings = result.stderr.splitlines()
    for name in (EMBED, HEAD):
        mentions = [w for w in warnings if name in w]
        assert len(mentions) == 1, warnings
        assert f"{base} 64" in mentions[0] and f"{m1} 64" in mentions[0] and f"{wide} 70" in mentions[0]
    assert all(w.startswith("warning:") for w in warnings)


def test_each_pair_uses_the_rows_it_shares_when_vocab_sizes_differ_both_ways(tmp_path, fp32):
    """Base 64 rows, models with 64, 70 and 60: pairs with the short model
    compare 60 rows, the others 64, in one pass (chunks cut across rows)."""
    base, m1, m2, m3 = fp32
    wide, narrow = load_tensors(m2), load_tensors(m3)
    for name in (EMBED, HEAD):
        wide[name] = torch.cat([wide[name], torch.randn(6, wide[name].shape[1])])
        narrow[name] = narrow[name][:60]
    wide_dir, narrow_dir = write_model(tmp_path / "wide", wide), write_model(tmp_path / "narrow", narrow)

    result = compute_kinship([m1, wide_dir, narrow_dir], base, chunk_elements=97)
    t0, t1 = load_tensors(base), load_tensors(m1)
    assert_close(pair(result.pairs, m1, wide_dir), direct(t0, t1, wide))
    assert_close(pair(result.pairs, m1, narrow_dir), direct(t0, t1, narrow))
    assert_close(pair(result.pairs, wide_dir, narrow_dir), direct(t0, wide, narrow))
    assert set(result.row_mismatch) == {EMBED, HEAD}
    assert result.row_mismatch[EMBED] == {str(base): 64, str(m1): 64, str(wide_dir): 70, str(narrow_dir): 60}


def test_missing_tensor_is_skipped_for_pairs_that_lack_it_and_reported(tmp_path, fp32):
    base_dir, m1, m2, m3 = fp32
    gone = "model.layers.1.mlp.up_proj.weight"
    only_models = "model.layers.0.self_attn.q_proj.weight"
    lacking = load_tensors(m3)
    del lacking[gone]
    short = write_model(tmp_path / "short", lacking)
    base = load_tensors(base_dir)
    del base[only_models]
    thin_base = write_model(tmp_path / "thin_base", base)

    result = invoke(m1, m2, short, "--base", thin_base, "--json")
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.stdout)
    t1, t2 = load_tensors(m1), load_tensors(m2)
    assert_close(pair(pairs, m1, short), direct(base, t1, lacking))
    assert_close(pair(pairs, m2, short), direct(base, t2, lacking))
    # A pair whose members both have it still uses it: its kinship does not
    # depend on which other models are listed.
    assert_close(pair(pairs, m1, m2), direct(base, t1, t2))
    assert_close(pair(pairs, m1, m2), compute_kinship([m1, m2], thin_base).pairs[0])
    with_gone = direct(base, t1, t2)
    without = direct(base, {k: v for k, v in t1.items() if k != gone}, t2)
    assert abs(with_gone["ed"] - without["ed"]) > 1e-3  # the test can tell

    (report,) = [w for w in result.stderr.splitlines() if "not in every model" in w]
    assert f"{gone} (missing from {short})" in report
    assert f"{only_models} (missing from {thin_base})" in report


@pytest.mark.parametrize("metrics", ["pcc", "ed,cos", "cos,pcc,ed", " ED , pcc,ed"])
def test_json_holds_exactly_the_requested_metrics(fp32, metrics):
    base, *models = fp32
    result = invoke(*models, "--base", base, "--metrics", metrics, "--json")
    assert result.exit_code == 0, result.output
    pairs = json.loads(result.stdout)
    asked = {m.strip().lower() for m in metrics.split(",")}
    assert [(p["a"], p["b"]) for p in pairs] == [
        (str(models[0]), str(models[1])), (str(models[0]), str(models[2])), (str(models[1]), str(models[2]))
    ]
    for p in pairs:
        assert set(p) == {"a", "b"} | asked
        assert all(isinstance(p[m], float) for m in asked)


def test_pairs_are_symmetric(fp32):
    base, m1, m2, _ = fp32
    ab = compute_kinship([m1, m2], base).pairs[0]
    ba = compute_kinship([m2, m1], base).pairs[0]
    assert (ab["a"], ab["b"]) == (ba["b"], ba["a"])
    for m in ("pcc", "cos", "ed"):
        assert ab[m] == pytest.approx(ba[m], rel=1e-12)


def test_near_twins_keep_their_small_distance(tmp_path, fp32):
    """Late in a merge search models are near twins: their distance must not
    drown in the rounding of |a|^2 + |b|^2 - 2ab."""
    base, m1, *_ = fp32
    t1 = load_tensors(m1)
    near = {k: v.clone() for k, v in t1.items()}
    near[EMBED][3, 5] += 1e-5
    twin = write_model(tmp_path / "near", near)
    (p,) = compute_kinship([m1, twin], base).pairs
    want = direct(load_tensors(base), t1, near)
    assert want["ed"] < 2e-5
    assert_close(p, want)


def test_identical_models_are_fully_kin(tmp_path, fp32):
    base, m1, *_ = fp32
    twin = write_model(tmp_path / "twin", load_tensors(m1))
    (p,) = compute_kinship([m1, twin], base).pairs
    assert p["pcc"] == pytest.approx(1.0, abs=1e-12)
    assert p["cos"] == pytest.approx(1.0, abs=1e-12)
    assert p["ed"] == 0.0


def test_model_equal_to_base_has_no_correlation_and_prints_null(fp32):
    base, m1, *_ = fp32
    result = invoke(m1, base, "--base", base, "--json")
    assert result.exit_code == 0, result.output
    (p,) = json.loads(result.stdout)
    assert p["pcc"] is None and p["cos"] is None
    assert p["ed"] == pytest.approx(math.sqrt(sum(
        ((t.double() - load_tensors(base)[n].double()) ** 2).sum().item() for n, t in load_tensors(m1).items()
    )), rel=REL)


def test_text_output_is_a_matrix_per_metric(fp32):
    base, *models = fp32
    result = invoke(*models, "--base", base, "--metrics", "cos,ed")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "cos: cosine similarity" in out and "ed: Euclidean distance" in out and "pcc" not in out
    pairs = compute_kinship(models, base, "cos").pairs
    first_row = next(line for line in out.splitlines() if line.startswith("[1] ") and "-" in line)
    assert first_row.split()[1:] == ["-", f"{pairs[0]['cos']:.6g}", f"{pairs[1]['cos']:.6g}"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["{m1}", "{tmp}/nope", "--base", "{base}"], "nope: no such model directory"),
        (["{m1}", "{m2}", "--base", "{tmp}/nobase"], "nobase: no such model directory"),
        (["{m1}", "--base", "{base}"], "kinship needs at least 2 models; got 1"),
        (["{m1}", "{m2}"], "--base is required"),
        (["{m1}", "{m2}", "--base", "{base}", "--metrics", "pcc,kl"], "unknown metric 'kl'; choose from pcc, cos, ed"),
        (["{m1}", "{m2}", "--base", "{base}", "--metrics", ","], "no metric given"),
        (["{m1}", "{tmp}/empty", "--base", "{base}"], "empty: no safetensors weights found"),
        (["{m1}", "{tmp}/other", "--base", "{base}"], "kinship needs one architecture"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, fp32, args, message):
    base, m1, m2, _ = fp32
    (tmp_path / "empty").mkdir()
    other = load_tensors(m2)
    other[EMBED] = torch.zeros(64, 48)
    write_model(tmp_path / "other", other)
    args = [a.format(m1=m1, m2=m2, base=base, tmp=tmp_path) for a in args]

    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.stdout == ""
