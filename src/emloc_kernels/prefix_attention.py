"""Prefix attention: GQA attention over a shared, unmasked memory plus each row's own keys.

Shapes (Hq = G * Hkv; query head h uses KV head h // G, as transformers' repeat_kv):
    q         [B, Hq, Lq, D]   post-RoPE queries
    mem_k/v   [Hkv, M, D]      memory shared by every row, fully visible (M may be 0)
    own_k/v   [B, Hkv, Lk, D]  the rows' own keys/values, Lk >= Lq; query i sits at own
                                index Lk - Lq + i and sees own keys j <= that index
    own_valid [B, Lk] bool     False marks padding keys (None: all valid)
Returns out [B, Hq, Lq, D] in q's dtype; softmax statistics in fp32. A query that sees
no key at all (empty memory, only padding) gets a zero output.

Triton path (GQA-native: the memory is read in place, never expanded per row or per head;
q, K, V may be strided views, e.g. the first M rows of a preallocated memory buffer):
    prefill form  one program per (block of query rows, b, KV head). A block packs the G
                  query heads of the KV group (row r = i * G + g), so each K/V tile is read
                  once for the whole group. fp32 online softmax (exp2) over the memory, then
                  the causal, padded own keys up to the block's last query position.
    decode form   (Lq <= DECODE_MAX_LQ) two launches, split-K. Stage 1: each program takes
                  one split of the keys and writes its unnormalised fp32 partial (acc,
                  running max, sum). A memory split serves a block of every batch row's
                  queries of the group at once (r = (b * Lq + i) * G + g), so a memory tile is
                  read once for the whole batch; an own-key split serves one row b. Stage 2:
                  one small program per (query row, KV head) merges the splits by
                  log-sum-exp and normalises.
Dots take fp16/bf16 operands (fp32 accumulate; probabilities rounded to V's dtype, as in
flash attention) and fp32 operands at IEEE precision. Under the CPU interpreter bf16 is
converted to fp32 on load (the interpreter's bf16 arithmetic is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import cuda_arch, multiprocessors, resolve_backend, triton_interpreted

DECODE_MAX_LQ = 4
MAX_HEAD_DIM = 256
MAX_SPLITS = 64  # per segment (memory, own keys) in the decode form
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634


def prefix_attention_reference(q, mem_k, mem_v, own_k, own_v, own_valid, scale):
    """Plain PyTorch prefix attention (dense scores, fp32 accumulation)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = own_k.shape[1], own_k.shape[2]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G, Lq, D)
    s_mem = torch.einsum("bhgqd,hmd->bhgqm", qf, mem_k.float()) * scale
    s_own = torch.einsum("bhgqd,bhkd->bhgqk", qf, own_k.float()) * scale
    q_index = torch.arange(Lq, device=q.device) + (Lk - Lq)
    allowed = torch.arange(Lk, device=q.device)[None, :] <= q_index[:, None]  # [Lq, Lk]
    allowed = allowed[None]
    if own_valid is not None:
        allowed = allowed & own_valid[:, None, :].bool()
    s_own = s_own.masked_fill(~allowed[:, None, None], float("-inf"))
    s = torch.cat([s_mem, s_own], dim=-1)
    row_max = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    M = mem_k.shape[1]
    out = torch.einsum("bhgqm,hmd->bhgqd", p[..., :M], mem_v.float())
    out = out + torch.einsum("bhgqk,bhkd->bhgqd", p[..., M:], own_v.float())
    return out.reshape(B, Hq, Lq, D).to(q.dtype)


def prefix_attention(q, mem_k, mem_v, own_k, own_v, own_valid=None, scale=None, backend="auto"):
    """Attention of q over memory (shared, unmasked) ⊕ own keys (causal, padded). See module doc."""
    if resolve_backend(backend, q, mem_k, own_k) == "torch":
        _check_inputs(q, mem_k, mem_v, own_k, own_v, own_valid)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return prefix_attention_reference(q, mem_k, mem_v, own_k, own_v, own_valid, scale)
    return prefix_attention_triton(q, mem_k, mem_v, own_k, own_v, own_valid, scale)


