"""Benchmark: probe attention + chunk scores (Qwen2-VL-7B shapes).

Implementations, each producing the attention output over memory ⊕ chunk ⊕ own and the
[Hkv, Lc] scores (except sdpa_plain):
    triton        emloc_kernels.probe_scores, two passes (CUDA only)
    dense         the reference: materialised fp32 probabilities, column sums
    sdpa+scores   SDPA with a dense mask over the concatenated keys, plus a PyTorch score pass
                  over the observer rows only
    sdpa_plain    SDPA over the same number of keys, prebuilt and expanded, no mask: the speed
                  target (triton should be within 1.3x of it); computes no scores
Metric: attention TFLOP/s, 4 * B * Hq * L * (M + Lc + L) * D / time (causal savings ignored),
also given as a fraction of the device's matmul rate in the dtype.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, matmul_rate, time_ms  # noqa: E402

from emloc_kernels.probe_scores import probe_scores, probe_scores_reference  # noqa: E402

HQ, HKV, HEAD_DIM = 28, 4, 128  # Qwen2-VL-7B


def make_inputs(B, L, M, Lc, dtype, device, seed=0):
    """Random probe inputs; rows right-padded to 2/3..1 of L; observers: last fifth of a row."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    lengths = torch.randint(2 * L // 3, L + 1, (B,), generator=gen)
    positions = torch.arange(L)[None, :]
    own_valid = positions < lengths[:, None]
    observer = own_valid & (positions >= lengths[:, None] - max(1, L // 5))
    return dict(q=rand(B, HQ, L, HEAD_DIM), mem_k=rand(HKV, M, HEAD_DIM),
                mem_v=rand(HKV, M, HEAD_DIM), chunk_k=rand(HKV, Lc, HEAD_DIM),
                chunk_v=rand(HKV, Lc, HEAD_DIM), own_k=rand(B, HKV, L, HEAD_DIM),
                own_v=rand(B, HKV, L, HEAD_DIM), own_valid=own_valid.to(device),
                observer=observer.to(device))


def sdpa_with_scores(q, mem_k, mem_v, chunk_k, chunk_v, own_k, own_v, own_valid, observer,
                     scale):
    """What a user would write: SDPA with a dense mask, then scores over observer rows."""
    B, Hq, L, D = q.shape
    Hkv, M, Lc = own_k.shape[1], mem_k.shape[1], chunk_k.shape[1]
    G = Hq // Hkv
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()[None]
    own_ok = causal & own_valid[:, None, :]  # [B, L, L]
    keys = torch.cat([mem_k.expand(B, -1, -1, -1), chunk_k.expand(B, -1, -1, -1), own_k], 2)
    values = torch.cat([mem_v.expand(B, -1, -1, -1), chunk_v.expand(B, -1, -1, -1), own_v], 2)
    mask = torch.cat([own_ok.new_ones(B, L, M + Lc), own_ok], dim=-1)[:, None]
    out = F.scaled_dot_product_attention(q, keys.repeat_interleave(G, 1),
                                         values.repeat_interleave(G, 1), attn_mask=mask,
                                         scale=scale)
    b_idx, i_idx = observer.nonzero(as_tuple=True)
    q_obs = q.permute(0, 2, 1, 3)[b_idx, i_idx].reshape(-1, Hkv, G, D).float()
    s_chunk = torch.einsum("nhgd,hmd->nhgm", q_obs, chunk_k.float()) * scale
    s_own = torch.einsum("nhgd,nhkd->nhgk", q_obs, own_k[b_idx].float()) * scale
    s_own = s_own.masked_fill(~own_ok[b_idx, i_idx][:, None, None], float("-inf"))
    lse = torch.logsumexp(torch.cat([s_chunk, s_own], dim=-1), dim=-1, keepdim=True)
    scores = torch.exp(s_chunk - lse).sum(dim=(0, 2))
    return out, scores


def plain_sdpa_inputs(x):
    """Keys/values of the same length, expanded to every query head, for an unmasked SDPA."""
    B, _, L, _ = x["q"].shape

    def full(mem, chunk, own):
        cat = torch.cat([mem.expand(B, -1, -1, -1), chunk.expand(B, -1, -1, -1), own], dim=2)
        return cat.repeat_interleave(HQ // HKV, dim=1).contiguous()

    return (full(x["mem_k"], x["chunk_k"], x["own_k"]),
            full(x["mem_v"], x["chunk_v"], x["own_v"]))


def triton_error(x, scale):
    """Max |out - reference| and max relative score error of the Triton path, as text."""
    out, scores = probe_scores(**x, scale=scale, backend="triton")
    ref_out, ref_scores = probe_scores_reference(**x, scale=scale)
    out_err = (out.float() - ref_out.float()).abs().max().item()
    score_err = ((scores - ref_scores).abs() / ref_scores.abs().clamp_min(1e-6)).max().item()
    return f"max |out err| {out_err:.2e}, max score rel err {score_err:.2e}"


def run_case(B, L, M, Lc, dtype, device, peak_tflops):
    """Time every implementation on one shape; return result rows."""
    x = make_inputs(B, L, M, Lc, dtype, device)
    scale = HEAD_DIM ** -0.5
    flops = 4 * B * HQ * L * (M + Lc + L) * HEAD_DIM
    keys, values = plain_sdpa_inputs(x)
    impls = {
        "dense": lambda: probe_scores_reference(**x, scale=scale),
        "sdpa+scores": lambda: sdpa_with_scores(**x, scale=scale),
        "sdpa_plain": lambda: F.scaled_dot_product_attention(x["q"], keys, values, scale=scale),
    }
    if device.startswith("cuda"):
        impls["triton"] = lambda: probe_scores(**x, scale=scale, backend="triton")
    case = f"B{B} L{L} M{M} Lc{Lc} {str(dtype).removeprefix('torch.')}"
    rows, medians, notes = [], {}, {}
    if "triton" in impls:
        notes["triton"] = triton_error(x, scale)
    for name, fn in impls.items():
        try:
            median, spread = time_ms(fn, device)
        except torch.OutOfMemoryError:
            rows.append({"bench": "probe_scores", "case": case, "impl": name, "note": "oom"})
            continue
        finally:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        medians[name] = median
        rows.append({"bench": "probe_scores", "case": case, "impl": name, "median_ms": median,
                     "spread_ms": spread, "metric": "TFLOP/s",
                     "value": float(f"{flops / median / 1e9:.4g}")})
    for row in rows:
        if row["impl"] in medians and "sdpa_plain" in medians:
            ratio = f"{medians[row['impl']] / medians['sdpa_plain']:.2f}x sdpa_plain time"
            share = f"{row['value'] / peak_tflops:.1%} of device"
            row["note"] = "; ".join(filter(None, [ratio, share, notes.get(row["impl"])]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes (always used on CPU, where only PyTorch paths run)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_cuda else "float32"))
    if args.quick or not on_cuda:
        shapes = [(4, 32, M, 256) for M in (0, 1024)]
    else:  # probe of 20 rows x 90 tokens after a 2k chunk, memory 0..16k
        shapes = [(20, 90, M, 2048) for M in (0, 4096, 16384)]
    peak_tflops, peak_row = matmul_rate("probe_scores", args.device, dtype)
    rows = [peak_row]
    for B, L, M, Lc in shapes:
        rows += run_case(B, L, M, Lc, dtype, args.device, peak_tflops)
    append_rows(rows, args.device)


if __name__ == "__main__":
    main()
