import hashlib

import pytest
import torch

from mergekit_evolver.merging.fingerprint import content_hash, first_non_finite


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "b.weight": torch.randn(1000, generator=g),  # 4000 bytes: 4 chunks of 1024, the last short
        "a.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c.empty": torch.empty(0),
    }


def test_content_hash_is_sha256_over_headers_and_chunk_digests():
    state = _state()
    expected = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        expected.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for at in range(0, len(raw), 1024):
            expected.update(hashlib.sha256(raw[at : at + 1024]).digest())
    assert content_hash(state, chunk_bytes=1024) == expected.hexdigest()


def test_content_hash_same_on_the_thread_pool_and_off_it():
    state = _state()
    serial = content_hash(state, chunk_bytes=1024, parallel_bytes=1 << 40)
    assert content_hash(state, chunk_bytes=1024, parallel_bytes=0) == serial
    # The last byte of the last, short chunk counts.
    tail = dict(state)
    tail["b.weight"] = state["b.weight"].clone()
    tail["b.weight"][-1] += 1.0
    assert content_hash(tail, chunk_bytes=1024, parallel_bytes=0) != serial


def test_content_hash_sees_dtype_and_shape_of_equal_bytes():
    zeros = torch.zeros(4)
    digest = content_hash({"w": zeros})
    assert content_hash({"w": torch.zeros(4, dtype=torch.int32)}) != digest
    assert content_hash({"w": zeros.reshape(2, 2)}) != digest
    assert content_hash({"w": zeros.clone()}) == digest


def test_content_hash_of_a_non_contiguous_tensor_is_that_of_its_values():
    t = torch.arange(12.0).reshape(3, 4)
    assert content_hash({"w": t.t()}) == content_hash({"w": t.t().contiguous()})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("where", [0, 7, -1])
def test_first_non_finite_finds_nan_and_infinities(bad, dtype, where):
    state = {"fine": torch.randn(4, 4).to(dtype), "bad": torch.randn(16).to(dtype), "later": torch.randn(2)}
    state["bad"][where] = bad
    assert first_non_finite(state) == "bad"


def test_first_non_finite_passes_finite_integer_and_empty_tensors():
    state = {
        "w": torch.randn(8, 8),
        "big": torch.full((3,), torch.finfo(torch.float32).max),
        "ids": torch.arange(5),
        "mask": torch.ones(3, dtype=torch.bool),
        "empty": torch.empty(0),
    }
    assert first_non_finite(state) is None
    state["later"] = torch.tensor([0.0, float("nan")])
    state["first"] = torch.tensor([float("inf")])
    assert first_non_finite(state) == "later"  # the first in the state's order
