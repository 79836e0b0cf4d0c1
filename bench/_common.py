"""Shared benchmark helpers: timing (median), the device's copy bandwidth and matmul rate,
device description, CSV rows, and the Markdown table of the latest results.

`python bench/_common.py [--device NAME]` prints that table (as in bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# EMLOC_BENCH_CSV redirects the rows (bench/gpu_check.py keeps one run's rows in its folder)
RESULTS_CSV = Path(os.environ.get("EMLOC_BENCH_CSV") or Path(__file__).resolve().parent / "results.csv")
FIELDS = ["date", "device", "torch", "triton", "transformers", "bench", "case", "impl",
          "median_ms", "spread_ms", "metric", "value", "note"]


def device_name(device: str) -> str:
    """Human-readable name of the device the benchmark runs on (CPU: model name, cores and
    the intra-op threads torch uses)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model} x{os.cpu_count()}, {threads} thread{'s' if threads != 1 else ''}"


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


def copy_rate(bench: str, device: str) -> tuple[float, dict]:
    """The device's copy bandwidth: GB/s of a 256 MiB tensor.copy_ (read + write), and its row."""
    src = torch.empty(128 * 2**20, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    median, spread = time_ms(lambda: dst.copy_(src), device)
    gbs = 2 * src.numel() * src.element_size() / median / 1e6
    return gbs, {"bench": bench, "case": "256 MiB", "impl": "copy_", "median_ms": median,
                 "spread_ms": spread, "metric": "GB/s", "value": float(f"{gbs:.4g}"),
                 "note": "device copy bandwidth (read + write)"}


def matmul_rate(bench: str, device: str, dtype: torch.dtype) -> tuple[float, dict]:
    """The device's matmul rate: TFLOP/s of an n x n @ n x n product in dtype (n = 8192 on
    CUDA, 1024 on CPU), and its row."""
    n = 8192 if device.startswith("cuda") else 1024
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(dtype)
    b = torch.randn(n, n, device=device, generator=gen).to(dtype)
    median, spread = time_ms(lambda: a @ b, device)
    tflops = 2 * n**3 / median / 1e9
    name = str(dtype).removeprefix("torch.")
    return tflops, {"bench": bench, "case": f"{n}x{n} {name}", "impl": "matmul",
                    "median_ms": median, "spread_ms": spread, "metric": "TFLOP/s",
                    "value": float(f"{tflops:.4g}"), "note": "device matmul rate"}


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


def latest_table(device: str | None = None) -> str:
    """Markdown table of the latest row per (bench, case, impl) in bench/results.csv for one
    device name (default: the device of the last row), with its versions above."""
    with RESULTS_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "(no results)"
    device = device or rows[-1]["device"]
    latest = {}
    for row in rows:
        if row["device"] == device:
            latest[(row["bench"], row["case"], row["impl"])] = row
    last = list(latest.values())[-1]
    lines = [f"Device: {device}; torch {last['torch']}, triton {last['triton']}, "
             f"transformers {last['transformers']}; last run {last['date']}.", "",
             "| bench | case | impl | median ms | spread ms | metric | value | note |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for row in latest.values():
        median = f"{float(row['median_ms']):.3f}" if row["median_ms"] else ""
        spread = f"{float(row['spread_ms']):.3f}" if row["spread_ms"] else ""
        cells = [row["bench"], row["case"], row["impl"], median, spread, row["metric"],
                 row["value"], row["note"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the latest results table (Markdown).")
    parser.add_argument("--device", default=None, help="device name as in the CSV "
                        "(default: the device of the last row)")
    print(latest_table(parser.parse_args().device))
