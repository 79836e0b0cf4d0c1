"""Token ranking (EMLoC step 3-4): smoothing, protection bonus, top-k for several k at once.

    scores    [Hkv, Lc] float  raw importance per KV head and chunk token (finite values)
    protected [Lc] bool        the chunk's answer-span tokens
    ks        sequence of int  candidate sizes, each in [1, Lc]
Smoothing: mean pool of width `pool_width` (odd), stride 1, zero padding counted in the mean
(the tokens at each end are damped), computed in fp32 as the sum of the `pool_width`
neighbours in increasing position order, correctly rounded division by `pool_width`
(bit-identical to F.avg_pool1d(count_include_pad=True) on CPU; written out so that every
device and the kernel round alike: ranks, and so ties, depend on the last bit).
Then `bonus` is added at protected positions.
Ranking: higher smoothed score first; ties go to the lower position (deterministic).
Returns one int64 tensor [Hkv, k] per k, the chosen positions in increasing order.

Triton path: `_rank_kernel` gives every position its rank (the number of positions that beat
it; O(Lc^2) comparisons per head, tiled), then `_select_kernel` keeps, for one k, the positions
of rank < k in position order by a prefix sum. One ranking serves every k.
"""
from __future__ import annotations

from numbers import Integral
from typing import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._backend import resolve_backend

RANK_BLOCK_T = 32  # positions ranked per program
RANK_BLOCK_U = 128  # positions compared against per loop step
SELECT_BLOCK_MAX = 1024  # positions scanned per loop step of the selection


