"""method="tova-stream": TOVA in its streaming form (Oren et al., 2024): a fixed budget, the
lowest-scored rows evicted as the context arrives.

The memory never holds more than keep_ratio × the context's tokens rows per layer (tokens seen so
far with images, whose count is not known up front); after each chunk enters, the attention of
the chunk's last query, averaged over all heads, ranks memory ⊕ chunk and the lowest rows are
evicted. The paper evicts one token per generated token; here a chunk arrives at once (give
demos_per_chunk=1 for a finer stream).
"""
from __future__ import annotations

from emloc.compression.baseline_scores import tova_scores
from emloc.compression.methods.base import SelectionMethod
from emloc.compression.methods.budget import final_size, pooled_decisions


class StreamingTOVA(SelectionMethod):
    name = "tova-stream"
    needs_keep_ratio = True
    pooled = True
    sequential = False

    def query_tail(self, settings):
        return 1

    def decide(self, step):
        tokens = step.tokens_seen if step.last else (step.tokens_total or step.tokens_seen)
        return pooled_decisions(step, tova_scores, final_size(step.settings.keep_ratio, tokens), accumulate=False)
