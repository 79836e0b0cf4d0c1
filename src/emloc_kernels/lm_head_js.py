"""Fused lm_head + Jensen-Shannon divergence, forward only (EMLoC step 4 test).

    student_hidden [N, H]  final-norm hidden states of the tested configuration
    teacher_hidden [N, H]  final-norm hidden states of the unpruned probe (same rows)
    weight         [V, H]  lm_head weight (no bias, no softcapping)
    teacher_lse    [N] fp32 log-sum-exp of the teacher logits (see `teacher_logsumexp`)
Returns JS [N] fp32 in nats: 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P + Q) / 2, summed over
the vocabulary; logits computed in fp32 from the given hidden states; values below 0 are 0.

Triton path: the [N, V] logits never reach global memory. A grid of (row blocks, vocabulary
splits) programs computes logits one [BLOCK_N, BLOCK_V] tile at a time (tl.dot over H blocks,
fp32 accumulation) and keeps per-row partial results; the [N, n_splits] partials are combined
in PyTorch (deterministic, no atomics). The student takes two passes over the weight
(log-sum-exp, then the JS terms); the teacher's log-sum-exp is computed once per chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import multiprocessors, resolve_backend, triton_interpreted

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def teacher_logsumexp_reference(hidden, weight):
    """log Σ_v exp(hidden · weight[v]) per row, fp32 [N]."""
    return torch.logsumexp(hidden.float() @ weight.float().T, dim=-1)


def js_from_log_probs(log_p, log_q):
    """JS [...] fp32 (nats, clamped at 0) between rows of log-probabilities log_p, log_q [..., V]
    (broadcast against each other)."""
    log_m = torch.logaddexp(log_p, log_q) - torch.log(torch.tensor(2.0, device=log_p.device))
    p, q = log_p.exp(), log_q.exp()
    js = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    return js.clamp_min(0.0)


def lm_head_js_reference(student_hidden, teacher_hidden, weight, teacher_lse):
    """Plain PyTorch JS over full-vocabulary fp32 logits."""
    log_q = torch.log_softmax(student_hidden.float() @ weight.float().T, dim=-1)
    log_p = teacher_hidden.float() @ weight.float().T - teacher_lse.float()[:, None]
    return js_from_log_probs(log_p, log_q)


@triton.jit
def _load_tile(ptrs, mask, CAST_F32: tl.constexpr):
    """Masked load (0 outside); converted to fp32 when CAST_F32 (interpreter, fp32 inputs)."""
    tile = tl.load(ptrs, mask=mask, other=0.0)
    if CAST_F32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _logits_tile(x_rows, row_ok, w_cols, col_ok, hidden, stride_xh, stride_wh,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] = x[rows] @ w[cols].T; x_rows [BLOCK_N, 1] and
    w_cols [1, BLOCK_V] point at the first element of each row / vocabulary entry."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden
        x = _load_tile(x_rows + offs_h[None, :] * stride_xh, row_ok & h_ok[None, :], CAST_F32)
        w = _load_tile(w_cols + offs_h[:, None] * stride_wh, h_ok[:, None] & col_ok, CAST_F32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits_tile_pair(a_rows, b_rows, row_ok, w_cols, col_ok, hidden, stride_ah, stride_bh,
                      stride_wh, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_H: tl.constexpr, CAST_F32: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Two fp32 logits tiles (rows of a, rows of b) against the same weight tile, loaded once."""
    acc_a = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < hidden
        x_mask = row_ok & h_ok[None, :]
        w = _load_tile(w_cols + offs_h[:, None] * stride_wh, h_ok[:, None] & col_ok, CAST_F32)
        a = _load_tile(a_rows + offs_h[None, :] * stride_ah, x_mask, CAST_F32)
        acc_a = tl.dot(a, w, acc_a, input_precision=DOT_PRECISION)
        b = _load_tile(b_rows + offs_h[None, :] * stride_bh, x_mask, CAST_F32)
        acc_b = tl.dot(b, w, acc_b, input_precision=DOT_PRECISION)
    return acc_a, acc_b


