"""KV compaction: gather chosen chunk rows per head and append them to a per-layer buffer.

    dst_k/v [Hkv, capacity, D]  preallocated buffer; rows [0, length) are already in use
    length  int                 rows in use
    src_k/v [Hkv, Lc, D]        the chunk's keys/values
    index   [Hkv, k] int64      chosen rows of src per head (each in [0, Lc))
Writes dst[h, length + j] = src[h, index[h, j]] in place and returns length + k. Rows below
`length` are never touched. Raises ValueError when capacity < length + k, and on mismatched
shapes, dtypes or devices, or an index of the wrong dtype or out of range (checking the range
costs one device sync).

Triton path: one launch copies K and V together; every row is copied as raw bits (the tensors
are viewed as same-width integers), so any dtype is moved bit-exactly.
"""
from __future__ import annotations

from numbers import Integral

import torch
import triton
import triton.language as tl

from ._backend import resolve_backend

BLOCK_ROWS = 16  # gathered rows per program
BLOCK_D_MAX = 256  # feature columns per loop step

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def gather_append_reference(dst_k, dst_v, length, src_k, src_v, index):
    """Plain PyTorch gather + slice assignment."""
    k = index.shape[1]
    gather_index = index[:, :, None].expand(-1, -1, src_k.shape[-1])
    dst_k[:, length:length + k] = torch.gather(src_k, 1, gather_index)
    dst_v[:, length:length + k] = torch.gather(src_v, 1, gather_index)
    return length + k


@triton.jit
def _gather_append_kernel(src_k_ptr, src_v_ptr, dst_k_ptr, dst_v_ptr, index_ptr, length, k,
                          head_dim, stride_index_h,
                          stride_sk_h, stride_sk_l, stride_sv_h, stride_sv_l,
                          stride_dk_h, stride_dk_l, stride_dv_h, stride_dv_l,
                          BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [j0, j0 + BLOCK_ROWS) of one head: dst[h, length + j] = src[h, index[h, j]].

    The last dimension of every src/dst tensor has stride 1.
    """
    head = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < k
    src_rows = tl.load(index_ptr + head * stride_index_h + rows, mask=row_ok, other=0)
    dst_rows = (length + rows).to(tl.int64)
    for d_start in range(0, head_dim, BLOCK_D):
        cols = d_start + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < head_dim)[None, :]
        key = tl.load(src_k_ptr + head * stride_sk_h + src_rows[:, None] * stride_sk_l
                      + cols[None, :], mask=mask)
        tl.store(dst_k_ptr + head * stride_dk_h + dst_rows[:, None] * stride_dk_l
                 + cols[None, :], key, mask=mask)
        value = tl.load(src_v_ptr + head * stride_sv_h + src_rows[:, None] * stride_sv_l
                        + cols[None, :], mask=mask)
        tl.store(dst_v_ptr + head * stride_dv_h + dst_rows[:, None] * stride_dv_l
                 + cols[None, :], value, mask=mask)


def _check_inputs(dst_k, dst_v, length, src_k, src_v, index):
    """Raise ValueError on malformed arguments (index range included: one device sync)."""
    if dst_k.dim() != 3 or dst_k.shape != dst_v.shape:
        raise ValueError(f"dst_k/dst_v must both be [Hkv, capacity, D], got "
                         f"{tuple(dst_k.shape)} and {tuple(dst_v.shape)}")
    if src_k.dim() != 3 or src_k.shape != src_v.shape:
        raise ValueError(f"src_k/src_v must both be [Hkv, Lc, D], got "
                         f"{tuple(src_k.shape)} and {tuple(src_v.shape)}")
    heads, capacity, head_dim = dst_k.shape
    if src_k.shape[0] != heads or src_k.shape[2] != head_dim:
        raise ValueError(f"src {tuple(src_k.shape)} does not match dst {tuple(dst_k.shape)} "
                         f"in heads or head_dim")
    if len({dst_k.dtype, dst_v.dtype, src_k.dtype, src_v.dtype}) != 1:
        raise ValueError(f"dtypes differ: dst {dst_k.dtype}/{dst_v.dtype}, "
                         f"src {src_k.dtype}/{src_v.dtype}")
    if index.dtype != torch.int64 or index.dim() != 2 or index.shape[0] != heads:
        raise ValueError(f"index must be int64 [Hkv={heads}, k], got {index.dtype} "
                         f"{tuple(index.shape)}")
    if len({t.device for t in (dst_k, dst_v, src_k, src_v, index)}) != 1:
        raise ValueError("dst, src and index must be on one device")
    if isinstance(length, bool) or not isinstance(length, Integral) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    if capacity < length + index.shape[1]:
        raise ValueError(f"buffer capacity {capacity} < {length} + {index.shape[1]} rows")
    if index.numel() and not bool(((index >= 0) & (index < src_k.shape[1])).all()):
        raise ValueError(f"index values must lie in [0, Lc={src_k.shape[1]})")


def _as_bits(t):
    """View t as same-width integers with a unit last stride (copying only if it is not)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.view(_BITS_DTYPE[t.element_size()])


def gather_append_triton(dst_k, dst_v, length, src_k, src_v, index):
    """Triton gather-append; arguments already checked (index range included)."""
    heads, k = index.shape
    head_dim = dst_k.shape[2]
    if heads == 0 or k == 0 or head_dim == 0:
        return length + k
    if dst_k.stride(-1) != 1 or dst_v.stride(-1) != 1:
        raise ValueError("dst_k/dst_v need a unit stride on the last dimension (written in place)")
    src_k, src_v = _as_bits(src_k), _as_bits(src_v)
    bits_k, bits_v = _as_bits(dst_k), _as_bits(dst_v)
    index = index.contiguous()
    _gather_append_kernel[(heads, triton.cdiv(k, BLOCK_ROWS))](
        src_k, src_v, bits_k, bits_v, index, length, k, head_dim, index.stride(0),
        src_k.stride(0), src_k.stride(1), src_v.stride(0), src_v.stride(1),
        bits_k.stride(0), bits_k.stride(1), bits_v.stride(0), bits_v.stride(1),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=min(BLOCK_D_MAX, triton.next_power_of_2(head_dim)))
    return length + k


def gather_append(dst_k, dst_v, length, src_k, src_v, index, backend="auto"):
    """Append src rows chosen by index (per head) after row `length` of dst. See module doc."""
    _check_inputs(dst_k, dst_v, length, src_k, src_v, index)
    length = int(length)
    if resolve_backend(backend, dst_k, src_k) == "torch":
        return gather_append_reference(dst_k, dst_v, length, src_k, src_v, index)
    return gather_append_triton(dst_k, dst_v, length, src_k, src_v, index)
