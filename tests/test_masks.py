"""Keyed masks: splitmix64 in torch integer ops, and masks that depend only on
(seed, key, index): not on device, thread count, block size or tensor order."""

from __future__ import annotations

import threading

import pytest
import torch

import mergekit_evolver.methods.de as de
from mergekit_evolver.methods import masks
from mergekit_evolver.methods.masks import Draws, crossover_mask, keep_mask, mix64

# splitmix64 seeded with 1234567: its first outputs, as published with the generator.
SPLITMIX64_1234567 = [
    6457827717110365317,
    3203168211198807973,
    9817491932198370423,
    4593380528125082431,
    16408922859458223821,
]


def reference_lanes(k: int, lo: int, hi: int) -> list[int]:
    """Draw i of key k in Python integers: lane i % 4 of word i // 4, as int16."""
    out = []
    for i in range(lo, hi):
        lane = (mix64(k + (i // 4 + 1) * masks._GOLDEN) >> (16 * (i % 4))) & 0xFFFF
        out.append(lane - (1 << 16) if lane >> 15 else lane)
    return out


def test_mix64_is_splitmix64():
    got = [mix64(1234567 + (i + 1) * masks._GOLDEN) for i in range(5)]
    assert got == SPLITMIX64_1234567


@pytest.mark.parametrize("k", [0, 1234567, (1 << 63) - 1, 1 << 63, (1 << 64) - 1])
def test_torch_draws_equal_the_python_reference(k):
    # Odd offsets and lengths: a block need not start on a word, nor fill the SIMD width.
    for lo, hi in [(0, 1), (0, 37), (3, 1003), (123_457, 123_457 + 4099)]:
        assert Draws().lanes(k, lo, hi).tolist() == reference_lanes(k, lo, hi), (lo, hi)


def test_a_block_of_draws_is_the_slice_of_the_whole_range():
    whole = Draws().lanes(99, 0, 10_000).clone()
    draws = Draws(block=16)  # grown on demand, reused across blocks
    for lo, hi in [(0, 5), (5, 9), (9, 4000), (4000, 4001), (4001, 10_000)]:
        assert torch.equal(draws.lanes(99, lo, hi), whole[lo:hi])


def test_pinned_mask_bits():
    # Guards bit-identity across versions: a change here changes every DE run.
    mask = crossover_mask((16,), 0.5, seed=0, name="w")
    assert mask.int().tolist() == PINNED_CROSSOVER
    keep = keep_mask((16,), 0.25, seed=0, name="w", term=1)
    assert keep.int().tolist() == PINNED_KEEP


PINNED_CROSSOVER = [1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1]
PINNED_KEEP = [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 0]


def test_masks_nest_in_cr_and_density():
    for granularity, shape in (("element", (300, 70)), ("row", (300, 70))):
        kw = dict(seed=4, name="w", granularity=granularity)
        masks_by_cr = [crossover_mask(shape, cr, **kw) for cr in (0.0, 0.1, 0.5, 0.9, 1.0)]
        for low, high in zip(masks_by_cr, masks_by_cr[1:]):
            assert torch.all(high | ~low), granularity
        assert torch.all(masks_by_cr[-1])
    keeps = [keep_mask((300, 70), d, seed=4, name="w", term=0) for d in (0.1, 0.3, 0.7)]
    for low, high in zip(keeps, keeps[1:]):
        assert torch.all(high | ~low)


@pytest.mark.parametrize("cr", [0.05, 0.5, 0.95])
def test_share_taken_is_cr(cr):
    mask = crossover_mask((512, 512), cr, seed=7, name="w")
    assert abs(mask.float().mean().item() - cr) < 0.005
    keep = keep_mask((512, 512), cr, seed=7, name="w", term=2)
    assert abs(keep.float().mean().item() - cr) < 0.005


@pytest.mark.parametrize("granularity", ["element", "row"])
def test_j_rand_is_the_only_unit_at_cr_zero(granularity):
    seen = set()
    for seed in range(20):
        mask = crossover_mask((50, 3), 0.0, seed=seed, name="w", granularity=granularity)
        units = mask.reshape(-1) if granularity == "element" else mask.reshape(50)
        assert int(units.sum()) == 1
        seen.add(int(torch.nonzero(units)[0]))
    assert len(seen) > 10  # j_rand moves with the key


def test_exponential_run_is_one_cyclic_run_of_geometric_length():
    lengths = []
    for seed in range(200):
        units = crossover_mask((64,), 0.8, seed=seed, name="w", kind="exponential").int()
        # One run, possibly wrapping: at most two edges around the cycle.
        assert int((units != units.roll(1)).sum()) <= 2
        lengths.append(int(units.sum()))
    assert 4 < sum(lengths) / len(lengths) < 6  # 1/(1 - CR) = 5, capped at 64
    assert crossover_mask((64,), 1.0, seed=0, name="w", kind="exponential").all()


def test_mask_does_not_depend_on_thread_count_or_tensor_order():
    names = [f"layers.{i}.weight" for i in range(6)]

    def draw(order, threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return {
                n: (
                    crossover_mask((257, 1031), 0.3, seed=5, name=n),
                    keep_mask((257, 1031), 0.6, seed=5, name=n, term=0),
                )
                for n in order
            }
        finally:
            torch.set_num_threads(before)

    one = draw(names, 1)
    two = draw(list(reversed(names)), 2)
    for n in names:
        assert torch.equal(one[n][0], two[n][0]) and torch.equal(one[n][1], two[n][1]), n
    assert not torch.equal(one[names[0]][0], one[names[1]][0])


def tensors(seed, shape=(333, 97), dtype=torch.float32, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(n)]


CASES = [
    dict(kind="binomial", granularity="element"),
    dict(kind="binomial", granularity="row"),
    dict(kind="binomial", granularity="tensor"),
    dict(kind="exponential", granularity="element", CR=0.999),
    dict(kind="exponential", granularity="row", CR=0.9),
    dict(sparsify="dare", density=0.3),
    dict(sparsify="magnitude", density=0.3),
]


def expected(operator, x, donors, *, F, CR, seed, name, kind="binomial",
             granularity="element", sparsify="none", density=1.0):
    """The offspring written with bool masks and torch.where, as the formulas read."""
    x, donors = x.float(), [d.float() for d in donors]

    def s(diff, term):
        if sparsify == "dare":
            keep = keep_mask(diff.shape, density, seed=seed, name=name, term=term)
            return torch.where(keep, diff / density, torch.zeros(()))
        if sparsify == "magnitude":
            return de.magnitude(diff, density)
        return diff

    r1, r2, r3 = donors
    v = r1 + F * s(r2 - r3, 0)
    mask = crossover_mask(x.shape, CR, seed=seed, name=name, kind=kind, granularity=granularity)
    return torch.where(mask, v, x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_offspring_is_the_masked_formula_whatever_the_block_size(monkeypatch, case):
    x, *donors = tensors(1, n=4)
    params = dict(F=0.7, CR=0.4, seed=3, name="blk.weight") | case
    want = expected("de_rand1", x, donors, **params)
    # Blocks of 1000 elements: not a multiple of four draws, nor of a row (97).
    for block in (1 << 20, 1000, 97, 5):
        monkeypatch.setattr(de, "BLOCK_ELEMENTS", block)
        got = de.offspring("de_rand1", x, donors, **params)
        assert torch.equal(got, want), block


def test_offspring_in_task_vector_space_is_blockwise_exact(monkeypatch):
    x, r1, r2, r3, theta0 = tensors(2, dtype=torch.bfloat16)
    params = dict(F=0.6, CR=0.5, seed=8, name="tv.weight", sparsify="dare", density=0.4)
    monkeypatch.setattr(de, "BLOCK_ELEMENTS", 1 << 20)
    whole = de.offspring("de_rand1", x, [r1, r2, r3], reference=theta0, **params)
    monkeypatch.setattr(de, "BLOCK_ELEMENTS", 1001)
    blocks = de.offspring("de_rand1", x, [r1, r2, r3], reference=theta0, **params)
    assert torch.equal(whole, blocks)
    # And the same arithmetic as the formula on sparsified task vectors.
    t0 = theta0.float()

    def dare(t, term):
        keep = keep_mask(t.shape, 0.4, seed=8, name="tv.weight", term=term)
        return torch.where(keep, (t.float() - t0) / 0.4, torch.zeros(()))

    v = dare(r1, 1) + 0.6 * (dare(r2, 2) - dare(r3, 3)) + t0
    mask = crossover_mask(x.shape, 0.5, seed=8, name="tv.weight")
    assert torch.equal(whole, torch.where(mask, v, x.float()))


def test_offspring_takes_non_contiguous_inputs():
    x, *donors = tensors(3, shape=(97, 333), n=4)
    params = dict(F=0.5, CR=0.5, seed=1, name="t")
    got = de.offspring("de_rand1", x.T, [d.T for d in donors], **params)
    want = de.offspring(
        "de_rand1", x.T.contiguous(), [d.T.contiguous() for d in donors], **params
    )
    assert torch.equal(got, want)


def test_offspring_does_not_depend_on_thread_count(monkeypatch):
    x, *donors = tensors(4, shape=(1024, 1031), n=4)
    params = dict(F=0.5, CR=0.5, seed=1, name="t", sparsify="dare", density=0.5)
    monkeypatch.setattr(de, "BLOCK_ELEMENTS", 1 << 17)  # eight blocks: workers share them
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = de.offspring("de_rand1", x, donors, **params)
        torch.set_num_threads(2)
        two = de.offspring("de_rand1", x, donors, **params)
        # Block workers run single-threaded; the caller's count, and the one a
        # new thread starts with, are left as they were.
        assert torch.get_num_threads() == 2
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2]
        # The block workers themselves stay single-threaded, even after a parallel op.
        worker_threads = de._block_pool(2).submit(
            lambda: (torch.randn(1 << 20).add_(1), torch.get_num_threads())[1]
        )
        assert worker_threads.result() == 1
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_empty_tensor():
    for shape in ((0, 4), (4, 0)):
        x, *donors = (torch.zeros(shape) for _ in range(4))
        for extra in ({}, {"sparsify": "magnitude", "density": 0.5}, {"granularity": "row"}):
            out = de.offspring("de_rand1", x, donors, F=0.5, CR=0.5, seed=1, name="e", **extra)
            assert out.shape == shape, extra
        for granularity in ("element", "row"):
            u = de.crossover(x, out, 0.5, seed=1, name="e", granularity=granularity)
            assert u.shape == shape


def test_crossover_helper_is_where_over_the_keyed_mask():
    x, v = tensors(6, n=2)
    for kw in (dict(), dict(granularity="row"), dict(kind="exponential")):
        mask = crossover_mask(x.shape, 0.3, seed=2, name="h", **kw)
        want = torch.where(mask, v, x)
        got = de.crossover(x, v.clone(), 0.3, seed=2, name="h", **kw)
        assert torch.equal(got, want), kw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_bits_on_cuda_as_on_cpu():
    for kw in (dict(), dict(granularity="row"), dict(kind="exponential")):
        cpu = crossover_mask((513, 1031), 0.3, seed=9, name="w", **kw)
        gpu = crossover_mask((513, 1031), 0.3, seed=9, name="w", device="cuda", **kw)
        assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu()), kw
    cpu = keep_mask((513, 1031), 0.3, seed=9, name="w", term=1)
    gpu = keep_mask((513, 1031), 0.3, seed=9, name="w", term=1, device="cuda")
    assert torch.equal(cpu, gpu.cpu())
    x, *donors = tensors(5, shape=(513, 1031), n=4)
    for case in CASES:
        params = dict(F=0.7, CR=0.4, seed=3, name="w") | case
        on_cpu = de.offspring("de_rand1", x, donors, **params)
        on_gpu = de.offspring("de_rand1", x.cuda(), [d.cuda() for d in donors], **params)
        assert torch.equal(on_cpu, on_gpu.cpu()), case


def test_block_workers_survive_a_fork():
    # The pool's threads do not exist in a forked child; it must make its own.
    import multiprocessing

    x, *donors = tensors(7, shape=(1024, 300), n=4)
    params = dict(F=0.5, CR=0.5, seed=1, name="f")
    want = de.offspring("de_rand1", x, donors, **params)  # the parent's pool exists now
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    # The child inherits the tensors and sends back a verdict: a tensor sent
    # through the queue would need the child alive until the parent took it.
    child = ctx.Process(target=_offspring_equals, args=(results, x, donors, params, want))
    child.start()
    try:
        same = results.get(timeout=120)
    finally:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
    assert same is True


def _offspring_equals(results, x, donors, params, want):
    got = de.offspring("de_rand1", x, donors, **params)
    # The comparison runs on this thread: libgomp's team, inherited from the
    # parent, is not usable after fork (a torch limitation, not the pool's).
    torch.set_num_threads(1)
    results.put(torch.equal(got, want))