@triton.jit
def _lse_partial_kernel(x_ptr, w_ptr, max_ptr, sum_ptr, n_rows, vocab, hidden,
                        stride_xn, stride_xh, stride_wv, stride_wh, blocks_per_split,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        CAST_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Program (row block, split): running max and Σ exp(logit - max) of its rows over the
    split's vocabulary range, stored at [row, split] of max/sum [N, n_splits]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_start + blocks_per_split * BLOCK_V, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < vocab
        w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
        logits = _logits_tile(x_rows, row_ok[:, None], w_cols, col_ok[None, :], hidden,
                              stride_xh, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, CAST_F32,
                              DOT_PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(
            tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    out = offs_n * n_splits + pid_s
    tl.store(max_ptr + out, run_max, mask=row_ok)
    tl.store(sum_ptr + out, run_sum, mask=row_ok)


@triton.jit
def _js_partial_kernel(t_ptr, s_ptr, w_ptr, t_lse_ptr, s_lse_ptr, out_ptr, n_rows, vocab,
                       hidden, stride_tn, stride_th, stride_sn, stride_sh, stride_wv, stride_wh,
                       blocks_per_split, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_H: tl.constexpr, CAST_F32: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Program (row block, split): Σ over the split's vocabulary of
    0.5 p (log p - log m) + 0.5 q (log q - log m), stored at [row, split] of out [N, n_splits].

    With d = log p - log q and a = log((1 + e^-|d|) / 2) = log m - max(log p, log q):
    log p - log m = min(d, 0) - a and log q - log m = min(-d, 0) - a, free of the cancellation
    between large log-probabilities; p or q underflowing to 0 multiplies a finite number.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    t_rows = t_ptr + offs_n.to(tl.int64)[:, None] * stride_tn
    s_rows = s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn
    t_lse = tl.load(t_lse_ptr + offs_n, mask=row_ok, other=0.0)
    s_lse = tl.load(s_lse_ptr + offs_n, mask=row_ok, other=0.0)
    js = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_start = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_start + blocks_per_split * BLOCK_V, vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < vocab
        w_cols = w_ptr + offs_v.to(tl.int64)[None, :] * stride_wv
        t_logits, s_logits = _logits_tile_pair(
            t_rows, s_rows, row_ok[:, None], w_cols, col_ok[None, :], hidden, stride_th,
            stride_sh, stride_wh, BLOCK_N, BLOCK_V, BLOCK_H, CAST_F32, DOT_PRECISION)
        log_p = t_logits - t_lse[:, None]
        log_q = s_logits - s_lse[:, None]
        d = log_p - log_q
        a = tl.log(1.0 + tl.exp(-tl.abs(d))) - 0.6931471805599453
        terms = (tl.exp(log_p) * (tl.minimum(d, 0.0) - a)
                 + tl.exp(log_q) * (tl.minimum(-d, 0.0) - a))
        js += tl.sum(tl.where(col_ok[None, :], terms, 0.0), axis=1)
    tl.store(out_ptr + offs_n * n_splits + pid_s, 0.5 * js, mask=row_ok)


def _check_hidden_weight(name, hidden, weight):
    """Raise ValueError unless hidden [N, H] and weight [V >= 1, H] share dtype and device."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"{name} must be [N, H] and weight [V, H], got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{name} hidden size {hidden.shape[1]} != weight hidden size "
                         f"{weight.shape[1]}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if weight.dtype not in _DTYPES or hidden.dtype != weight.dtype:
        raise ValueError(f"{name} and weight must share one dtype of {_DTYPES}, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{name} is on {hidden.device} but weight on {weight.device}")


def _launch_config(n_rows, vocab, weight):
    """Block sizes, vocabulary splits and compile options for an [n_rows] x [vocab] grid."""
    if triton_interpreted():
        block_n, block_v, block_h, target_programs = 16, 128, 64, 8
        options = {}
    else:
        block_n = min(64, max(16, triton.next_power_of_2(n_rows)))
        block_v, block_h = 128, 64
        target_programs = 4 * multiprocessors(weight.device)
        # 16-bit 16-row blocks take 4 warps: with 8, sm_90 spills 8 B (python -m emloc_kernels.aot)
        half = weight.element_size() == 2
        options = {"num_warps": 4 if half and block_n <= 16 else 8, "num_stages": 3 if half else 2}
    row_blocks = triton.cdiv(n_rows, block_n)
    vocab_blocks = triton.cdiv(vocab, block_v)
    blocks_per_split = triton.cdiv(vocab_blocks, max(1, target_programs // row_blocks))
    n_splits = triton.cdiv(vocab_blocks, blocks_per_split)  # every split non-empty
    # fp32 tiles must not be rounded to tf32 ("ieee"); fp16/bf16 tiles go to tl.dot as they
    # are (exact products, fp32 accumulation; input_precision only applies to fp32 operands).
    cast_f32 = triton_interpreted() or weight.dtype == torch.float32
    meta = dict(BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, CAST_F32=cast_f32,
                DOT_PRECISION="ieee" if cast_f32 else "tf32", **options)
    return (row_blocks, n_splits), blocks_per_split, meta


def _logsumexp_triton(hidden, weight):
    """Row log-sum-exp of hidden @ weight.T, fp32 [N], without the [N, V] logits."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    grid, blocks_per_split, meta = _launch_config(n_rows, vocab, weight)
    part_max = torch.empty(n_rows, grid[1], dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    _lse_partial_kernel[grid](hidden, weight, part_max, part_sum, n_rows, vocab,
                              hidden.shape[1], hidden.stride(0), hidden.stride(1),
                              weight.stride(0), weight.stride(1), blocks_per_split, **meta)
    row_max = part_max.max(dim=1).values
    return row_max + (part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1).log()


def teacher_logsumexp_triton(hidden, weight):
    """Triton teacher log-sum-exp [N] fp32; validates shapes, dtypes and devices."""
    _check_hidden_weight("hidden", hidden, weight)
    if hidden.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=hidden.device)
    return _logsumexp_triton(hidden, weight)


def lm_head_js_triton(student_hidden, teacher_hidden, weight, teacher_lse):
    """Triton fused lm_head + JS [N] fp32; validates shapes, dtypes and devices."""
    _check_hidden_weight("student_hidden", student_hidden, weight)
    _check_hidden_weight("teacher_hidden", teacher_hidden, weight)
    n_rows = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n_rows:
        raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} rows, student_hidden "
                         f"{n_rows}")
    if teacher_lse.shape != (n_rows,):
        raise ValueError(f"teacher_lse must be [{n_rows}], got {tuple(teacher_lse.shape)}")
    if teacher_lse.dtype != torch.float32:
        raise ValueError(f"teacher_lse must be float32, got {teacher_lse.dtype}")
    if teacher_lse.device != weight.device:
        raise ValueError(f"teacher_lse is on {teacher_lse.device} but weight on {weight.device}")
    if n_rows == 0:
        return torch.empty(0, dtype=torch.float32, device=weight.device)
    student_lse = _logsumexp_triton(student_hidden, weight)
    vocab = weight.shape[0]
    grid, blocks_per_split, meta = _launch_config(n_rows, vocab, weight)
    partial = torch.empty(n_rows, grid[1], dtype=torch.float32, device=weight.device)
    teacher_lse = teacher_lse.contiguous()
    _js_partial_kernel[grid](teacher_hidden, student_hidden, weight, teacher_lse, student_lse,
                             partial, n_rows, vocab, weight.shape[1], teacher_hidden.stride(0),
                             teacher_hidden.stride(1), student_hidden.stride(0),
                             student_hidden.stride(1), weight.stride(0), weight.stride(1),
                             blocks_per_split, **meta)
    return partial.sum(dim=1).clamp_min(0.0)


def teacher_logsumexp(hidden, weight, backend="auto"):
    """Teacher log-sum-exp per row, computed once per chunk. See module doc."""
    if resolve_backend(backend, hidden, weight) == "torch":
        return teacher_logsumexp_reference(hidden, weight)
    return teacher_logsumexp_triton(hidden, weight)


def lm_head_js(student_hidden, teacher_hidden, weight, teacher_lse, backend="auto"):
    """JS divergence per row between teacher and student next-token distributions."""
    if resolve_backend(backend, student_hidden, weight) == "torch":
        return lm_head_js_reference(student_hidden, teacher_hidden, weight, teacher_lse)
    return lm_head_js_triton(student_hidden, teacher_hidden, weight, teacher_lse)


class TeacherJS:
    """JS of student hidden states against a fixed teacher, with teacher statistics computed once.

    teacher_hidden [N, H] and weight [V, H] as above. On the Triton path only the teacher's
    log-sum-exp [N] is kept (the fused kernel recomputes teacher logits tile by tile); on the
    PyTorch path the teacher's log-probabilities [N, V] fp32 are kept, so that each test computes
    only the student's logits (N is the answer positions of one chunk's probe: bounded by the chunk).
    """

    def __init__(self, teacher_hidden, weight, backend="auto"):
        _check_hidden_weight("teacher_hidden", teacher_hidden, weight)
        self.teacher, self.weight = teacher_hidden, weight
        self.backend = resolve_backend(backend, teacher_hidden, weight)
        if self.backend == "torch":
            self.log_p = torch.log_softmax(teacher_hidden.float() @ weight.float().T, dim=-1)
        else:
            self.lse = teacher_logsumexp_triton(teacher_hidden, weight)

    def __call__(self, student_hidden, replicas=1):
        """student_hidden [replicas * N, H] (replica-major) -> JS [replicas * N] fp32."""
        _check_hidden_weight("student_hidden", student_hidden, self.weight)
        if student_hidden.shape[0] != replicas * self.teacher.shape[0]:
            raise ValueError(f"student_hidden has {student_hidden.shape[0]} rows, expected "
                             f"{replicas} replicas x {self.teacher.shape[0]} teacher rows")
        if self.backend == "torch":
            log_q = torch.log_softmax(student_hidden.float() @ self.weight.float().T, dim=-1)
            n, vocab = self.log_p.shape  # broadcast the teacher over replicas (no copy)
            return js_from_log_probs(self.log_p[None], log_q.view(replicas, n, vocab)).reshape(-1)
        return lm_head_js_triton(student_hidden, self.teacher.repeat(replicas, 1), self.weight,
                                 self.lse.repeat(replicas))
