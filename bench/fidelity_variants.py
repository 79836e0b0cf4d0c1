"""Which part of chunked compression loses fidelity: any EMLoC settings against the full context.

    python bench/fidelity_variants.py sentiment '[{"method": "uniform", "keep_ratio": 0.25},
        {"method": "uniform", "keep_ratio": 0.25, "lookback_chunks": "all"}]' [--queries 50]

Each JSON object is a set of EMLoC keyword arguments; each is compressed on the task's demos and
compared with the full context on the first answer token of the held-out queries (JS in nats,
top-1 agreement), as bench/fidelity.py does. Two diagnostics that no setting expresses:

  {"diagnostic": "segment-budget", "keep_ratio": 0.25, "segment": 4}
      the whole context in one chunk (exact keys/values, scores from one probe of every demo),
      but the budget imposed per segment of `segment` demos: top-k within each segment
  {"diagnostic": "where-kept", "keep_ratio": 0.25, "segment": 4}
      the whole context in one chunk, uniform at keep_ratio; prints the kept fraction per
      segment of `segment` demos (mean over layers and heads)

The results of the diagnosis are in bench/FIDELITY_DIAGNOSIS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import first_token_logprobs, label_first_ids, load_tasks, metrics, zero_shot_logprobs  # noqa: E402

import emloc  # noqa: E402
from emloc import engine as compressor  # noqa: E402
from emloc.compression import chunk_loop as chunk_compression  # noqa: E402
from emloc.models import load_model  # noqa: E402
from emloc_kernels import rank_tokens  # noqa: E402


def segment_bounds(chunk, chunk_len: int, size: int) -> list:
    """Token boundaries of consecutive segments of `size` demos in one rendered chunk (each ends
    after its last demo's answer span; the last runs to the end)."""
    ends = [chunk.spans[min(j + size, len(chunk.spans)) - 1][1] for j in range(0, len(chunk.spans), size)]
    return [0] + ends[:-1] + [chunk_len]


class OneChunkDiagnostic(chunk_compression.ChunkCompressor):
    """uniform's fixed schedule on one chunk, with the budget per segment or a report of where
    the kept tokens are."""

    mode, segment = None, 4

    def compress(self, memory, chunk, probe_rows, keep_whole=False):
        self._chunk = chunk
        return super().compress(memory, chunk, probe_rows, keep_whole)

    def _fixed_schedule(self, chunk_len, protected, scores):
        s = self.settings
        bounds = segment_bounds(self._chunk, chunk_len, self.segment)
        if self.mode == "segment-budget":
            decisions = []
            for l in range(self.adapter.n_layers):
                parts = []
                for a, b in zip(bounds[:-1], bounds[1:]):
                    (k,) = chunk_compression.candidate_sizes([s.keep_ratio], b - a, int(protected[a:b].sum()))
                    parts.append(rank_tokens(scores[l][:, a:b].contiguous(), protected[a:b], [k], s.pool_width,
                                             chunk_compression.protection_bonus(scores[l], s.protect_bonus),
                                             backend="torch")[0] + a)
                decisions.append((torch.cat(parts, dim=1), s.keep_ratio, None, 0))
            return decisions
        decisions = super()._fixed_schedule(chunk_len, protected, scores)
        kept = torch.zeros(len(bounds) - 1)
        for index, *_ in decisions:
            for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
                kept[j] += ((index >= a) & (index < b)).float().sum(dim=1).mean() / (b - a) / len(decisions)
        print(f"kept fraction per {self.segment}-demo segment:", " ".join(f"{x:.2f}" for x in kept.tolist()))
        print(f"protected (answer) fraction of the context: {float(protected.float().mean()):.3f}")
        return decisions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("task")
    p.add_argument("variants", help="JSON list of EMLoC settings or diagnostics")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    (task,) = load_tasks([args.task])
    task.queries = task.queries[:args.queries]
    model, tokenizer = load_model()
    label_ids = label_first_ids(tokenizer, task.labels)
    full = emloc.EMLoC(model, tokenizer, method="full", progress=False)
    reference = first_token_logprobs(full, full.compress(task.demos, system=task.system), task)

    def report(name, logprobs, kept=0.0, chunks=0, seconds=0.0):
        m = metrics(logprobs, reference, task, label_ids)
        print(f"{name:<80} kept {kept:.3f} chunks {chunks:3d} JS {m['js']:.5f} top-1 {m['top1']:.2f} "
              f"({seconds:.0f} s)", flush=True)

    report("zero-shot", zero_shot_logprobs(model, tokenizer, task))
    for variant in json.loads(args.variants):
        settings = dict(variant)
        mode = settings.pop("diagnostic", None)
        if mode is not None:
            OneChunkDiagnostic.mode, OneChunkDiagnostic.segment = mode, settings.pop("segment", 4)
            settings = {"method": "uniform", "demos_per_chunk": len(task.demos), **settings}
        compressor.ChunkCompressor = OneChunkDiagnostic if mode else chunk_compression.ChunkCompressor
        t0 = time.perf_counter()
        comp = emloc.EMLoC(model, tokenizer, progress=False, **settings)
        memory = comp.compress(task.demos, system=task.system)
        seconds = time.perf_counter() - t0
        report(json.dumps(variant), first_token_logprobs(comp, memory, task), 1 / memory.compression_ratio,
               len(memory.stats), seconds)
    compressor.ChunkCompressor = chunk_compression.ChunkCompressor
    return 0


if __name__ == "__main__":
    sys.exit(main())
