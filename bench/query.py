"""Benchmark answering: time to first token and decode speed from a task memory vs the full context.

On the bundled SmolLM2-135M (or --model) with N demos of the shipped capitals task, for batch
sizes 1 and 8, three ways to answer held-out queries:
  (a) emloc   the EMLoC-compressed memory (EMLoC.compress, default settings)
  (b) full    the whole demonstration context as a cached prefix (method="full" memory), decoded
              by the same code as (a): the strongest uncompressed baseline
  (c) reread  the whole context re-read for every query: a plain model forward over
              comp.full_inputs (demos + query) with a DynamicCache, then greedy decoding through
              the model (how a long-context baseline is usually run)
Every run decodes exactly 1 + --new-tokens tokens per row (no early stop). TTFT: from the start
of answering (token ids ready) to the first token chosen; decode tokens/s: batch x new tokens /
time from the first to the last token. KV bytes: (a) and (b) the memory's keys/values, shared
by every row; (c) the context keys/values the batch rebuilds (batch x context tokens).
Medians of --repeats rounds after one warm-up round, with the spread (max - min); every round
runs the three methods one after the other, so that load from other processes falls on all.

The largest size is compressed once; smaller sizes that are whole chunks are its first chunks
(TaskMemory.first_chunks: compression is sequential, so this equals compressing those demos).
Memories are saved and loaded back (the serving path) in --cache-dir, a temporary folder unless
given (give one to reuse memories between runs).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from ._common import append_rows, device_name, versions
except ImportError:
    from _common import append_rows, device_name, versions

from emloc import EMLoC, TaskMemory
from emloc.serving.answering import Sampler, generate_batch
from emloc.cli.demo import SYSTEM, load_task
from emloc.models import load_model

METHODS = ("emloc", "full", "reread")


class TimedGreedy(Sampler):
    """Greedy choice that records the wall-clock time of every token chosen."""

    def __init__(self):
        super().__init__()
        self.times = []

    def __call__(self, logits):
        token = super().__call__(logits)
        self.times.append(time.perf_counter())
        return token


def answer_from_memory(comp, memory, rows, new_tokens) -> tuple:
    """(a)/(b): decode 1 + new_tokens tokens per row through emloc; returns (ttft s, decode s)."""
    sampler = TimedGreedy()
    with comp.adapter.emloc_attention():
        t0 = time.perf_counter()
        generate_batch(comp.adapter, memory, rows, set(), comp.pad_id, 1 + new_tokens, sampler,
                       comp.settings.backend)
    return sampler.times[0] - t0, sampler.times[-1] - sampler.times[0]


def answer_rereading(model, rows, pad_id, new_tokens) -> tuple:
    """(c): forward the full sequences (left-padded) with a DynamicCache, then greedy decoding."""
    from transformers import DynamicCache

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                    logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        t_first = time.perf_counter()
        for _ in range(new_tokens):
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=cache)
            token = out.logits[:, -1].argmax(-1)
        t_end = time.perf_counter()
    return t_first - t0, t_end - t_first


def context_kv_bytes(model, tokens: int) -> int:
    """Bytes of the keys and values of `tokens` tokens in every layer of `model`."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * element


