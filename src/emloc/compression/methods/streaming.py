"""method="streaming": StreamingLLM (Xiao et al., 2024): the attention sinks and the recent tokens."""
from __future__ import annotations

from emloc.compression.baseline_scores import streaming_index
from emloc.compression.methods.base import KEEP_ALL, SelectionMethod, candidate_sizes


class Streaming(SelectionMethod):
    """The context's first `sinks` tokens and its most recent ones, keep_ratio in all (the whole
    context is one chunk by default; chunked, the sinks are those of the context, not of each
    chunk: a later chunk keeps its most recent tokens only)."""

    name = "streaming"
    needs_keep_ratio = True
    one_chunk = True

    def decide(self, step):
        n_kv, length = step.adapter.n_kv_heads, step.chunk_len
        first_chunk = step.memory.context_length == 0
        sinks = step.settings.sinks if first_chunk else 0
        (k,) = candidate_sizes([step.settings.keep_ratio], length, int(step.protected.sum()))
        if k >= length:
            return [KEEP_ALL] * step.adapter.n_layers
        device = step.chunk_kv[0][0].device
        index = streaming_index(n_kv, length, k, sinks, device, step.protected)
        return [(index.to(keys.device), step.settings.keep_ratio, None, 0) for keys, _ in step.chunk_kv]
