"""Probe attention with importance scores (EMLoC step 3).

Shapes (Hq = G * Hkv; query head h uses KV head h // G):
    q           [B, Hq, L, D]    post-RoPE probe queries
    mem_k/v     [Hkv, M, D]      memory, shared, unmasked (M may be 0)
    chunk_k/v   [Hkv, Lc, D]     the chunk, shared, unmasked
    own_k/v     [B, Hkv, L, D]   the probe rows' own keys; query i sees own keys j <= i
    own_valid   [B, L] bool      False marks padding keys (None: all valid)
    observer    [B, L] bool      rows whose scores count (answer-span positions, never padding),
                                 or None: no scores at all (attention only)
Returns
    out    [B, Hq, L, D] (q's dtype): attention over memory ⊕ chunk ⊕ own
    scores [Hkv, Lc] fp32: Σ over observer rows and over the query heads of each KV group of
           softmax over chunk ⊕ own (memory excluded from the normaliser), chunk columns only;
           None when observer is None.

Triton path, two kernels, nothing of size L x Lc in global memory; every input is read
through its strides (a memory that is a view of a larger buffer is not copied):
    pass 1  one program per (row block, b, KV head); rows pack the G query heads of the KV
            group (row r = g * L + i). fp32 online softmax over chunk, then own keys, then
            memory: the running state after chunk ⊕ own gives the row's log-sum-exp for the
            scores, the final state gives the output.
            With observer None only this pass runs, and it stores no log-sum-exp.
    pass 2  one program per (chunk column block, KV head, row split) recomputes
            exp(s - lse) for the observer rows only (compacted on device, no host sync) and
            sums columns in a fixed order; the splits' partial sums are added by torch.
            No atomics: scores are bitwise reproducible for a given device and shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import cuda_arch, multiprocessors, resolve_backend, triton_interpreted

_LOG2E = 1.4426950408889634


def probe_scores_reference(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer, scale):
    """Plain PyTorch probe attention + scores (dense probabilities, fp32); scores None when
    observer is None."""
    B, Hq, L, D = q.shape
    Hkv = own_k.shape[1]
    G = Hq // Hkv
    M, Lc = mem_k.shape[1], chunk_k.shape[1]
    qf = q.float().reshape(B, Hkv, G, L, D)
    s_mem = torch.einsum("bhgqd,hmd->bhgqm", qf, mem_k.float()) * scale
    s_chunk = torch.einsum("bhgqd,hmd->bhgqm", qf, chunk_k.float()) * scale
    s_own = torch.einsum("bhgqd,bhkd->bhgqk", qf, own_k.float()) * scale
    allowed = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[None]
    if own_valid is not None:
        allowed = allowed & own_valid[:, None, :].bool()
    s_own = s_own.masked_fill(~allowed[:, None, None], float("-inf"))
    p = torch.softmax(torch.cat([s_mem, s_chunk, s_own], dim=-1), dim=-1)
    out = torch.einsum("bhgqm,hmd->bhgqd", p[..., :M], mem_v.float())
    out = out + torch.einsum("bhgqm,hmd->bhgqd", p[..., M:M + Lc], chunk_v.float())
    out = out + torch.einsum("bhgqk,bhkd->bhgqd", p[..., M + Lc:], own_v.float())
    out = out.reshape(B, Hq, L, D).to(q.dtype)
    if observer is None:
        return out, None
    p_score = torch.softmax(torch.cat([s_chunk, s_own], dim=-1), dim=-1)[..., :Lc]
    weight = observer.float()[:, None, None, :, None]  # [B, 1, 1, L, 1]
    scores = (p_score * weight).sum(dim=(0, 2, 3))
    return out, scores


def probe_scores(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer,
                 scale=None, backend="auto"):
    """Probe attention output and per-KV-head chunk importance. See module doc."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolve_backend(backend, q, mem_k, chunk_k, own_k) == "torch":
        _check_inputs(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer)
        return probe_scores_reference(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v,
                                      own_valid, observer, scale)
    return _probe_scores_triton(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid,
                                observer, scale)


