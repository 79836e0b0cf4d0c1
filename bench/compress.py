"""Compression cost: forward-equivalents, the method's floor, peak memory, layer groups.

    python bench/compress.py [--demos 32] [--peak-demos 16 32 64 128] [--layer-groups 1 2 4 7]
                             [--repeats 3] [--queries 12] [--quick]
    emloc bench compress [same arguments]

On the bundled SmolLM2-135M (CPU) with the shipped capitals task:
- forward-equivalents: compression wall time / wall time of one plain forward of the whole
  uncompressed context (same model, same run); per chunk: chunk seconds / plain forward of
  that chunk alone;
- floor: token-layer passes that the method's own decisions imply (prefill + probe + each
  test rerunning the probe from its layer to the top) / those of one plain prefill;
  overhead = measured / floor;
- peak memory: the highest RSS sampled while compressing, in a fresh process per demo count,
  above the RSS before compressing (model loaded), against the memory's own size;
- layer_group 1, 2, 4, 7: cost, compression, and JS of the first answer token to the full context.
Results are printed and appended to bench/results.csv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows  # noqa: E402
from _rss import current_rss, peak_rss_growth  # noqa: E402
from fidelity import js_divergence  # noqa: E402

import emloc  # noqa: E402
from emloc.cli.demo import SYSTEM, load_task  # noqa: E402
from emloc.models import load_model  # noqa: E402


def median_spread(values):
    return statistics.median(values), max(values) - min(values)


def plain_forward_seconds(model, ids: list, repeats: int) -> list:
    """Wall times of model(input_ids) on one sequence, no cache."""
    x = torch.tensor([ids])
    times = []
    with torch.inference_mode():
        model(input_ids=x)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=x)
            times.append(time.perf_counter() - t0)
    return times


def floor_passes(memory, probe_tokens: list, n_layers: int) -> list:
    """Per chunk, the token-layer passes implied by the decisions, in plain chunk prefills."""
    floors = []
    for chunk, probe in zip(memory.stats, probe_tokens):
        passes = n_layers * chunk["tokens"] + n_layers * probe
        for d in chunk["layers"]:
            passes += d["tests"] * (n_layers - d["layer"]) * probe
        floors.append(passes / (n_layers * chunk["tokens"]))
    return floors


def first_token_js(comp, memory, full_comp, full_memory, queries) -> float:
    """Mean JS (nats) between the first answer token's distributions of memory and full context."""
    log_p = torch.stack([comp.logits(memory, q)[0].double().log_softmax(-1) for q in queries])
    log_r = torch.stack([full_comp.logits(full_memory, q)[0].double().log_softmax(-1) for q in queries])
    return float(js_divergence(log_p, log_r).mean())


def cost_table(model, tokenizer, demos, queries, groups, repeats) -> list:
    """Time, floor and fidelity per layer_group, all in this process, side by side."""
    n_layers = model.config.num_hidden_layers
    full_comp = emloc.EMLoC(model, tokenizer, method="full", progress=False)
    full_memory = full_comp.compress(demos, system=SYSTEM)
    chunks, probes = full_comp._chunks(demos, SYSTEM)
    context_ids = [t for c in chunks for t in c.ids]
    probe_tokens = [sum(len(r.ids) for r in rows) for rows in probes]
    rows = []
    for group in groups:
        comp = emloc.EMLoC(model, tokenizer, layer_group=group, progress=False)
        seconds, per_chunk = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            memory = comp.compress(demos, system=SYSTEM)
            seconds.append(time.perf_counter() - t0)
            per_chunk.append([c["seconds"] for c in memory.stats])
        # the plain forwards are timed right after, in the same conditions
        whole = plain_forward_seconds(model, context_ids, repeats)
        chunk_plain = [statistics.median(plain_forward_seconds(model, c.ids, repeats)) for c in chunks]
        floors = floor_passes(memory, probe_tokens, n_layers)
        chunk_fe = [statistics.median(t[i] for t in per_chunk) / chunk_plain[i] for i in range(len(chunks))]
        whole_floor = sum(f * c["tokens"] for f, c in zip(floors, memory.stats)) / sum(c["tokens"] for c in memory.stats)
        fe, fe_spread = median_spread([s / statistics.median(whole) for s in seconds])
        rows.append({
            "layer_group": group, "compress_s": statistics.median(seconds),
            "compress_spread_s": max(seconds) - min(seconds), "plain_forward_s": statistics.median(whole),
            "forward_equivalents": fe, "fe_spread": fe_spread, "floor": whole_floor,
            "overhead": fe / whole_floor, "chunk_fe_median": statistics.median(chunk_fe),
            "chunk_floor_median": statistics.median(floors),
            "chunk_overhead_median": statistics.median(f / fl for f, fl in zip(chunk_fe, floors)),
            "tests_per_chunk": statistics.mean(sum(d["tests"] for d in c["layers"]) for c in memory.stats),
            "compression": memory.compression_ratio,
            "js_to_full": first_token_js(comp, memory, full_comp, full_memory, queries),
        })
    return rows