def get_memories(comp, full, demos, sizes, cache_dir: Path) -> dict:
    """{(method, n): TaskMemory} for methods emloc/full and each size, loaded from files."""
    key = hashlib.sha256(json.dumps([comp.settings.to_dict(), SYSTEM, demos[:max(sizes)]],
                                    sort_keys=True).encode()).hexdigest()[:10]
    per_chunk = comp.settings.demos_per_chunk
    memories = {}
    for method, worker in (("emloc", comp), ("full", full)):
        cached = {}
        for n in sorted(sizes, reverse=True):
            path = cache_dir / f"{method}-{n}-{key}.emloc"
            if not path.is_file():
                source = next((m for m_n, m in cached.items() if m_n > n), None)
                if source is not None and n % per_chunk == 0:
                    memory = source.first_chunks(n // per_chunk)
                else:
                    print(f"compressing {n} demos with method={method} ...", file=sys.stderr)
                    t0 = time.perf_counter()
                    memory = worker.compress(demos[:n], system=SYSTEM)
                    print(f"  {time.perf_counter() - t0:.1f} s, {memory}", file=sys.stderr)
                memory.save(path)
            cached[n] = TaskMemory.load(path, comp.model)
            memories[(method, n)] = cached[n]
    return memories


def measure(runs: dict, repeats: int) -> dict:
    """{method: fn() -> (ttft s, decode s)} -> {method: (ttft ms list, decode s list)}.

    One warm-up round, then `repeats` rounds; each round runs every method once, so that load
    from other processes falls on all methods alike.
    """
    times = {method: ([], []) for method in runs}
    for round_ in range(1 + repeats):
        for method, fn in runs.items():
            ttft, decode = fn()
            if round_:
                times[method][0].append(ttft * 1e3)
                times[method][1].append(decode)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", type=int, nargs="+", default=[32, 64, 128],
                        help="numbers of demonstrations (default 32 64 128)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="decoded tokens after the first (default 16)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds per case, after a warm-up round (default 3)")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: bundled SmolLM2-135M)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for compressed memories (default: a temp dir)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if min(args.demos) < 1 or min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.repeats < 3:
        parser.error("--demos and --batch-sizes must be >= 1, --new-tokens >= 1, --repeats >= 3")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    rows = load_task()
    sizes = sorted(set(args.demos))
    queries = [r["input"] for r in rows[max(sizes):max(sizes) + max(args.batch_sizes)]]
    if len(queries) < max(args.batch_sizes):
        parser.error(f"the task has {len(rows)} rows: not enough held-out queries after {max(sizes)} demos")
    model, tokenizer = load_model(args.model)
    model_name = "SmolLM2-135M" if args.model is None else Path(args.model).name
    comp = EMLoC(model, tokenizer)
    full = EMLoC(model, tokenizer, method="full", progress=False)
    if args.cache_dir:
        cache_context = contextlib.nullcontext(args.cache_dir)
    else:
        cache_context = tempfile.TemporaryDirectory(prefix="emloc-bench-")
    with cache_context as folder:
        cache_dir = Path(folder)
        cache_dir.mkdir(parents=True, exist_ok=True)
        memories = get_memories(comp, full, rows, sizes, cache_dir)

        results, csv_rows = [], []
        for n in sizes:
            for batch in sorted(set(args.batch_sizes)):
                qs = queries[:batch]
                query_rows = [comp.renderer.query(q) for q in qs]
                full_rows = [comp.full_inputs(rows[:n], q, system=SYSTEM)["input_ids"][0].tolist()
                             for q in qs]
                runs, kv = {}, {}
                for method in METHODS:
                    if method == "reread":
                        runs[method] = functools.partial(answer_rereading, model, full_rows, comp.pad_id,
                                                         args.new_tokens)
                        kv[method] = batch * context_kv_bytes(model, memories[("full", n)].context_length)
                    else:
                        memory = memories[(method, n)]
                        runs[method] = functools.partial(answer_from_memory, comp, memory, query_rows,
                                                         args.new_tokens)
                        kv[method] = memory.nbytes
                for method, (ttft, decode) in measure(runs, args.repeats).items():
                    speeds = [batch * args.new_tokens / s for s in decode]
                    steps_ms = [1e3 * t / args.new_tokens for t in decode]
                    r = {"demos": n, "batch": batch, "method": method, "kv_bytes": kv[method],
                         "ttft_ms": statistics.median(ttft), "ttft_spread": max(ttft) - min(ttft),
                         "decode_tps": statistics.median(speeds), "decode_spread": max(speeds) - min(speeds)}
                    results.append(r)
                    print(f"{n:>4} demos  batch {batch}  {method:<7} TTFT {r['ttft_ms']:8.1f} ms "
                          f"±{r['ttft_spread']:.1f}   decode {r['decode_tps']:7.1f} tok/s "
                          f"±{r['decode_spread']:.1f}   KV {r['kv_bytes'] / 2**20:7.2f} MiB",
                          file=sys.stderr)
                    case = f"{model_name} demos={n} batch={batch}"
                    csv_rows += [
                        {"bench": "query", "case": case, "impl": method, "median_ms": r["ttft_ms"],
                         "spread_ms": r["ttft_spread"], "metric": "ttft_ms", "value": round(r["ttft_ms"], 2),
                         "note": f"repeats={args.repeats} threads={threads} kv_bytes={r['kv_bytes']}"},
                        {"bench": "query", "case": case, "impl": method,
                         "median_ms": statistics.median(steps_ms), "spread_ms": max(steps_ms) - min(steps_ms),
                         "metric": "decode_tok_per_s", "value": round(r["decode_tps"], 2),
                         "note": f"ms per decode step; new_tokens={args.new_tokens} threads={threads}"},
                    ]
        append_rows(csv_rows, "cpu")
        text = report(results, memories, sizes, sorted(set(args.batch_sizes)), args, model_name)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")


def report(results, memories, sizes, batches, args, model_name) -> str:
    """Markdown: the environment, the measurements and the (a)/(b), (a)/(c) ratios."""
    v = versions()
    lines = [f"Model: {model_name}. Device: {device_name('cpu')}; torch {v['torch']}, "
             f"transformers {v['transformers']}; "
             f"{args.new_tokens} decoded tokens after the first, medians of {args.repeats} rounds "
             "(± max - min) after a warm-up round; methods interleaved in every round.", "",
             "| demos | context tokens | emloc kept/layer (mean) | compression ratio |",
             "|---:|---:|---:|---:|"]
    for n in sizes:
        m = memories[("emloc", n)]
        lines.append(f"| {n} | {m.context_length} | {sum(m.layer_lengths) / len(m.layers):.1f} | "
                     f"{m.compression_ratio:.2f}x |")
    lines += ["", "| demos | batch | method | TTFT ms | decode tok/s | KV MiB |",
              "|---:|---:|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['demos']} | {r['batch']} | {r['method']} | "
                     f"{r['ttft_ms']:.1f} ± {r['ttft_spread']:.1f} "
                     f"| {r['decode_tps']:.1f} ± {r['decode_spread']:.1f} | {r['kv_bytes'] / 2**20:.2f} |")
    lines += ["", "Ratios (a) emloc vs (b) full cached prefix and (c) re-read; > 1 means emloc is better.",
              "", "| demos | batch | TTFT b/a | decode a/b | KV bytes b/a | compression ratio | TTFT c/a "
              "| decode a/c |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["demos"], r["batch"], r["method"]): r for r in results}
    for n in sizes:
        for batch in batches:
            a, b, c = (by[(n, batch, m)] for m in METHODS)
            lines.append(f"| {n} | {batch} | {b['ttft_ms'] / a['ttft_ms']:.2f} | "
                         f"{a['decode_tps'] / b['decode_tps']:.2f} | {b['kv_bytes'] / a['kv_bytes']:.2f} | "
                         f"{memories[('emloc', n)].compression_ratio:.2f} | "
                         f"{c['ttft_ms'] / a['ttft_ms']:.2f} | "
                         f"{a['decode_tps'] / c['decode_tps']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
