"""Benchmark KV compaction: Triton gather-append into a preallocated buffer vs PyTorch.

Qwen2-VL-7B shapes, bf16: 4 KV heads, head_dim 128, chunk of 2k tokens, keep ratios
0.1 / 0.2 / 0.5, a memory buffer of 16k rows that is nearly full (length = 16k - 0.5 * chunk).
Alternatives: torch.gather + torch.cat of the memory and the new rows into a new tensor (what the
EMLoC reference code does: it copies the whole memory every time), and torch.gather + slice
assignment into the buffer (our PyTorch reference). GB/s counts the useful traffic (the new rows
of K and V read once and written once) for every implementation, and is compared with
tensor.copy_ of the same bytes and with a 256 MiB copy_ (the device's copy bandwidth).
--quick: chunk 512, buffer 4k. On CPU only the PyTorch paths run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, copy_rate, time_ms  # noqa: E402

from emloc_kernels.compaction import (gather_append, gather_append_reference,  # noqa: E402
                                      gather_append_triton)

KV_HEADS, HEAD_DIM, DTYPE = 4, 128, torch.bfloat16
KEEP_RATIOS = (0.1, 0.2, 0.5)


def gather_cat(memory_k, memory_v, src_k, src_v, index):
    """EMLoC reference style: gather the kept rows and concatenate into new tensors."""
    gather_index = index[:, :, None].expand(-1, -1, src_k.shape[-1])
    return (torch.cat([memory_k, torch.gather(src_k, 1, gather_index)], dim=1),
            torch.cat([memory_v, torch.gather(src_v, 1, gather_index)], dim=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="chunk 512, buffer 4k")
    args = parser.parse_args(argv)
    device = args.device
    chunk, capacity = (512, 4096) if args.quick else (2048, 16384)
    length = capacity - chunk // 2
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=generator).to(DTYPE)

    src_k, src_v = randn(KV_HEADS, chunk, HEAD_DIM), randn(KV_HEADS, chunk, HEAD_DIM)
    dst_k, dst_v = randn(KV_HEADS, capacity, HEAD_DIM), randn(KV_HEADS, capacity, HEAD_DIM)
    peak_gbs, peak_row = copy_rate("compaction", device)
    rows = [peak_row]
    for ratio in KEEP_RATIOS:
        k = int(ratio * chunk)
        index = torch.stack([torch.randperm(chunk, device=device, generator=generator)[:k]
                             for _ in range(KV_HEADS)]).sort(dim=1).values
        useful_bytes = 2 * 2 * KV_HEADS * k * HEAD_DIM * dst_k.element_size()
        same_src = torch.empty(useful_bytes // 4, dtype=torch.int16, device=device)
        same_dst = torch.empty_like(same_src)
        memory_k, memory_v = dst_k[:, :length], dst_v[:, :length]
        impls = {
            "copy_same_bytes": lambda: same_dst.copy_(same_src),
            "torch_gather_cat": lambda: gather_cat(memory_k, memory_v, src_k, src_v, index),
            "torch_gather_slice": lambda: gather_append_reference(dst_k, dst_v, length,
                                                                  src_k, src_v, index),
        }
        if device.startswith("cuda"):
            impls["triton"] = lambda: gather_append(dst_k, dst_v, length, src_k, src_v, index,
                                                    backend="triton")
            impls["triton_unchecked"] = lambda: gather_append_triton(dst_k, dst_v, length,
                                                                     src_k, src_v, index)
        case = f"Hkv={KV_HEADS} D={HEAD_DIM} Lc={chunk} k={k} len={length} cap={capacity} bf16"
        times = {name: time_ms(fn, device) for name, fn in impls.items()}
        for name, (median, spread) in times.items():
            gbs = useful_bytes / median / 1e6
            rows.append({"bench": "compaction", "case": case, "impl": name, "median_ms": median,
                         "spread_ms": spread, "metric": "GB/s", "value": float(f"{gbs:.4g}"),
                         "note": f"{gbs / peak_gbs:.0%} of peak copy_; "
                                 f"{times['copy_same_bytes'][0] / median:.0%} of copy_ same bytes"})
    append_rows(rows, device)


if __name__ == "__main__":
    main()