def _check_inputs(q, mem_k, mem_v, own_k, own_v, own_valid):
    """Raise ValueError unless the arguments follow the shapes and dtypes of the module doc."""
    tensors = {"q": q, "mem_k": mem_k, "mem_v": mem_v, "own_k": own_k, "own_v": own_v}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4 or own_k.dim() != 4 or mem_k.dim() != 3:
        raise ValueError(f"expected q [B, Hq, Lq, D], mem_k [Hkv, M, D], own_k [B, Hkv, Lk, D]; "
                         f"got {tuple(q.shape)}, {tuple(mem_k.shape)}, {tuple(own_k.shape)}")
    if mem_v.shape != mem_k.shape or own_v.shape != own_k.shape:
        raise ValueError(f"values must have their keys' shapes: mem_k {tuple(mem_k.shape)} vs "
                         f"mem_v {tuple(mem_v.shape)}, own_k {tuple(own_k.shape)} vs "
                         f"own_v {tuple(own_v.shape)}")
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = own_k.shape
    if own_k.shape[0] != B or own_k.shape[3] != D or mem_k.shape[0] != Hkv or mem_k.shape[2] != D:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, mem_k {tuple(mem_k.shape)}, "
                         f"own_k {tuple(own_k.shape)} (need matching B, Hkv and D)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a positive multiple of KV heads ({Hkv})")
    if Lk < Lq:
        raise ValueError(f"own keys ({Lk}) must be at least as many as queries ({Lq})")
    if own_valid is not None:
        if not isinstance(own_valid, torch.Tensor) or own_valid.dtype != torch.bool:
            raise ValueError(f"own_valid must be a bool tensor, got "
                             f"{getattr(own_valid, 'dtype', type(own_valid).__name__)}")
        if own_valid.shape != (B, Lk):
            raise ValueError(f"own_valid must have shape [B, Lk] = {(B, Lk)}, "
                             f"got {tuple(own_valid.shape)}")
        if own_valid.device != q.device:
            raise ValueError(f"own_valid is on {own_valid.device} but q is on {q.device}")


