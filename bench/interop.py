"""Benchmark model.generate on a task memory (TaskMemory.as_cache) against emloc's own decoding
and against model.generate on the full context held in a DynamicCache.

On the bundled SmolLM2-135M (or --model) with N demos of the shipped capitals task, batch sizes
1 and 8, three ways to answer held-out queries greedily:
  cache   model.generate(**comp.query_inputs(memory, queries)) with the model routed to emloc
          (emloc.routed): the memory as a transformers Cache
  emloc   emloc's own decode loop (what EMLoC.generate runs), same memory
  prefix  model.generate on the uncompressed demonstration context, prefilled once into a
          DynamicCache; each call copies that prefix (expanded to the batch) since generate
          extends the cache it is given; the copy is timed, as part of the time to first token
Every run decodes exactly 1 + --new-tokens tokens per row (no early stop). TTFT: from the
query texts (each method renders them with the chat template inside the timing) to the first
token chosen; decode tokens/s: batch x new tokens / time from the
first to the last token. Medians of --repeats rounds after one warm-up round, with the spread
(max - min); each round runs the three methods one after the other, so that load from other
processes falls on all.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

try:
    from ._common import device_name, versions
    from .query import TimedGreedy, get_memories
except ImportError:
    from _common import device_name, versions
    from query import TimedGreedy, get_memories

import emloc
from emloc import EMLoC
from emloc.serving.answering import generate_batch
from emloc.serving.cache import cache_keyword
from emloc.cli.demo import SYSTEM, load_task
from emloc.models import load_model

METHODS = ("cache", "emloc", "prefix")


class Clock(LogitsProcessor):
    """Records the wall-clock time of every step of generate (scores unchanged)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_generate(model, new_tokens, make_inputs) -> tuple:
    """(ttft s, decode s) of greedy model.generate on make_inputs() (rendered and built inside
    the timing)."""
    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**make_inputs(), max_new_tokens=1 + new_tokens, min_new_tokens=1 + new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    return clock.times[0] - t0, clock.times[-1] - clock.times[0]


def with_cache(comp, memory, queries, new_tokens) -> tuple:
    with emloc.routed(comp.model):
        return hf_generate(comp.model, new_tokens, lambda: comp.query_inputs(memory, queries))


def with_emloc(comp, memory, queries, new_tokens) -> tuple:
    sampler = TimedGreedy()
    with comp.adapter.emloc_attention():
        t0 = time.perf_counter()
        rows = [comp.renderer.query(q) for q in queries]
        generate_batch(comp.adapter, memory, rows, set(), comp.pad_id, 1 + new_tokens, sampler,
                       comp.settings.backend)
    return sampler.times[0] - t0, sampler.times[-1] - sampler.times[0]


def with_prefix(comp, prefix, memory, queries, new_tokens) -> tuple:
    """The query inputs are those of the memory (the context takes memory.offset positions);
    the cache is a copy of the prefilled context, expanded to the batch."""
    def make_inputs():
        inputs = comp.query_inputs(memory, queries, cache=False)
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(queries))
        return {**inputs, cache_keyword(comp.model): cache}
    return hf_generate(comp.model, new_tokens, make_inputs)


def prefill_context(comp, demos) -> DynamicCache:
    """The uncompressed demonstration context (as EMLoC renders it) in a DynamicCache, batch 1."""
    ids = comp.full_inputs(demos, "x", system=SYSTEM)["input_ids"]
    context = sum(len(c.ids) for c in comp._chunks(demos, SYSTEM)[0])
    cache = DynamicCache(config=comp.model.config)
    with torch.inference_mode():
        comp.model(input_ids=ids[:, :context], **{cache_keyword(comp.model): cache})
    return cache


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", type=int, default=64, help="demonstrations (default 64)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=16, help="decoded tokens after the first (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after a warm-up round (default 5)")
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: bundled SmolLM2-135M)")
    parser.add_argument("--cache-dir", default=None, help="folder for compressed memories (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.demos < 1 or min(args.batch_sizes) < 1 or args.new_tokens < 1 or args.repeats < 3:
        parser.error("--demos and --batch-sizes must be >= 1, --new-tokens >= 1, --repeats >= 3")
    torch.set_num_threads(args.threads)
    rows = load_task()
    queries = [r["input"] for r in rows[args.demos:args.demos + max(args.batch_sizes)]]
    model, tokenizer = load_model(args.model)
    comp = EMLoC(model, tokenizer)
    full = EMLoC(model, tokenizer, method="full", progress=False)
    folder = contextlib.nullcontext(args.cache_dir) if args.cache_dir else tempfile.TemporaryDirectory()
    with folder as cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        memory = get_memories(comp, full, rows, [args.demos], Path(cache_dir))[("emloc", args.demos)]
    prefix = prefill_context(comp, rows[:args.demos])
    assert prefix.get_seq_length() == memory.offset

    results = {}
    for batch in sorted(set(args.batch_sizes)):
        qs = queries[:batch]
        runs = {"cache": lambda: with_cache(comp, memory, qs, args.new_tokens),
                "emloc": lambda: with_emloc(comp, memory, qs, args.new_tokens),
                "prefix": lambda: with_prefix(comp, prefix, memory, qs, args.new_tokens)}
        times = {m: ([], []) for m in METHODS}
        for round_ in range(1 + args.repeats):
            for method in METHODS:
                ttft, decode = runs[method]()
                if round_:
                    times[method][0].append(1e3 * ttft)
                    times[method][1].append(batch * args.new_tokens / decode)
        for method, (ttft, tps) in times.items():
            results[(batch, method)] = (statistics.median(ttft), max(ttft) - min(ttft),
                                        statistics.median(tps), max(tps) - min(tps))
            print(f"batch {batch} {method:<6} TTFT {results[(batch, method)][0]:8.1f} ms  "
                  f"decode {results[(batch, method)][2]:7.1f} tok/s", file=sys.stderr)
    text = report(results, memory, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")


def report(results, memory, args) -> str:
    v = versions()
    lines = [f"Device: {device_name('cpu')}, {args.threads} torch thread(s); torch {v['torch']}, "
             f"transformers {v['transformers']}. Memory: {args.demos} demos, context "
             f"{memory.context_length} tokens, kept {sum(memory.layer_lengths) / len(memory.layers):.0f} "
             f"per layer on average ({memory.compression_ratio:.2f}x). {1 + args.new_tokens} tokens "
             f"per row, medians of {args.repeats} rounds (± max - min).", "",
             "| batch | method | TTFT ms | decode tok/s | TTFT vs emloc | decode vs emloc |",
             "|---:|---|---:|---:|---:|---:|"]
    for (batch, method), (ttft, ttft_spread, tps, tps_spread) in results.items():
        base = results[(batch, "emloc")]
        lines.append(f"| {batch} | {method} | {ttft:.1f} ± {ttft_spread:.1f} | {tps:.1f} ± {tps_spread:.1f} "
                     f"| {ttft / base[0]:.2f}x | {tps / base[2]:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
