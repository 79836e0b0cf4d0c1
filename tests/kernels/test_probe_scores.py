"""Triton probe attention + chunk scores vs a float64 dense computation (interpreter on CPU)."""
import importlib

import pytest
import torch

# the package re-exports the function under the module's name: fetch the module itself
ps = importlib.import_module("emloc_kernels.probe_scores")

SCORE_RTOL = 2e-5


def _inputs(B, Hkv, G, L, M, Lc, D, dtype, lengths=None, observer_p=0.4, seed=0):
    """Random probe inputs; rows right-padded to `lengths`; batch row 0 has no observer."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    lengths = torch.tensor(lengths if lengths is not None else [L] * B)
    own_valid = torch.arange(L)[None, :] < lengths[:, None]
    observer = (torch.rand(B, L, generator=gen) < observer_p) & own_valid
    observer[0] = False
    if B > 1:
        observer[-1, lengths[-1] - 1] = True  # at least one observer row
    return dict(q=rand(B, Hkv * G, L, D), mem_k=rand(Hkv, M, D), mem_v=rand(Hkv, M, D),
                chunk_k=rand(Hkv, Lc, D), chunk_v=rand(Hkv, Lc, D),
                own_k=rand(B, Hkv, L, D), own_v=rand(B, Hkv, L, D),
                own_valid=own_valid, observer=observer)


def _dense(x, scale, dtype):
    """Dense probe attention and scores, every operation in `dtype` (float64: the truth)."""
    B, Hq, L, D = x["q"].shape
    Hkv = x["own_k"].shape[1]
    G = Hq // Hkv
    M, Lc = x["mem_k"].shape[1], x["chunk_k"].shape[1]
    q = x["q"].to(dtype).reshape(B, Hkv, G, L, D)
    keys = torch.cat([x["mem_k"].expand(B, -1, -1, -1), x["chunk_k"].expand(B, -1, -1, -1),
                      x["own_k"]], dim=2).to(dtype)  # [B, Hkv, M + Lc + L, D]
    values = torch.cat([x["mem_v"].expand(B, -1, -1, -1), x["chunk_v"].expand(B, -1, -1, -1),
                        x["own_v"]], dim=2).to(dtype)
    s = torch.matmul(q, keys[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, L, T]
    own_ok = torch.ones(L, L, dtype=torch.bool).tril()[None] & x["own_valid"][:, None, :]
    allowed = torch.cat([torch.ones(B, L, M + Lc, dtype=torch.bool), own_ok], dim=-1)
    s = s.masked_fill(~allowed[:, None, None], float("-inf"))
    out = torch.matmul(torch.softmax(s, dim=-1), values[:, :, None]).reshape(B, Hq, L, D)
    p_score = torch.softmax(s[..., M:], dim=-1)[..., :Lc]
    weight = x["observer"].to(dtype)[:, None, None, :, None]
    return out, (p_score * weight).sum(dim=(0, 2, 3))


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the Triton path allocates starts as NaN."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(ps, "_empty", nan_empty)


CASES = [  # B, Hkv, G, L, M, Lc, D, lengths, dtype
    (2, 2, 3, 7, 0, 40, 24, [7, 4], torch.float32),       # empty memory, G = 3
    (2, 1, 1, 5, 37, 1, 16, [5, 5], torch.float32),       # Lc = 1, G = 1
    (3, 2, 1, 1, 20, 33, 20, [1, 1, 1], torch.float16),   # L = 1
    (2, 2, 3, 37, 45, 70, 40, [37, 20], torch.float16),   # several tiles on every loop
    (3, 1, 3, 13, 50, 9, 72, [13, 13, 6], torch.float32),  # head_dim 72 (pads to 128)
    (2, 2, 2, 9, 17, 35, 32, [9, 5], torch.bfloat16),
    (1, 1, 2, 3, 5, 6, 16, [2], torch.float32),             # no observer at all
]


@pytest.mark.parametrize("B,Hkv,G,L,M,Lc,D,lengths,dtype", CASES)
def test_matches_float64(poisoned, B, Hkv, G, L, M, Lc, D, lengths, dtype):
    x = _inputs(B, Hkv, G, L, M, Lc, D, dtype, lengths=lengths, seed=B * 1000 + L * 10 + M)
    scale = D ** -0.5
    out, scores = ps.probe_scores(**x, backend="triton")
    assert out.dtype == dtype and out.shape == x["q"].shape
    assert scores.dtype == torch.float32 and scores.shape == (Hkv, Lc)

    out64, scores64 = _dense(x, scale, torch.float64)
    if dtype == torch.float32:  # the spec itself is the fp32 PyTorch baseline
        out_base = ps.probe_scores_reference(**x, scale=scale)[0]
    else:
        out_base = _dense(x, scale, dtype)[0]
    kernel_err = (out.double() - out64).abs().max().item()
    base_err = (out_base.double() - out64).abs().max().item()
    assert kernel_err <= 2 * base_err + 1e-6, (kernel_err, base_err)

    if not x["observer"].any():
        assert torch.equal(scores, torch.zeros_like(scores))
    else:
        assert scores64.abs().max() > 0
    torch.testing.assert_close(scores.double(), scores64, rtol=SCORE_RTOL, atol=1e-7)


def test_reference_matches_float64():
    """The fp32 spec agrees with the independent float64 dense computation used above."""
    x = _inputs(2, 2, 3, 11, 19, 23, 16, torch.float32, lengths=[11, 6])
    out, scores = ps.probe_scores(**x, backend="torch")
    out64, scores64 = _dense(x, 0.25, torch.float64)
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores.double(), scores64, rtol=1e-5, atol=1e-6)


def test_memory_changes_output_not_scores():
    """Memory keys enter the output but not the scores' normaliser."""
    x = _inputs(2, 1, 2, 6, 0, 12, 16, torch.float32)
    y = dict(x, mem_k=torch.randn(1, 30, 16) * 3, mem_v=torch.randn(1, 30, 16))
    out_x, scores_x = ps.probe_scores(**x, backend="triton")
    out_y, scores_y = ps.probe_scores(**y, backend="triton")
    assert (out_x - out_y).abs().max() > 1e-2
    torch.testing.assert_close(scores_x, scores_y, rtol=1e-5, atol=1e-7)