def smooth_scores_reference(scores, protected, pool_width=5, bonus=100.0):
    """Mean-pool (zero padding counted) and add the protection bonus; fp32 [Hkv, Lc]."""
    length = scores.shape[-1]
    padded = F.pad(scores.float(), (pool_width // 2, pool_width // 2))
    total = padded[:, 0:length]
    for offset in range(1, pool_width):
        total = total + padded[:, offset:offset + length]
    # Divide by a tensor: CUDA turns division by a Python scalar into a product with its
    # reciprocal, which can round differently from the correctly rounded quotient.
    return total / total.new_full((), pool_width) + bonus * protected.float()[None, :]


def rank_tokens_reference(scores, protected, ks, pool_width=5, bonus=100.0):
    """Plain PyTorch ranking: stable descending sort, prefixes re-sorted by position."""
    smoothed = smooth_scores_reference(scores, protected, pool_width, bonus)
    order = torch.sort(-smoothed, dim=-1, stable=True).indices
    return [torch.sort(order[:, :k], dim=-1).values for k in ks]


@triton.jit
def _smoothed(row_ptr, stride_l, protected_ptr, pos, length, bonus, POOL_WIDTH: tl.constexpr):
    """fp32 smoothed scores at positions `pos` (meaningless at pos >= length: mask them).

    Same rounding as smooth_scores_reference: left-to-right sum of the neighbours (zero
    outside [0, length)), correctly rounded division, then + bonus where protected.
    """
    first = pos - POOL_WIDTH // 2
    total = tl.load(row_ptr + first * stride_l, mask=(first >= 0) & (first < length),
                    other=0.0).to(tl.float32)
    for offset in tl.static_range(1, POOL_WIDTH):
        neighbour = first + offset
        total = total + tl.load(row_ptr + neighbour * stride_l,
                                mask=(neighbour >= 0) & (neighbour < length),
                                other=0.0).to(tl.float32)
    is_protected = tl.load(protected_ptr + pos, mask=pos < length, other=0) != 0
    return tl.math.div_rn(total, POOL_WIDTH * 1.0) + tl.where(is_protected, bonus, 0.0)


@triton.jit
def _rank_kernel(scores_ptr, protected_ptr, rank_ptr, length, stride_h, stride_l, bonus,
                 POOL_WIDTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """rank[h, t] = #{u: s[u] > s[t]} + #{u < t: s[u] == s[t]} for a block of positions t."""
    head = tl.program_id(0).to(tl.int64)
    row_ptr = scores_ptr + head * stride_h
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    s_t = _smoothed(row_ptr, stride_l, protected_ptr, t, length, bonus, POOL_WIDTH)
    rank = tl.zeros([BLOCK_T], dtype=tl.int32)
    for u_start in range(0, length, BLOCK_U):
        u = u_start + tl.arange(0, BLOCK_U)
        s_u = _smoothed(row_ptr, stride_l, protected_ptr, u, length, bonus, POOL_WIDTH)
        beats = (s_u[None, :] > s_t[:, None]) | (
            (s_u[None, :] == s_t[:, None]) & (u[None, :] < t[:, None]))
        beats = beats & (u < length)[None, :]
        rank += tl.sum(beats.to(tl.int32), axis=1)
    tl.store(rank_ptr + head * length + t, rank, mask=t < length)


@triton.jit
def _select_kernel(rank_ptr, out_ptr, length, k, BLOCK: tl.constexpr):
    """out[h, :] = the positions t with rank[h, t] < k, in increasing order."""
    head = tl.program_id(0).to(tl.int64)
    written = tl.zeros([BLOCK], dtype=tl.int32)  # same count in every lane
    for start in range(0, length, BLOCK):
        t = start + tl.arange(0, BLOCK)
        rank = tl.load(rank_ptr + head * length + t, mask=t < length, other=length)
        chosen = (rank < k).to(tl.int32)
        slot = written + tl.cumsum(chosen, axis=0) - 1
        tl.store(out_ptr + head * k + slot, t.to(tl.int64), mask=chosen != 0)
        written += tl.sum(chosen, axis=0)


def _check_inputs(scores, protected, ks, pool_width):
    """Raise ValueError on malformed arguments; return ks as a list of Python ints."""
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating [Hkv, Lc] tensor, got {scores.dtype} "
                         f"{tuple(scores.shape)}")
    length = scores.shape[1]
    if protected.dtype != torch.bool or protected.shape != (length,):
        raise ValueError(f"protected must be a bool [Lc={length}] tensor, got {protected.dtype} "
                         f"{tuple(protected.shape)}")
    if protected.device != scores.device:
        raise ValueError(f"protected is on {protected.device}, scores on {scores.device}")
    if isinstance(pool_width, bool) or not isinstance(pool_width, Integral) or pool_width < 1 \
            or pool_width % 2 == 0:
        raise ValueError(f"pool_width must be a positive odd int, got {pool_width!r}")
    ks = list(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= length:
            raise ValueError(f"every k must be an int in [1, Lc={length}], got {k!r}")
    return [int(k) for k in ks]


def rank_tokens_triton(scores, protected, ks, pool_width=5, bonus=100.0):
    """Triton ranking; arguments already checked. One rank launch, one selection per k."""
    heads, length = scores.shape
    outs = [torch.empty((heads, k), dtype=torch.int64, device=scores.device) for k in ks]
    if not outs or heads == 0:
        return outs
    rank = torch.empty((heads, length), dtype=torch.int32, device=scores.device)
    _rank_kernel[(heads, triton.cdiv(length, RANK_BLOCK_T))](
        scores, protected.view(torch.uint8), rank, length, scores.stride(0), scores.stride(1),
        float(bonus), POOL_WIDTH=pool_width, BLOCK_T=RANK_BLOCK_T, BLOCK_U=RANK_BLOCK_U)
    block = min(SELECT_BLOCK_MAX, triton.next_power_of_2(length))
    for k, out in zip(ks, outs):
        _select_kernel[(heads,)](rank, out, length, k, BLOCK=block)
    return outs


def rank_tokens(scores, protected, ks: Sequence[int], pool_width=5, bonus=100.0, backend="auto"):
    """Per KV head, the top-k positions for each k in ks, in position order. See module doc."""
    ks = _check_inputs(scores, protected, ks, pool_width)
    if resolve_backend(backend, scores, protected) == "torch":
        return rank_tokens_reference(scores, protected, ks, pool_width, bonus)
    return rank_tokens_triton(scores, protected.contiguous(), ks, int(pool_width), bonus)
