"""Benchmark: prefix attention (GQA-native, memory read in place) against what transformers runs.

Shapes of Qwen2-VL-7B (28 query heads, 4 KV heads, head_dim 128):
  prefill  a 2k-token chunk (causal own keys) over a memory of 0..16k tokens: TFLOP/s
  decode   one new token per row, batch 1 and 8 (left-padded own keys), memory 2k..16k:
           GB/s against the bytes of K/V read (memory once + each row's own keys)
Implementations:
  triton          emloc_kernels.prefix_attention (CUDA only)
  sdpa_repeat_kv  transformers' SDPA path: memory expanded to the batch and concatenated with
                  the own keys (held by the cache, not timed), repeat_kv, a dense boolean mask
  sdpa_gqa        the same keys and mask, SDPA with enable_gqa=True instead of repeat_kv
  reference       prefix_attention_reference (dense fp32 scores)
Prefill TFLOP/s is also given as a fraction of the device's matmul rate in the dtype, decode GB/s
as a fraction of its copy bandwidth (the target on a GPU: decode at >= 80% of it).
On CPU only the PyTorch paths run, on small shapes (--quick is implied).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, copy_rate, matmul_rate, time_ms  # noqa: E402

from emloc_kernels.prefix_attention import (prefix_attention,  # noqa: E402
                                            prefix_attention_reference)

HQ, HKV, D = 28, 4, 128


def make_case(B, Lq, Lk, M, dtype, device, seed=0):
    """Random q, memory, own K/V and own_valid (row b left-padded by 7 * b tokens)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    q = rand(B, HQ, Lq, D)
    mem_k, mem_v = rand(HKV, M, D), rand(HKV, M, D)
    own_k, own_v = rand(B, HKV, Lk, D), rand(B, HKV, Lk, D)
    valid = torch.ones(B, Lk, dtype=torch.bool, device=device)
    for b in range(B):
        valid[b, :min(7 * b, Lk - 1)] = False
    return q, mem_k, mem_v, own_k, own_v, valid


def transformers_layout(q, mem_k, mem_v, own_k, own_v, valid):
    """What a transformers cache holds: memory expanded to the batch and concatenated with the
    own keys [B, Hkv, M + Lk, D], plus the dense boolean mask [B, 1, Lq, M + Lk]."""
    B, _, Lq, _ = q.shape
    M, Lk = mem_k.shape[1], own_k.shape[2]
    keys = torch.cat([mem_k[None].expand(B, -1, -1, -1), own_k], dim=2)
    values = torch.cat([mem_v[None].expand(B, -1, -1, -1), own_v], dim=2)
    causal = (torch.arange(Lk, device=q.device)[None, :]
              <= (torch.arange(Lq, device=q.device) + Lk - Lq)[:, None])
    own_mask = causal[None] & valid[:, None, :]
    mask = torch.cat([torch.ones(B, Lq, M, dtype=torch.bool, device=q.device), own_mask], dim=2)
    return keys, values, mask[:, None]


def repeat_kv(x, groups):
    """transformers' repeat_kv: [B, Hkv, T, D] -> [B, Hkv * groups, T, D] (a copy)."""
    B, H, T, Dh = x.shape
    return x[:, :, None].expand(B, H, groups, T, Dh).reshape(B, H * groups, T, Dh)


def implementations(inputs, device):
    """name -> zero-argument callable computing the attention output."""
    q = inputs[0]
    keys, values, mask = transformers_layout(*inputs)
    groups = HQ // HKV
    impls = {
        "sdpa_repeat_kv": lambda: F.scaled_dot_product_attention(
            q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=mask),
        "sdpa_gqa": lambda: F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=True),
        "reference": lambda: prefix_attention_reference(*inputs, D ** -0.5),
    }
    if device.startswith("cuda"):
        impls = {"triton": lambda: prefix_attention(*inputs, backend="triton"), **impls}
    return impls


def run_case(bench, case, inputs, device, metric, amount, peak):
    """Time every implementation on one case; metric value = amount / time, also given in the
    note as a fraction of `peak` (the device's rate in the same unit)."""
    expected = prefix_attention_reference(*inputs, D ** -0.5).float()
    rows, base_ms = [], None
    for name, fn in implementations(inputs, device).items():
        try:
            err = (fn().float() - expected).abs().max().item()
            median, spread = time_ms(fn, device)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(bench=bench, case=case, impl=name, note="out of memory"))
            continue
        base_ms = median if name == "sdpa_repeat_kv" else base_ms
        rate = amount / (median * 1e-3)
        rows.append(dict(bench=bench, case=case, impl=name, median_ms=median, spread_ms=spread,
                         metric=metric, value=float(f"{rate:.4g}"),
                         note=f"{rate / peak:.1%} of device; max_abs_err={err:.2e}"))
    for row in rows:
        if base_ms and "median_ms" in row:
            row["note"] += f" speedup_vs_sdpa_repeat_kv={base_ms / row['median_ms']:.2f}x"
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    itemsize = torch.finfo(dtype).bits // 8
    if args.quick or not cuda:
        chunk, memories, own_len, decode_memories = 256, (0, 512, 2048), 32, (512, 2048)
    else:
        chunk, memories, own_len, decode_memories = 2048, (0, 2048, 4096, 8192, 16384), 128, \
            (2048, 4096, 8192, 16384)

    copy_gbs, copy_row = copy_rate("prefix_attn", args.device)
    matmul_tflops, matmul_row = matmul_rate("prefix_attn", args.device, dtype)
    rows = [copy_row, matmul_row]
    for M in memories:
        inputs = make_case(1, chunk, chunk, M, dtype, args.device)
        flops = 4 * HQ * D * (chunk * M + chunk * (chunk + 1) // 2)
        rows += run_case("prefix_attn", f"prefill L={chunk} M={M}", inputs, args.device,
                         "TFLOP/s", flops / 1e12, matmul_tflops)
    for B in (1, 8):
        for M in decode_memories:
            inputs = make_case(B, 1, own_len, M, dtype, args.device)
            kv_bytes = 2 * HKV * D * (M + B * own_len) * itemsize
            rows += run_case("prefix_attn", f"decode B={B} Lk={own_len} M={M}", inputs,
                             args.device, "GB/s(K/V)", kv_bytes / 1e9, copy_gbs)
    append_rows(rows, args.device)


if __name__ == "__main__":
    main()