def test_score_splits_and_repeat(poisoned):
    """Pass 2 split over rows gives the same sums; repeated calls are bitwise identical."""
    x = _inputs(3, 2, 3, 20, 8, 45, 32, torch.float32, lengths=[20, 14, 9], observer_p=0.7)
    scale = 32 ** -0.5
    out1, scores1 = ps._probe_scores_triton(**x, scale=scale, score_splits=1)
    out3, scores3 = ps._probe_scores_triton(**x, scale=scale, score_splits=3)
    torch.testing.assert_close(scores3, scores1, rtol=1e-5, atol=1e-7)
    assert torch.equal(out3, out1)
    again = ps._probe_scores_triton(**x, scale=scale, score_splits=3)[1]
    assert torch.equal(again, scores3)


def test_own_valid_none_means_all_valid():
    x = _inputs(2, 1, 2, 5, 3, 7, 16, torch.float32)
    full = ps.probe_scores(**x, backend="triton")
    none = ps.probe_scores(**dict(x, own_valid=None), backend="triton")
    assert torch.equal(full[0], none[0]) and torch.equal(full[1], none[1])


def test_no_rows():
    x = _inputs(2, 2, 2, 3, 4, 5, 16, torch.float32)
    x = dict(x, q=x["q"][:, :, :0], own_k=x["own_k"][:, :, :0], own_v=x["own_v"][:, :, :0],
             own_valid=x["own_valid"][:, :0], observer=x["observer"][:, :0])
    out, scores = ps.probe_scores(**x, backend="triton")
    assert out.shape == (2, 4, 0, 16)
    assert torch.equal(scores, torch.zeros(2, 5))
    out, scores = ps.probe_scores(**dict(x, observer=None), backend="triton")
    assert out.shape == (2, 4, 0, 16) and scores is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_observer_none_runs_attention_only(monkeypatch, dtype):
    """observer=None: the same output as with observers, no scores, pass 1 alone, and no
    buffer but the output allocated."""
    x = _inputs(2, 2, 3, 21, 13, 37, 24, dtype, lengths=[21, 12], seed=5)
    out, scores = ps.probe_scores(**x, backend="triton")
    ref_out, ref_scores = ps.probe_scores(**x, backend="torch")
    assert scores is not None and ref_scores is not None

    allocated = []

    def recording_empty(shape, dtype, device):
        allocated.append(tuple(shape))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("pass 2 launched although observer is None")

    monkeypatch.setattr(ps, "_empty", recording_empty)
    monkeypatch.setattr(ps, "_chunk_scores_kernel", NoLaunch())
    out_none, scores_none = ps.probe_scores(**dict(x, observer=None), backend="triton")
    assert scores_none is None
    assert torch.equal(out_none, out)
    assert allocated == [tuple(x["q"].shape)]
    ref_none, ref_scores_none = ps.probe_scores(**dict(x, observer=None), backend="torch")
    assert ref_scores_none is None
    assert torch.equal(ref_none, ref_out)


