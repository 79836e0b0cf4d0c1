"""Triton gather-append vs the PyTorch reference: bit-exact rows, untouched neighbours."""
import pytest
import torch

from emloc_kernels.compaction import gather_append, gather_append_reference

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
SENTINEL = 3.25  # rows already in use
POISON = float("nan")  # rows not yet in use


def bits(t):
    return t.view(BITS[t.dtype])


def make_buffer(heads, capacity, head_dim, length, dtype):
    buffer = torch.full((heads, capacity, head_dim), POISON, dtype=dtype)
    buffer[:, :length] = SENTINEL
    return buffer


def run_both(dst_k, dst_v, length, src_k, src_v, index):
    """Run the reference on copies and Triton in place; compare every bit of both buffers."""
    ref_k, ref_v = dst_k.clone(), dst_v.clone()
    before_k, before_v = dst_k.clone(), dst_v.clone()
    want = gather_append_reference(ref_k, ref_v, length, src_k, src_v, index)
    got = gather_append(dst_k, dst_v, length, src_k, src_v, index, backend="triton")
    k = index.shape[1]
    assert got == want == length + k
    for have, ref, before in ((dst_k, ref_k, before_k), (dst_v, ref_v, before_v)):
        assert torch.equal(bits(have), bits(ref))
        assert torch.equal(bits(have[:, :length]), bits(before[:, :length]))  # in use: kept
        assert torch.equal(bits(have[:, length + k:]), bits(before[:, length + k:]))  # poison
        assert not bool(have[:, length:length + k].isnan().any())  # new rows all written


def random_index(heads, length, k, generator, repeats=False):
    if repeats:
        return torch.randint(0, length, (heads, k), generator=generator)
    return torch.stack([torch.randperm(length, generator=generator)[:k] for _ in range(heads)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,chunk,head_dim,capacity,length,k", [
    (1, 1, 8, 1, 0, 1),  # one row, empty memory, full buffer afterwards
    (1, 7, 5, 12, 0, 1),
    (4, 37, 24, 64, 10, 20),
    (2, 19, 300, 40, 3, 19),  # head_dim above one column block; k = Lc
    (3, 50, 128, 100, 45, 17),
])
def test_matches_reference(dtype, heads, chunk, head_dim, capacity, length, k):
    generator = torch.Generator().manual_seed(heads * 100 + chunk + k)
    src_k = torch.randn(heads, chunk, head_dim, generator=generator).to(dtype)
    src_v = torch.randn(heads, chunk, head_dim, generator=generator).to(dtype)
    dst_k = make_buffer(heads, capacity, head_dim, length, dtype)
    dst_v = make_buffer(heads, capacity, head_dim, length, dtype)
    run_both(dst_k, dst_v, length, src_k, src_v, random_index(heads, chunk, k, generator))


def test_repeated_indices_and_strided_tensors():
    generator = torch.Generator().manual_seed(7)
    heads, chunk, head_dim, length, k = 4, 23, 40, 6, 18
    # src stored [Lc, Hkv, D] (strided view); dst a slice of a bigger, token-major buffer
    src_k = torch.randn(chunk, heads, head_dim, generator=generator).transpose(0, 1)
    src_v = torch.randn(heads, chunk, 2 * head_dim, generator=generator)[:, :, ::2]
    big_k = make_buffer(heads, 50, head_dim, length, torch.float32).transpose(0, 1).contiguous()
    big_v = make_buffer(heads, 50, head_dim, length, torch.float32)
    dst_k, dst_v = big_k.transpose(0, 1)[:, :30], big_v[:, :30]
    index = random_index(heads, chunk, k, generator, repeats=True).T.contiguous().T
    run_both(dst_k, dst_v, length, src_k, src_v, index)
    assert bool(big_v[:, 30:].isnan().all())  # beyond the view: untouched


def test_empty_selection_is_a_no_op():
    dst_k = make_buffer(2, 8, 4, 3, torch.float32)
    dst_v = make_buffer(2, 8, 4, 3, torch.float32)
    src = torch.randn(2, 5, 4)
    run_both(dst_k, dst_v, 3, src, src, torch.zeros(2, 0, dtype=torch.int64))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", [
    "index_int32", "index_1d", "index_heads", "index_negative", "index_too_big", "capacity",
    "length_negative", "dtype_mismatch", "head_dim_mismatch", "heads_mismatch", "kv_shapes",
])
def test_invalid_input_raises(backend, case):
    heads, chunk, head_dim, capacity, length = 2, 6, 4, 10, 5
    dst_k = torch.zeros(heads, capacity, head_dim)
    dst_v = torch.zeros(heads, capacity, head_dim)
    src_k = torch.randn(heads, chunk, head_dim)
    src_v = torch.randn(heads, chunk, head_dim)
    index = torch.tensor([[0, 5, 2], [1, 1, 3]])
    if case == "index_int32":
        index = index.int()
    elif case == "index_1d":
        index = index[0]
    elif case == "index_heads":
        index = index[:1]
    elif case == "index_negative":
        index[1, 2] = -1
    elif case == "index_too_big":
        index[0, 0] = chunk
    elif case == "capacity":
        length = 8
    elif case == "length_negative":
        length = -1
    elif case == "dtype_mismatch":
        src_v = src_v.half()
    elif case == "head_dim_mismatch":
        src_k, src_v = src_k[..., :3], src_v[..., :3]
    elif case == "heads_mismatch":
        src_k, src_v = src_k[:1], src_v[:1]
    elif case == "kv_shapes":
        dst_v = dst_v[:, :9]
    with pytest.raises(ValueError):
        gather_append(dst_k, dst_v, length, src_k, src_v, index, backend=backend)
