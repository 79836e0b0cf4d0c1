"""Benchmark token ranking: Triton rank_tokens vs the PyTorch ways to get the same candidates.

Qwen2-VL-7B shapes: 4 KV heads, chunk of 2k tokens (8k without --quick as a long multimodal
chunk), keep ratios 0.1 / 0.2 / 0.5, about 10% protected (answer-span) tokens.
Alternatives: avg_pool1d + torch.topk(k_max) + a sort of each prefix (what a user would write;
its tie order is unspecified), and the stable-sort reference (the exact tie rule).
On CPU only the PyTorch paths run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, time_ms  # noqa: E402

from emloc_kernels.ranking import rank_tokens, rank_tokens_reference  # noqa: E402

KV_HEADS = 4
KEEP_RATIOS = (0.1, 0.2, 0.5)


def rank_with_topk(scores, protected, ks, pool_width=5, bonus=100.0):
    """avg_pool1d + bonus, one topk for the largest k, each prefix sorted by position."""
    pooled = F.avg_pool1d(scores[:, None, :], pool_width, stride=1, padding=pool_width // 2,
                          count_include_pad=True)[:, 0, :]
    smoothed = pooled + bonus * protected.float()
    order = torch.topk(smoothed, max(ks), dim=-1, sorted=True).indices
    return [torch.sort(order[:, :k], dim=-1).values for k in ks]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the 2k-token chunk")
    args = parser.parse_args(argv)
    device = args.device
    generator = torch.Generator(device=device).manual_seed(0)

    rows = []
    for chunk in (2048,) if args.quick else (2048, 8192):
        scores = torch.rand(KV_HEADS, chunk, device=device, generator=generator)
        protected = torch.rand(chunk, device=device, generator=generator) < 0.1
        ks = [int(r * chunk) for r in KEEP_RATIOS]
        case = f"Hkv={KV_HEADS} Lc={chunk} ks={ks}"
        impls = {"torch_topk": lambda: rank_with_topk(scores, protected, ks),
                 "torch_stable_sort": lambda: rank_tokens_reference(scores, protected, ks)}
        if device.startswith("cuda"):
            impls["triton"] = lambda: rank_tokens(scores, protected, ks, backend="triton")
        times = {name: time_ms(fn, device) for name, fn in impls.items()}
        for name, (median, spread) in times.items():
            rows.append({"bench": "ranking", "case": case, "impl": name, "median_ms": median,
                         "spread_ms": spread, "metric": "speedup_vs_torch_topk",
                         "value": round(times["torch_topk"][0] / median, 3)})
    append_rows(rows, device)


if __name__ == "__main__":
    main()
