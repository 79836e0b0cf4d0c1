"""Shared benchmark helpers: timing (median), device description, CSV rows."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_CSV = Path(__file__).resolve().parent / "results.csv"
FIELDS = ["date", "device", "torch", "triton", "transformers", "bench", "case", "impl",
          "median_ms", "spread_ms", "metric", "value", "note"]


def device_name(device: str) -> str:
    """Human-readable name of the device the benchmark runs on."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def versions() -> dict:
    import transformers
    import triton
    return {"torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__}


def time_ms(fn, device: str, repeats: int = 5) -> tuple[float, float]:
    """Median and spread (max - min) in ms. CUDA: triton.testing.do_bench; CPU: wall clock."""
    if device.startswith("cuda"):
        import triton.testing
        times = triton.testing.do_bench(fn, return_mode="all")
        return statistics.median(times), max(times) - min(times)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), max(times) - min(times)


def append_rows(rows: list[dict], device: str) -> None:
    """Append result rows (dicts with FIELDS keys) to bench/results.csv and print them."""
    new = not RESULTS_CSV.exists()
    stamp = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
             "device": device_name(device), **versions()}
    with RESULTS_CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**stamp, **row})
    for row in rows:
        print(f"{row.get('bench', ''):>16} {row.get('case', ''):>28} {row.get('impl', ''):>20} "
              f"{row.get('median_ms', float('nan')):10.3f} ms  ±{row.get('spread_ms', 0):.3f}  "
              f"{row.get('metric', '')} {row.get('value', '')}")