@triton.jit
def _softmax_step(q, kT, v, allowed, acc, m_i, l_i, qk_scale,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key tile of the fp32 online softmax (base 2). A row must see a key in its first
    tile (m_i finite afterwards): callers start with the chunk, whose column 0 every row sees."""
    if UPCAST:
        kT = kT.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_keys(base, cols, col_ok, stride_n, offs_d, d_ok, stride_d, TRANSPOSE: tl.constexpr):
    """A tile of rows `cols` of one head's [N, D] keys or values: [BLOCK_D, BLOCK_N] when
    TRANSPOSE, else [BLOCK_N, BLOCK_D]; zeros outside col_ok x d_ok."""
    # One return statement: the compiler type-checks every return of a function, including
    # one behind a constexpr branch that is not taken.
    if TRANSPOSE:
        tile = tl.load(base + cols[None, :] * stride_n + offs_d[:, None] * stride_d,
                       mask=col_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        tile = tl.load(base + cols[:, None] * stride_n + offs_d[None, :] * stride_d,
                       mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return tile


@triton.jit
def _probe_attention_kernel(
    q_ptr, mem_k_ptr, mem_v_ptr, chunk_k_ptr, chunk_v_ptr, own_k_ptr, own_v_ptr, own_valid_ptr,
    out_ptr, lse_ptr,
    HQ, HKV, G, L, M, LC, qk_scale,
    sq_b, sq_h, sq_l, sq_d, smk_h, smk_n, smk_d, smv_h, smv_n, smv_d,
    sck_h, sck_n, sck_d, scv_h, scv_n, scv_d,
    sok_b, sok_h, sok_n, sok_d, sov_b, sov_h, sov_n, sov_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Pass 1: out [B, HQ, L, D] (contiguous) and, when STORE_LSE, lse [B, HQ, L] (base 2,
    over chunk ⊕ own) for one block of the G * L rows r = g * L + i of (b, KV head). Inputs
    are read through their strides (views of larger buffers are never copied)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * L
    i = rows % L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    q_off = b.to(tl.int64) * sq_b + (kvh * G + rows // L).to(tl.int64) * sq_h + i * sq_l
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # chunk: shared, unmasked
    chunk_k_base = chunk_k_ptr + kvh.to(tl.int64) * sck_h
    chunk_v_base = chunk_v_ptr + kvh.to(tl.int64) * scv_h
    for n0 in range(0, LC, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < LC
        kT = _load_keys(chunk_k_base, cols, col_ok, sck_n, offs_d, d_ok, sck_d, True)
        v = _load_keys(chunk_v_base, cols, col_ok, scv_n, offs_d, d_ok, scv_d, False)
        acc, m_i, l_i = _softmax_step(q, kT, v, col_ok[None, :], acc, m_i, l_i, qk_scale,
                                      UPCAST, DOT_PRECISION)

    # own keys: causal (j <= i) and padding mask
    own_k_base = own_k_ptr + b.to(tl.int64) * sok_b + kvh.to(tl.int64) * sok_h
    own_v_base = own_v_ptr + b.to(tl.int64) * sov_b + kvh.to(tl.int64) * sov_h
    for n0 in range(0, L, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < L
        key_ok = tl.load(own_valid_ptr + b * L + cols, mask=col_ok, other=0) != 0
        kT = _load_keys(own_k_base, cols, col_ok, sok_n, offs_d, d_ok, sok_d, True)
        v = _load_keys(own_v_base, cols, col_ok, sov_n, offs_d, d_ok, sov_d, False)
        allowed = key_ok[None, :] & (cols[None, :] <= i[:, None])
        acc, m_i, l_i = _softmax_step(q, kT, v, allowed, acc, m_i, l_i, qk_scale,
                                      UPCAST, DOT_PRECISION)

    row_base = (b * HQ + kvh * G).to(tl.int64) * L + rows  # index into [B * HQ * L]
    if STORE_LSE:
        tl.store(lse_ptr + row_base, m_i + tl.log2(l_i), mask=row_ok)

    # memory: shared, unmasked, outside the scores' normaliser
    mem_k_base = mem_k_ptr + kvh.to(tl.int64) * smk_h
    mem_v_base = mem_v_ptr + kvh.to(tl.int64) * smv_h
    for n0 in range(0, M, BLOCK_N):
        cols = n0 + offs_n
        col_ok = cols < M
        kT = _load_keys(mem_k_base, cols, col_ok, smk_n, offs_d, d_ok, smk_d, True)
        v = _load_keys(mem_v_base, cols, col_ok, smv_n, offs_d, d_ok, smv_d, False)
        acc, m_i, l_i = _softmax_step(q, kT, v, col_ok[None, :], acc, m_i, l_i, qk_scale,
                                      UPCAST, DOT_PRECISION)

    out = acc / l_i[:, None]
    tl.store(out_ptr + row_base[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _chunk_scores_kernel(
    q_ptr, chunk_k_ptr, lse_ptr, order_ptr, n_obs_ptr, partial_ptr,
    HQ, HKV, G, L, LC, qk_scale, n_splits,
    sq_b, sq_h, sq_l, sq_d, sck_h, sck_n, sck_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Pass 2: partial[split, kvh, cols] = Σ over this split's observer rows (pair p, head g)
    of exp2(s - lse), rows r = p * G + g, pairs order[p] = b * L + i for p < n_obs."""
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < LC
    kT = _load_keys(chunk_k_ptr + kvh.to(tl.int64) * sck_h, cols, col_ok, sck_n, offs_d, d_ok,
                    sck_d, True)
    if UPCAST:
        kT = kT.to(tl.float32)

    n_rows = tl.load(n_obs_ptr) * G
    rows_per_split = tl.cdiv(tl.cdiv(n_rows, BLOCK_M), n_splits) * BLOCK_M
    start = split * rows_per_split
    end = tl.minimum(start + rows_per_split, n_rows)
    col_sum = tl.zeros([BLOCK_N], tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + offs_m
        row_ok = rows < end
        pair = tl.load(order_ptr + rows // G, mask=row_ok, other=0)
        b = pair // L
        i = pair % L
        h = kvh * G + rows % G
        q_off = b.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h + i * sq_l
        q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :] * sq_d,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        lse = tl.load(lse_ptr + (b * HQ + h).to(tl.int64) * L + i, mask=row_ok,
                      other=float("inf"))
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * qk_scale
        col_sum += tl.sum(tl.exp2(s - lse[:, None]), 0)
    tl.store(partial_ptr + (split * HKV + kvh) * LC + cols, col_sum, mask=col_ok)


def _empty(shape, dtype, device):
    """Allocation of every Triton-path buffer (tests replace it to poison outputs)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer):
    """Raise ValueError unless the inputs match the module doc's shapes, dtypes and device."""
    named = {"q": q, "mem_k": mem_k, "mem_v": mem_v, "chunk_k": chunk_k, "chunk_v": chunk_v,
             "own_k": own_k, "own_v": own_v}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, t in named.items():
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, L, D], got shape {tuple(q.shape)}")
    B, Hq, L, D = q.shape
    if own_k.dim() != 4 or own_k.shape[0] != B or own_k.shape[2:] != (L, D):
        raise ValueError(f"own_k must be [B={B}, Hkv, L={L}, D={D}], got {tuple(own_k.shape)}")
    Hkv = own_k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if own_v.shape != own_k.shape:
        raise ValueError(f"own_v shape {tuple(own_v.shape)} != own_k shape {tuple(own_k.shape)}")
    if mem_k.dim() != 3 or mem_k.shape[0] != Hkv or mem_k.shape[2] != D:
        raise ValueError(f"mem_k must be [Hkv={Hkv}, M, D={D}], got {tuple(mem_k.shape)}")
    if mem_v.shape != mem_k.shape:
        raise ValueError(f"mem_v shape {tuple(mem_v.shape)} != mem_k shape {tuple(mem_k.shape)}")
    if chunk_k.dim() != 3 or chunk_k.shape[0] != Hkv or chunk_k.shape[2] != D:
        raise ValueError(f"chunk_k must be [Hkv={Hkv}, Lc, D={D}], got {tuple(chunk_k.shape)}")
    if chunk_k.shape[1] == 0:
        raise ValueError("the chunk must hold at least one token (Lc >= 1)")
    if chunk_v.shape != chunk_k.shape:
        raise ValueError(f"chunk_v shape {tuple(chunk_v.shape)} != chunk_k shape "
                         f"{tuple(chunk_k.shape)}")
    for name, mask in (("own_valid", own_valid), ("observer", observer)):
        if mask is None:
            continue
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor [B, L] or None")
        if mask.shape != (B, L):
            raise ValueError(f"{name} must be [B={B}, L={L}], got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"{name} is on {mask.device}, expected q's device {q.device}")


def _configs(dtype, block_d, interpreted, arch):
    """(pass 1, pass 2) launch settings: one fixed choice per dtype, head size and GPU
    architecture (compute capability x 10; no autotune, so that scores are reproducible).
    Checked with `python -m emloc_kernels.aot` for no spills on sm_80 and sm_90: 16-bit pass 1
    takes 128 x 32 tiles on sm_8x, where 128 x 64 spills (255 registers, 72 B stack)."""
    if interpreted:  # small tiles: tests cover several tiles per loop with small shapes
        return {"BLOCK_M": 32, "BLOCK_N": 32}, {"BLOCK_M": 32, "BLOCK_N": 32}
    if dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles
        return ({"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    if block_d > 128:
        return ({"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2})
    return ({"BLOCK_M": 128, "BLOCK_N": 32 if arch is not None and arch < 90 else 64,
             "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2})


def _probe_scores_triton(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer,
                         scale, score_splits=None):
    """Host launcher: pass 1, then pass 2 unless observer is None. Inputs may be strided views.
    score_splits: row splits of pass 2 (None: enough to fill the GPU; the choice depends only
    on shapes and device, never on the data)."""
    _check_inputs(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer)
    B, Hq, L, D = q.shape
    Hkv, Lc, M = own_k.shape[1], chunk_k.shape[1], mem_k.shape[1]
    G = Hq // Hkv
    device = q.device
    out = _empty((B, Hq, L, D), q.dtype, device)
    if B * L == 0:
        scores = None if observer is None else torch.zeros(Hkv, Lc, dtype=torch.float32,
                                                            device=device)
        return out, scores
    if own_valid is None:
        own_valid = torch.ones(B, L, dtype=torch.bool, device=device)
    own_valid = own_valid.contiguous().view(torch.uint8)

    interpreted = triton_interpreted()
    upcast = q.dtype == torch.bfloat16 and interpreted  # the interpreter's bf16 math is wrong
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"
    block_d = max(16, triton.next_power_of_2(D))
    fwd_cfg, score_cfg = _configs(q.dtype, block_d, interpreted, cuda_arch(device))
    qk_scale = float(scale) * _LOG2E
    common = {"BLOCK_D": block_d, "UPCAST": upcast, "DOT_PRECISION": precision}

    # without observers pass 1 stores no log-sum-exp: any pointer will do
    lse = out if observer is None else _empty((B, Hq, L), torch.float32, device)
    grid = (triton.cdiv(G * L, fwd_cfg["BLOCK_M"]), B * Hkv)
    _probe_attention_kernel[grid](
        q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, out, lse,
        Hq, Hkv, G, L, M, Lc, qk_scale,
        *q.stride(), *mem_k.stride(), *mem_v.stride(), *chunk_k.stride(), *chunk_v.stride(),
        *own_k.stride(), *own_v.stride(),
        D=D, STORE_LSE=observer is not None, **fwd_cfg, **common)
    if observer is None:
        return out, None

    # observer (b, i) pairs first, in position order; their count stays on the device
    flat_observer = observer.reshape(-1)
    order = torch.argsort(flat_observer, descending=True, stable=True)
    n_obs = flat_observer.sum(dtype=torch.int32)
    col_blocks = triton.cdiv(Lc, score_cfg["BLOCK_N"])
    if score_splits is None:
        score_splits = 1
        sm_count = multiprocessors(device)  # None under the interpreter: one split
        if sm_count is not None:
            max_splits = triton.cdiv(B * L * G, score_cfg["BLOCK_M"])
            score_splits = min(max_splits, max(1, triton.cdiv(2 * sm_count, col_blocks * Hkv)))
    partial = _empty((score_splits, Hkv, Lc), torch.float32, device)
    _chunk_scores_kernel[(col_blocks, Hkv, score_splits)](
        q, chunk_k, lse, order, n_obs, partial,
        Hq, Hkv, G, L, Lc, qk_scale, score_splits, *q.stride(), *chunk_k.stride(),
        D=D, **score_cfg, **common)
    return out, partial[0] if score_splits == 1 else partial.sum(dim=0)