def test_strided_views(poisoned):
    """Memory and chunk as slices of larger buffers, q and own K/V as transposed views, a
    value tensor with a non-unit last stride: bitwise the results of contiguous copies."""
    B, Hkv, G, L, M, Lc, D = 2, 2, 2, 11, 19, 23, 16
    x = _inputs(B, Hkv, G, L, M, Lc, D, torch.float32, lengths=[11, 7], seed=6)
    mem_buf = torch.full((2, Hkv, M + 9, D), 1e4)  # rows past M would dominate if read
    mem_buf[0, :, :M], mem_buf[1, :, :M] = x["mem_k"], x["mem_v"]
    chunk_v = torch.full((Hkv, Lc, 2 * D), 1e4)
    chunk_v[..., ::2] = x["chunk_v"]
    strided = dict(
        x, q=x["q"].transpose(1, 2).contiguous().transpose(1, 2),
        mem_k=mem_buf[0, :, :M], mem_v=mem_buf[1, :, :M],
        chunk_k=x["chunk_k"].transpose(0, 1).contiguous().transpose(0, 1),
        chunk_v=chunk_v[..., ::2],
        own_k=x["own_k"].transpose(1, 2).contiguous().transpose(1, 2),
        own_v=x["own_v"].permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0))
    assert not any(strided[n].is_contiguous() for n in
                   ("q", "mem_k", "mem_v", "chunk_k", "chunk_v", "own_k", "own_v"))
    out, scores = ps.probe_scores(**x, backend="triton")
    out_s, scores_s = ps.probe_scores(**strided, backend="triton")
    assert torch.equal(out_s, out) and torch.equal(scores_s, scores)
    assert torch.isfinite(out).all() and scores.abs().max() > 0


def _bad(x, **changes):
    return dict(x, **changes)


@pytest.mark.parametrize("change, message", [
    (lambda x: _bad(x, observer=x["observer"].float()), "observer"),
    (lambda x: _bad(x, own_valid=x["own_valid"].int()), "own_valid"),
    (lambda x: _bad(x, observer=x["observer"][:, :-1]), "observer"),
    (lambda x: _bad(x, chunk_k=x["chunk_k"][:, :, :-1]), "chunk_k"),
    (lambda x: _bad(x, chunk_k=x["chunk_k"][:, :0], chunk_v=x["chunk_v"][:, :0]), "Lc >= 1"),
    (lambda x: _bad(x, mem_v=x["mem_v"][:, :-1]), "mem_v"),
    (lambda x: _bad(x, own_k=x["own_k"][:, :, :-1], own_v=x["own_v"][:, :, :-1]), "own_k"),
    (lambda x: _bad(x, q=x["q"][:, :-1]), "multiple of KV heads"),
    (lambda x: _bad(x, mem_k=x["mem_k"].half()), "dtype"),
    (lambda x: _bad(x, q=x["q"].double()), "float16, bfloat16 or float32"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_raises(change, message, backend):
    x = _inputs(2, 2, 2, 4, 3, 5, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        ps.probe_scores(**change(x), backend=backend)
