"""method="tova": TOVA's scores (Oren et al., 2024) in one prefill, as kvpress implements it."""
from __future__ import annotations

from emloc.compression.baseline_scores import tova_index
from emloc.compression.methods.base import KEEP_ALL, SelectionMethod, candidate_sizes


class TOVA(SelectionMethod):
    """The last query's attention averaged over all heads; keep_ratio of each chunk (the whole
    context by default). Its streaming form, a fixed budget as tokens arrive, is "tova-stream"."""

    name = "tova"
    needs_keep_ratio = True
    one_chunk = True

    def query_tail(self, settings):
        return 1

    def decide(self, step):
        decisions = []
        for l, (keys, _) in enumerate(step.chunk_kv):
            (k,) = candidate_sizes([step.settings.keep_ratio], step.chunk_len, int(step.protected.sum()))
            if k >= step.chunk_len:
                decisions.append(KEEP_ALL)
                continue
            queries, scale = step.tail_queries[l]
            decisions.append((tova_index(queries, keys, k, scale, step.protected), step.settings.keep_ratio, None, 0))
        return decisions
