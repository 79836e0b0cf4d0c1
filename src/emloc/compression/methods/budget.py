"""method="budget": one budget for the whole context, every chunk still prefilled over the memory.

The memory is a pool. Each chunk is prefilled over it and enters it whole; then the attention of
the chunk's last `window` queries over pool ⊕ chunk (SnapKV's scores, computed chunk by chunk)
ranks every row of the pool, and each layer keeps the best `cap` rows per KV head:

  cap = pool_factor × keep_ratio × context tokens   after every chunk but the last
  cap = keep_ratio × context tokens                 after the last: SnapKV's selection with the
                                                    context's own observation window

so that a token of an early demonstration competes with every later one, not only with its own
chunk's, and peak memory stays bounded by the pool plus one chunk. With the whole context in
one chunk this is exactly one-prefill SnapKV. The context's token count is known before the
first chunk for text; with images or videos (rendered chunk by chunk) the tokens seen so far
stand for it, so the pool grows with them.
"""
from __future__ import annotations

import math

import torch

from emloc.compression.baseline_scores import protect, snapkv_scores, top_k_in_order
from emloc.compression.methods.base import KEEP_ALL, SelectionMethod


def pool_protected(step, l: int):
    """[Hkv, M + Lc] bool: the pool's rows and the chunk's tokens that every layer keeps (the
    context's first protect_first tokens, and the chunk's protected ones)."""
    layer = step.memory.layers[l]
    old = layer.positions < step.settings.protect_first
    new = step.protected.to(old.device)[None].expand(old.shape[0], -1)
    return torch.cat([old, new], dim=1)


def pooled_decisions(step, score, cap: int) -> list:
    """Per layer: None (memory ⊕ chunk fits in cap: keep all) or the index [Hkv, cap] of the
    best rows of memory ⊕ chunk by score(queries, keys [Hkv, M + Lc, D], scale) -> [Hkv, M + Lc]."""
    decisions = []
    ratio = step.settings.keep_ratio
    for l, ((mem_k, _), (keys, _)) in enumerate(zip(step.memory.kv(), step.chunk_kv)):
        rows = mem_k.shape[1] + keys.shape[1]
        if cap >= rows:
            decisions.append(KEEP_ALL)
            continue
        queries, scale = step.tail_queries[l]
        scores = score(queries, torch.cat([mem_k, keys], dim=1), scale)
        index = top_k_in_order(protect(scores, pool_protected(step, l)), cap)
        decisions.append((index, ratio, None, 0))
    return decisions


def final_size(keep_ratio: float, tokens: int) -> int:
    """The memory's rows per layer at keep_ratio of `tokens` context tokens (SnapKV's int(r * L))."""
    return max(1, int(keep_ratio * tokens))


class SharedBudget(SelectionMethod):
    name = "budget"
    needs_keep_ratio = True
    pooled = True
    sequential = False

    def query_tail(self, settings):
        return settings.window

    def decide(self, step):
        s = step.settings
        if step.last:
            cap = final_size(s.keep_ratio, step.tokens_seen)
        else:
            cap = math.ceil(s.pool_factor * s.keep_ratio * (step.tokens_total or step.tokens_seen))
        return pooled_decisions(step, snapkv_scores, cap)
