"""Triton prefix attention (run on the CPU interpreter) against the PyTorch reference.

Accuracy rule (flash-attention style): the kernel's max error against a float64 computation
must be at most twice the error of plain PyTorch attention run in the input dtype (eager
transformers style: matmuls in the dtype, softmax in fp32), plus 1e-6.
"""
import importlib

import pytest
import torch

from emloc_kernels.prefix_attention import (prefix_attention, prefix_attention_reference,
                                            prefix_attention_triton)


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so unwritten elements fail the test."""
    def nan_buffer(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    module = importlib.import_module("emloc_kernels.prefix_attention")  # the package exports
    monkeypatch.setattr(module, "_new_buffer", nan_buffer)               # a function of this name


def make_inputs(B, Hkv, G, Lq, Lk, M, D, padding, dtype, seed=0, q_gain=1.0):
    """Random inputs; padding: "none" (own_valid None), "left", "right" or "left_full"
    (left padding, and the last row entirely padding)."""
    gen = torch.Generator().manual_seed(seed)
    def rand(*shape, gain=1.0):
        return (torch.randn(*shape, generator=gen) * gain).to(dtype)
    q = rand(B, Hkv * G, Lq, D, gain=q_gain)
    mem_k, mem_v = rand(Hkv, M, D), rand(Hkv, M, D)
    own_k, own_v = rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D)
    valid = None
    if padding != "none":
        valid = torch.ones(B, Lk, dtype=torch.bool)
        for b in range(1, B):
            pad = min(Lk - 1, 2 * b + 1)
            if padding == "right":
                valid[b, Lk - pad:] = False
            else:
                valid[b, :pad] = False
        if padding == "left_full":
            valid[-1] = False
    return q, mem_k, mem_v, own_k, own_v, valid


def dense_attention(q, mem_k, mem_v, own_k, own_v, own_valid, scale, dtype):
    """What transformers does: memory expanded to the batch, repeat_kv, a dense mask; matmuls
    in `dtype`, softmax in fp32 (fp64 when dtype is fp64). Queries seeing nothing give 0."""
    B, Hq, Lq, D = q.shape
    Hkv, M = mem_k.shape[:2]
    Lk = own_k.shape[2]
    k = torch.cat([mem_k[None].expand(B, -1, -1, -1), own_k], dim=2)
    v = torch.cat([mem_v[None].expand(B, -1, -1, -1), own_v], dim=2)
    k = k.repeat_interleave(Hq // Hkv, dim=1).to(dtype)
    v = v.repeat_interleave(Hq // Hkv, dim=1).to(dtype)
    causal = torch.arange(Lk)[None, :] <= (torch.arange(Lq) + Lk - Lq)[:, None]
    own_ok = causal[None] & (own_valid[:, None, :] if own_valid is not None else True)
    mask = torch.cat([torch.ones(B, Lq, M, dtype=torch.bool), own_ok.expand(B, -1, -1)], dim=2)
    scores = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    soft_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scores = scores.to(soft_dtype).masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return p.to(dtype) @ v


def check_accuracy(out, inputs, scale):
    """Flash-attention style bound against fp64, plus: the reference agrees with fp64."""
    q, mem_k, mem_v, own_k, own_v, valid = inputs
    truth = dense_attention(*[t.double() for t in inputs[:5]], valid, scale, torch.float64)
    baseline = dense_attention(*inputs, scale, q.dtype)
    reference = prefix_attention_reference(*inputs, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    err = (out.double() - truth).abs().max().item()
    base_err = (baseline.double() - truth).abs().max().item()
    assert (reference.double() - truth).abs().max().item() <= 2 * base_err + 1e-6
    assert err <= 2 * base_err + 1e-6, f"kernel error {err:.3g} vs PyTorch {base_err:.3g}"


CASES = {  # B, Hkv, G, Lq, Lk, M, D, padding
    "prefill_g3_d48_left": (2, 2, 3, 19, 19, 37, 48, "left"),
    "prefill_g1_mem1_right": (2, 1, 1, 13, 21, 1, 64, "right"),
    "prefill_mem0_rows_see_nothing": (3, 2, 3, 9, 9, 0, 32, "left_full"),
    "prefill_d128_nomask": (1, 1, 2, 6, 40, 70, 128, "none"),
    "decode_lq1_left": (3, 2, 3, 1, 17, 45, 64, "left"),
    "decode_lq3_mem0_right": (2, 2, 1, 3, 8, 0, 48, "right"),
    "decode_lq1_lk1_mem1": (2, 1, 3, 1, 1, 1, 16, "none"),
    "decode_lq4_full_pad_row": (2, 2, 2, 4, 20, 33, 24, "left_full"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    inputs = make_inputs(*CASES[case], dtype, q_gain=3.0)
    out = prefix_attention(*inputs, backend="triton")
    check_accuracy(out, inputs, CASES[case][6] ** -0.5)


@pytest.mark.parametrize("case,form,split_keys", [
    ("prefill_g3_d48_left", "decode", 16),          # Lq > 4 through the split path
    ("prefill_d128_nomask", "decode", 32),          # two key tiles per split
    ("decode_lq1_left", "prefill", None),
    ("decode_lq4_full_pad_row", "prefill", None),
])
def test_forced_form(case, form, split_keys):
    inputs = make_inputs(*CASES[case], torch.float32, seed=1, q_gain=3.0)
    out = prefix_attention_triton(*inputs, scale=0.3, form=form, split_keys=split_keys)
    check_accuracy(out, inputs, 0.3)


@pytest.mark.parametrize("case", ["prefill_g3_d48_left", "decode_lq1_left"])
def test_bfloat16(case):
    inputs = make_inputs(*CASES[case], torch.bfloat16, seed=2)
    out = prefix_attention(*inputs, backend="triton")
    check_accuracy(out, inputs, CASES[case][6] ** -0.5)


def test_zero_rows_are_exact():
    """With an empty memory, queries that see only padding give exactly 0; the others do not."""
    inputs = make_inputs(2, 1, 2, 5, 5, 0, 16, "left", torch.float32)
    out = prefix_attention(*inputs, backend="triton")  # row 1: keys 0..2 are padding
    assert (out[1, :, :3] == 0).all()
    assert (out[1, :, 3:].abs().sum(-1) > 0).all() and (out[0].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("Lq", [1, 7])
def test_strided_views(Lq):
    """Memory read in place from a larger buffer; q and own K/V as transposed views."""
    B, Hkv, G, Lk, M, D = 2, 2, 3, 9, 21, 40
    gen = torch.Generator().manual_seed(3)
    mem_buf = torch.randn(2, Hkv, M + 11, D, generator=gen)
    mem_k, mem_v = mem_buf[0, :, :M], mem_buf[1, :, 5:M + 5]
    q = torch.randn(B, Lq, Hkv * G, D, generator=gen).transpose(1, 2)
    own_k = torch.randn(B, Lk, Hkv, D, generator=gen).transpose(1, 2)
    own_v = torch.randn(B, Lk, Hkv, 2 * D, generator=gen).transpose(1, 2)[..., ::2]
    valid = torch.ones(B, Lk + 3, dtype=torch.bool)
    valid[1, :6] = False
    valid = valid[:, 3:]
    inputs = (q, mem_k, mem_v, own_k, own_v, valid)
    out = prefix_attention(*inputs, backend="triton")
    expected = prefix_attention_reference(*[t.contiguous() for t in inputs], D ** -0.5)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_empty_query():
    q, mem_k, mem_v, own_k, own_v, _ = make_inputs(1, 1, 2, 3, 3, 4, 16, "none", torch.float32)
    out = prefix_attention(q[:, :, :0], mem_k, mem_v, own_k, own_v, backend="triton")
    assert out.shape == (1, 2, 0, 16)


def _bad_inputs():
    q, mk, mv, ok, ov, valid = make_inputs(2, 2, 2, 3, 5, 4, 16, "left", torch.float32)
    return {
        "query heads not a multiple of KV heads": (q[:, :3], mk, mv, ok, ov, valid),
        "head_dim mismatch": (q, mk[..., :8], mv[..., :8], ok, ov, valid),
        "Lk < Lq": (q, mk, mv, ok[:, :, :2], ov[:, :, :2], valid[:, :2]),
        "mem_v shape": (q, mk, mv[:, :3], ok, ov, valid),
        "batch mismatch": (q, mk, mv, ok[:1], ov[:1], valid),
        "KV heads mismatch": (q, mk[:1], mv[:1], ok, ov, valid),
        "dtype mismatch": (q, mk.half(), mv.half(), ok, ov, valid),
        "integer q": (q.long(), mk, mv, ok, ov, valid),
        "mask dtype": (q, mk, mv, ok, ov, valid.long()),
        "mask shape": (q, mk, mv, ok, ov, valid[:, :4]),
        "memory rank": (q, mk[None], mv[None], ok, ov, valid),
    }


@pytest.mark.parametrize("what", list(_bad_inputs()))
def test_bad_input_raises(what):
    with pytest.raises(ValueError):
        prefix_attention(*_bad_inputs()[what], backend="triton")


def test_bad_options_raise():
    inputs = make_inputs(1, 1, 1, 2, 2, 3, 16, "none", torch.float32)
    with pytest.raises(ValueError):
        prefix_attention_triton(*inputs, form="split")
    with pytest.raises(ValueError):
        prefix_attention(*inputs, backend="cuda")
    big = make_inputs(1, 1, 1, 1, 1, 1, 264, "none", torch.float32)
    with pytest.raises(ValueError):
        prefix_attention(*big, backend="triton")
