"""method="snapkv": SnapKV (Li et al., 2024) in one prefill, as kvpress implements it."""
from __future__ import annotations

from emloc.compression.baseline_scores import snapkv_index
from emloc.compression.methods.base import KEEP_ALL, SelectionMethod, candidate_sizes


class SnapKV(SelectionMethod):
    """The attention of the chunk's last `window` queries, pooled; keep_ratio of each chunk (the
    whole context by default; with demos_per_chunk, kvpress's ChunkPress: each chunk alone)."""

    name = "snapkv"
    needs_keep_ratio = True
    one_chunk = True

    def query_tail(self, settings):
        return settings.window

    def decide(self, step):
        decisions = []
        for l, (keys, _) in enumerate(step.chunk_kv):
            (k,) = candidate_sizes([step.settings.keep_ratio], step.chunk_len, int(step.protected.sum()))
            if k >= step.chunk_len:
                decisions.append(KEEP_ALL)
                continue
            queries, scale = step.tail_queries[l]
            decisions.append((snapkv_index(queries, keys, k, scale, step.protected), step.settings.keep_ratio, None, 0))
        return decisions