def peak_child(n_demos: int) -> None:
    """Compress n_demos in this (fresh) process; print as JSON the RSS before compressing, the
    highest RSS sampled every 5 ms while compressing, and the memory's own size."""
    model, tokenizer = load_model()
    comp = emloc.EMLoC(model, tokenizer, progress=False)
    demos = load_task()[:n_demos]
    before = current_rss()
    memory, growth = peak_rss_growth(lambda: comp.compress(demos, system=SYSTEM))
    print(json.dumps({"demos": n_demos, "rss_before": before, "rss_peak": before + growth,
                      "memory_bytes": memory.nbytes, "context": memory.context_length}))


def peak_table(demo_counts) -> list:
    """Peak RSS rows, one fresh child process per demo count. The children run with a fixed glibc
    mmap threshold: with the default (dynamic) one, freed tensor buffers stay in the heap and the
    RSS overstates live memory by tens of MB at random (seen: 16 demos above 32 demos)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    for n in demo_counts:
        out = subprocess.run([sys.executable, __file__, "--peak-child", str(n)], capture_output=True,
                             text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=int, default=32, help="demos for the cost table (default 32)")
    p.add_argument("--layer-groups", type=int, nargs="+", default=[1, 2, 4, 7])
    p.add_argument("--peak-demos", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--queries", type=int, default=12, help="held-out queries for the JS column")
    p.add_argument("--quick", action="store_true", help="8 demos, groups 1 and 4, peak for 8 and 16, 1 repeat")
    p.add_argument("--peak-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child is not None:
        return peak_child(args.peak_child)
    if args.quick:
        args.demos, args.layer_groups, args.peak_demos, args.repeats = 8, [1, 4], [8, 16], 1
    torch.manual_seed(0)
    model, tokenizer = load_model()
    rows = load_task()
    demos, queries = rows[:args.demos], [r["input"] for r in rows[200:200 + args.queries]]

    print(f"compression cost on SmolLM2-135M, {args.demos} demos, median of {args.repeats} runs")
    print(f"{'group':>5} {'compress s':>12} {'plain fwd s':>11} {'fwd-equiv':>13} {'floor':>6} "
          f"{'overhead':>8} {'chunk fe':>8} {'chunk floor':>11} {'chunk ovh':>9} {'tests/chunk':>11} "
          f"{'ratio':>6} {'JS to full':>10}")
    results = []
    for r in cost_table(model, tokenizer, demos, queries, args.layer_groups, args.repeats):
        print(f"{r['layer_group']:>5} {r['compress_s']:>7.1f}±{r['compress_spread_s']:<4.1f} "
              f"{r['plain_forward_s']:>11.3f} {r['forward_equivalents']:>8.1f}±{r['fe_spread']:<4.1f} "
              f"{r['floor']:>6.1f} {r['overhead']:>8.2f} {r['chunk_fe_median']:>8.1f} "
              f"{r['chunk_floor_median']:>11.1f} {r['chunk_overhead_median']:>9.2f} "
              f"{r['tests_per_chunk']:>11.1f} {r['compression']:>6.2f} {r['js_to_full']:>10.5f}")
        results.append({"bench": "compress", "case": f"demos={args.demos} layer_group={r['layer_group']}",
                        "impl": "emloc", "median_ms": r["compress_s"] * 1e3,
                        "spread_ms": r["compress_spread_s"] * 1e3, "metric": "overhead",
                        "value": round(r["overhead"], 3),
                        "note": json.dumps({k: round(v, 5) for k, v in r.items()})})
    if args.peak_demos:
        print("\npeak memory while compressing (fresh process per demo count; growth = peak - RSS before)")
        print(f"{'demos':>6} {'context':>8} {'RSS before MB':>13} {'peak MB':>9} {'growth MB':>9} {'memory MB':>9}")
        peaks = peak_table(args.peak_demos)
        for r in peaks:
            r["growth"] = r["rss_peak"] - r["rss_before"]
            print(f"{r['demos']:>6} {r['context']:>8} {r['rss_before'] / 2**20:>13.1f} "
                  f"{r['rss_peak'] / 2**20:>9.1f} {r['growth'] / 2**20:>9.1f} {r['memory_bytes'] / 2**20:>9.2f}")
            results.append({"bench": "compress_peak", "case": f"demos={r['demos']}", "impl": "emloc",
                            "metric": "rss_growth_bytes", "value": r["growth"], "note": json.dumps(r)})
        first, last = peaks[0], peaks[-1]
        allowed = 1.10 * (first["growth"] + last["memory_bytes"] - first["memory_bytes"])
        print(f"growth({last['demos']}) = {last['growth'] / 2**20:.1f} MB; target <= 1.10 x (growth({first['demos']}) "
              f"+ memory size difference) = {allowed / 2**20:.1f} MB: "
              f"{'met' if last['growth'] <= allowed else 'missed'}")
    append_rows(results, "cpu")


if __name__ == "__main__":
    main()
