"""Benchmark the fused lm_head + JS divergence and the teacher log-sum-exp vs PyTorch.

Qwen2-VL-7B shapes, bf16: vocabulary 152,064, hidden 3584, N = 200 rows (20 probes x ~10
answer tokens) and 600 (three candidates batched). Alternatives: the full-vocabulary fp32
PyTorch reference (fp32 copy of the weight, [N, V] logits, log_softmax, JS temporaries) and
the same with the logits matmul in the model dtype (bf16 logits, cast to fp32 afterwards).
Reported: median time, extra peak memory over the inputs (torch.cuda.max_memory_allocated),
GB/s of the floor traffic (the weight read once per pass: 2 passes for JS, 1 for the
log-sum-exp) compared with the device's copy bandwidth, and TFLOP/s of the logits matmuls.
--quick (the default on CPU): V 16,384, H 512, N 20 / 60. On CPU only the PyTorch paths run.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, copy_rate, time_ms  # noqa: E402

from emloc_kernels.lm_head_js import (lm_head_js, lm_head_js_reference, teacher_logsumexp,  # noqa: E402
                                      teacher_logsumexp_reference)

DTYPE = torch.bfloat16


def js_native_matmul(student_hidden, teacher_hidden, weight, teacher_lse):
    """PyTorch JS with the logits matmul in the model dtype (what F.linear would give)."""
    log_q = torch.log_softmax((student_hidden @ weight.T).float(), dim=-1)
    log_p = (teacher_hidden @ weight.T).float() - teacher_lse[:, None]
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    js = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
    return js.clamp_min(0.0)


def lse_native_matmul(hidden, weight):
    """PyTorch log-sum-exp of model-dtype logits cast to fp32."""
    return torch.logsumexp((hidden @ weight.T).float(), dim=-1)


def extra_peak_mib(fn, device):
    """Peak memory allocated by fn beyond what was allocated before it (CUDA only)."""
    if not device.startswith("cuda"):
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="V 16,384, H 512, N 20 / 60")
    args = parser.parse_args(argv)
    device = args.device
    on_cuda = device.startswith("cuda")
    quick = args.quick or not on_cuda
    vocab, hidden, row_counts = (16384, 512, (20, 60)) if quick else (152064, 3584, (200, 600))
    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(vocab, hidden, device=device, generator=generator)
              * (4.0 / math.sqrt(hidden))).to(DTYPE)
    weight_bytes = weight.numel() * weight.element_size()

    copy_gbs, copy_row = copy_rate("lm_head_js", device)
    rows = [copy_row]

    for n in row_counts:
        teacher = torch.randn(n, hidden, device=device, generator=generator).to(DTYPE)
        student = (teacher.float() + 0.3 * torch.randn(n, hidden, device=device,
                                                       generator=generator)).to(DTYPE)
        teacher_lse = teacher_logsumexp_reference(teacher, weight)
        ops = {  # op -> (passes over the weight, logits matmuls, {impl: fn})
            "teacher_lse": (1, 1, {
                "torch_fp32_ref": lambda: teacher_logsumexp_reference(teacher, weight),
                "torch_native_matmul": lambda: lse_native_matmul(teacher, weight)}),
            "js": (2, 3, {
                "torch_fp32_ref": lambda: lm_head_js_reference(student, teacher, weight,
                                                               teacher_lse),
                "torch_native_matmul": lambda: js_native_matmul(student, teacher, weight,
                                                                teacher_lse)}),
        }
        if on_cuda:
            ops["teacher_lse"][2]["triton"] = lambda: teacher_logsumexp(teacher, weight,
                                                                        backend="triton")
            ops["js"][2]["triton"] = lambda: lm_head_js(student, teacher, weight, teacher_lse,
                                                        backend="triton")
        for op, (passes, matmuls, impls) in ops.items():
            case = f"{op} N={n} V={vocab} H={hidden} bf16"
            floor_bytes = passes * weight_bytes
            flops = 2 * matmuls * n * vocab * hidden
            reference = impls["torch_fp32_ref"]()
            for impl, fn in impls.items():
                max_err = (fn() - reference).abs().max().item()
                peak = extra_peak_mib(fn, device)
                median, spread = time_ms(fn, device)
                gbs = floor_bytes / median / 1e6
                peak_text = f"{peak:.0f} MiB" if on_cuda else "n/a"
                note = (f"floor {floor_bytes / copy_gbs / 1e6:.3f} ms at copy bandwidth; "
                        f"{gbs / copy_gbs:.0%} of copy GB/s; {flops / median / 1e9:.3g} TFLOP/s; "
                        f"extra peak {peak_text}; max |diff| vs fp32 ref {max_err:.2e}")
                rows.append({"bench": "lm_head_js", "case": case, "impl": impl,
                             "median_ms": median, "spread_ms": spread, "metric": "floor GB/s",
                             "value": float(f"{gbs:.4g}"), "note": note})
    append_rows(rows, device)
    for row in rows[1:]:
        print(f"  {row['case']:>34} {row['impl']:>20}: {row['note']}")


if __name__ == "__main__":
    main()