@triton.jit
def _attend_block(acc, m_i, l_i, q, k, v, allowed, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step of q [BM, BD] over keys k, v [BN, BD]; allowed [BM, BN].

    m_i is the running max in log2 units (-inf while nothing was seen), l_i the running sum.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _load_kv(base, n, stride_n, stride_d, d, n_ok, d_ok, UPCAST: tl.constexpr):
    """Load a [BN, BD] tile of keys or values (zeros outside n_ok x d_ok)."""
    tile = tl.load(base + n[:, None] * stride_n + d[None, :] * stride_d,
                   mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _prefill_kernel(
    q_ptr, mk_ptr, mv_ptr, ok_ptr, ov_ptr, valid_ptr, out_ptr,
    qk_scale, Hkv, Lq, Lk, M,
    sq_b, sq_h, sq_q, sq_d, smk_h, smk_n, smk_d, smv_h, smv_n, smv_d,
    sok_b, sok_h, sok_n, sok_d, sov_b, sov_h, sov_n, sov_d, sval_b, sval_n,
    so_b, so_h, so_q, so_d,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Prefill form: one block of rows r = i * G + g of (b, KV head) over memory, then own keys.

    Own keys: those j <= Lk - Lq + i that are valid. out = acc / sum, 0 where nothing was seen.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Lq
    i = rows // G
    g = rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q_off = b.to(tl.int64) * sq_b + (kvh * G + g).to(tl.int64) * sq_h + i * sq_q
    q = tl.load(q_ptr + q_off[:, None] + d[None, :] * sq_d, mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mk_base = mk_ptr + kvh.to(tl.int64) * smk_h
    mv_base = mv_ptr + kvh.to(tl.int64) * smv_h
    for n0 in range(0, M, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < M
        k = _load_kv(mk_base, n, smk_n, smk_d, d, n_ok, d_ok, UPCAST)
        v = _load_kv(mv_base, n, smv_n, smv_d, d, n_ok, d_ok, UPCAST)
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, n_ok[None, :], qk_scale,
                                      DOT_PRECISION)

    q_pos = Lk - Lq + i  # own index of each row's query
    own_end = Lk - Lq + tl.minimum((tile * BLOCK_M + BLOCK_M - 1) // G, Lq - 1) + 1
    ok_base = ok_ptr + b.to(tl.int64) * sok_b + kvh.to(tl.int64) * sok_h
    ov_base = ov_ptr + b.to(tl.int64) * sov_b + kvh.to(tl.int64) * sov_h
    for n0 in range(0, own_end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < own_end
        k = _load_kv(ok_base, n, sok_n, sok_d, d, n_ok, d_ok, UPCAST)
        v = _load_kv(ov_base, n, sov_n, sov_d, d, n_ok, d_ok, UPCAST)
        key_ok = n_ok
        if HAS_VALID:
            key_ok = key_ok & (tl.load(valid_ptr + b.to(tl.int64) * sval_b + n * sval_n,
                                       mask=n_ok, other=0) != 0)
        allowed = key_ok[None, :] & (n[None, :] <= q_pos[:, None])
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, allowed, qk_scale, DOT_PRECISION)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_off = b.to(tl.int64) * so_b + (kvh * G + g).to(tl.int64) * so_h + i * so_q
    tl.store(out_ptr + o_off[:, None] + d[None, :] * so_d, out.to(out_ptr.dtype.element_ty),
             mask=io_mask)


@triton.jit
def _split_partial(
    q_ptr, k_base, v_base, skn, skd, svn, svd, valid_base, sval_n,
    part_acc_ptr, part_m_ptr, part_l_ptr, split, n_splits,
    qk_scale, kvh, row0, row_end, n_rows, Lq, Lk, start, end,
    sq_b, sq_h, sq_q, sq_d,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, IS_OWN: tl.constexpr, HAS_VALID: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Softmax state of rows [row0, row_end) (r = (b * Lq + i) * G + g) over keys [start, end)
    of one segment; own keys (IS_OWN) also causal and padded. Writes part_*[kvh, r, split]."""
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    b = rows // (Lq * G)
    i = (rows // G) % Lq
    g = rows % G
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_off = b.to(tl.int64) * sq_b + (kvh * G + g).to(tl.int64) * sq_h + i * sq_q
    q = tl.load(q_ptr + q_off[:, None] + d[None, :] * sq_d,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    q_pos = Lk - Lq + i
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        k = _load_kv(k_base, n, skn, skd, d, n_ok, d_ok, UPCAST)
        v = _load_kv(v_base, n, svn, svd, d, n_ok, d_ok, UPCAST)
        if IS_OWN:
            key_ok = n_ok
            if HAS_VALID:
                key_ok = key_ok & (tl.load(valid_base + n * sval_n, mask=n_ok, other=0) != 0)
            allowed = key_ok[None, :] & (n[None, :] <= q_pos[:, None])
        else:
            allowed = n_ok[None, :]
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k, v, allowed, qk_scale, DOT_PRECISION)

    part = (kvh.to(tl.int64) * n_rows + rows) * n_splits + split
    tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(part_m_ptr + part, m_i, mask=row_ok)
    tl.store(part_l_ptr + part, l_i, mask=row_ok)


@triton.jit
def _decode_partial_kernel(
    q_ptr, mk_ptr, mv_ptr, ok_ptr, ov_ptr, valid_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    qk_scale, Lq, Lk, M, batch, mem_tiles, mem_split_len, n_mem_splits,
    own_tiles, own_split_len, n_own_splits,
    sq_b, sq_h, sq_q, sq_d, smk_h, smk_n, smk_d, smv_h, smv_n, smv_d,
    sok_b, sok_h, sok_n, sok_d, sov_b, sov_h, sov_n, sov_d, sval_b, sval_n,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Decode stage 1, grid (memory programs + own programs, Hkv).

    Memory program (row tile, split): a block of all batch rows' queries (the memory is the
    same for every row) over one memory split. Own program (row tile, b, split): a block of
    row b's queries over one split of its own keys. Splits [0, n_mem_splits) of part_* are
    the memory's, the next n_own_splits the own keys'.
    """
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    n_rows = batch * Lq * G
    n_splits = n_mem_splits + n_own_splits
    if pid < mem_tiles * n_mem_splits:
        mem_split = pid // mem_tiles
        mem_start = mem_split * mem_split_len
        _split_partial(
            q_ptr, mk_ptr + kvh.to(tl.int64) * smk_h, mv_ptr + kvh.to(tl.int64) * smv_h,
            smk_n, smk_d, smv_n, smv_d, valid_ptr, sval_n,
            part_acc_ptr, part_m_ptr, part_l_ptr, mem_split, n_splits,
            qk_scale, kvh, (pid % mem_tiles) * BLOCK_M, n_rows, n_rows, Lq, Lk,
            mem_start, tl.minimum(mem_start + mem_split_len, M), sq_b, sq_h, sq_q, sq_d,
            G, HEAD_DIM, False, HAS_VALID, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        own_pid = pid - mem_tiles * n_mem_splits
        own_tile = own_pid % own_tiles
        own_b = (own_pid // own_tiles) % batch
        own_split = own_pid // (own_tiles * batch)
        own_start = own_split * own_split_len
        # keys past the last query of this row tile are never visible
        own_end = Lk - Lq + tl.minimum((own_tile * BLOCK_M + BLOCK_M - 1) // G, Lq - 1) + 1
        _split_partial(
            q_ptr, ok_ptr + own_b.to(tl.int64) * sok_b + kvh.to(tl.int64) * sok_h,
            ov_ptr + own_b.to(tl.int64) * sov_b + kvh.to(tl.int64) * sov_h,
            sok_n, sok_d, sov_n, sov_d, valid_ptr + own_b.to(tl.int64) * sval_b, sval_n,
            part_acc_ptr, part_m_ptr, part_l_ptr, n_mem_splits + own_split, n_splits,
            qk_scale, kvh, own_b * (Lq * G) + own_tile * BLOCK_M, (own_b + 1) * (Lq * G),
            n_rows, Lq, Lk, own_start, tl.minimum(own_start + own_split_len, own_end),
            sq_b, sq_h, sq_q, sq_d,
            G, HEAD_DIM, True, HAS_VALID, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)


@triton.jit
def _decode_merge_kernel(
    part_acc_ptr, part_m_ptr, part_l_ptr, out_ptr, Lq, n_rows, n_splits,
    so_b, so_h, so_q, so_d,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Decode stage 2: merge the splits of one row r = (b * Lq + i) * G + g of a KV head by
    log-sum-exp and write out[b, kvh * G + g, i] (0 when no split saw a key)."""
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    part = (kvh.to(tl.int64) * n_rows + r) * n_splits + s
    m_s = tl.load(part_m_ptr + part, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=s_ok, other=0.0)
    acc_s = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.max(m_s, axis=0)
    w = tl.exp2(m_s - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(l_s * w, axis=0)
    out = tl.sum(acc_s * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    b = r // (Lq * G)
    i = (r // G) % Lq
    g = r % G
    o_off = b.to(tl.int64) * so_b + (kvh * G + g).to(tl.int64) * so_h + i * so_q
    tl.store(out_ptr + o_off + d * so_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _new_buffer(shape, dtype, device):
    """Uninitialised buffer for kernel outputs (every element read later is written first)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_config(dtype, head_dim, rows, arch, decode):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for programs that each handle up to `rows` rows,
    on a GPU of compute capability `arch` x 10 (None under the interpreter).

    Checked with `python -m emloc_kernels.aot` (compiled for sm_80 and sm_90: no spills, shared
    memory within limits). fp32 uses the IEEE FMA dot: small tiles. 16-bit prefill: 128 x 64
    tiles, but 128 x 32 on sm_8x, where 128 x 64 spills (255 registers, 72 B stack). Decode:
    64 x 32, so that two programs fit on an SM (64 x 64 takes 193 KiB of shared memory on sm_90:
    the memory and own-key loops each keep their own pipeline buffers).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if triton_interpreted():
        block_m, block_n, stages = 32, 16, 1
    elif dtype == torch.float32:
        block_m, block_n, stages = (32, 16, 2) if block_d <= 128 else (16, 16, 1)
    elif block_d > 128:
        block_m, block_n, stages = 64, 32, 2
    elif decode:
        block_m, block_n, stages = 64, 32, 3
    else:
        block_m, block_n, stages = 128, 32 if arch is not None and arch < 90 else 64, 3
    block_m = min(block_m, max(16, triton.next_power_of_2(rows)))
    warps = 8 if block_m * block_d * torch.finfo(dtype).bits // 8 >= 16384 else 4
    return block_m, block_n, warps, stages


def _split_lengths(M, Lk, sharers, block_n, device, split_keys):
    """Keys per decode split, for the memory and for the own keys.

    sharers: (programs per memory split, programs per own-key split), i.e. row tiles x KV
    heads (x batch for own keys). By default about two programs per SM in all, at least two
    key tiles per split, at most MAX_SPLITS splits per segment; split_keys forces a length.
    """
    if split_keys is None:
        work = sharers[0] * M + sharers[1] * Lk  # keys read, summed over programs
        min_keys = block_n if triton_interpreted() else 2 * block_n
        split_keys = max(min_keys, triton.cdiv(work, 2 * (multiprocessors(device) or 4)))
    lengths = []
    for keys in (M, Lk):
        length = max(split_keys, triton.cdiv(keys, MAX_SPLITS))
        lengths.append(triton.cdiv(length, block_n) * block_n)
    return lengths


def prefix_attention_triton(q, mem_k, mem_v, own_k, own_v, own_valid=None, scale=None,
                            form="auto", split_keys=None):
    """Triton prefix attention (module doc). form: "auto" (decode when Lq <= DECODE_MAX_LQ),
    "prefill" or "decode"; split_keys: keys per decode split (None: enough splits to fill
    the device)."""
    _check_inputs(q, mem_k, mem_v, own_k, own_v, own_valid)
    if form not in ("auto", "prefill", "decode"):
        raise ValueError(f"form must be 'auto', 'prefill' or 'decode', got {form!r}")
    if split_keys is not None and split_keys < 1:
        raise ValueError(f"split_keys must be positive, got {split_keys}")
    B, Hq, Lq, D = q.shape
    Hkv, M = mem_k.shape[0], mem_k.shape[1]
    Lk = own_k.shape[2]
    G = Hq // Hkv
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    scale = D ** -0.5 if scale is None else float(scale)
    out = _new_buffer((B, Hq, Lq, D), q.dtype, q.device)
    if out.numel() == 0:
        return out
    upcast = triton_interpreted() and q.dtype == torch.bfloat16
    consts = dict(G=G, HEAD_DIM=D, HAS_VALID=own_valid is not None, UPCAST=upcast,
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
                  BLOCK_D=max(16, triton.next_power_of_2(D)))
    valid = own_valid.view(torch.uint8) if own_valid is not None else q
    valid_strides = own_valid.stride() if own_valid is not None else (0, 0)
    strides = (*q.stride(), *mem_k.stride(), *mem_v.stride(), *own_k.stride(), *own_v.stride(),
               *valid_strides)
    qk_scale = scale * _LOG2E

    if not (Lq <= DECODE_MAX_LQ if form == "auto" else form == "decode"):
        block_m, block_n, warps, stages = _launch_config(q.dtype, D, G * Lq, cuda_arch(q.device),
                                                          decode=False)
        _prefill_kernel[(triton.cdiv(G * Lq, block_m), B * Hkv)](
            q, mem_k, mem_v, own_k, own_v, valid, out, qk_scale, Hkv, Lq, Lk, M,
            *strides, *out.stride(),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **consts)
        return out

    n_rows = B * Lq * G
    block_m, block_n, warps, stages = _launch_config(q.dtype, D, n_rows, cuda_arch(q.device),
                                                      decode=True)
    mem_tiles = triton.cdiv(n_rows, block_m)
    own_tiles = triton.cdiv(G * Lq, block_m)
    mem_len, own_len = _split_lengths(M, Lk, (Hkv * mem_tiles, Hkv * B * own_tiles), block_n,
                                      q.device, split_keys)
    n_mem, n_own = triton.cdiv(M, mem_len), triton.cdiv(Lk, own_len)
    part_acc = _new_buffer((Hkv, n_rows, n_mem + n_own, D), torch.float32, q.device)
    part_m = _new_buffer((Hkv, n_rows, n_mem + n_own), torch.float32, q.device)
    part_l = _new_buffer((Hkv, n_rows, n_mem + n_own), torch.float32, q.device)
    _decode_partial_kernel[(mem_tiles * n_mem + own_tiles * B * n_own, Hkv)](
        q, mem_k, mem_v, own_k, own_v, valid, part_acc, part_m, part_l,
        qk_scale, Lq, Lk, M, B, mem_tiles, mem_len, n_mem, own_tiles, own_len, n_own,
        *strides, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages,
        **consts)
    block_s = max(2, triton.next_power_of_2(n_mem + n_own))
    _decode_merge_kernel[(n_rows, Hkv)](
        part_acc, part_m, part_l, out, Lq, n_rows, n_mem + n_own, *out.stride(),
        G=G, HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=consts["BLOCK_D"],
        num_warps=8 if block_s * consts["BLOCK_D"] >= 8192 else 4)
    return out
