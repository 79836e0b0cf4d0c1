"""method="budget": one budget for the whole context, every chunk still prefilled over the memory.

The memory is a pool. Each chunk is prefilled over it and enters it whole; then the attention of
the chunk's last `window` queries over pool ⊕ chunk (SnapKV's scores, computed chunk by chunk)
ranks every row of the pool, and each layer keeps the best `cap` rows per KV head, by the mean of the window scores each row
has received so far (pool_scores="mean", the default; "window": the current window's only):

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


def pooled_decisions(step, score, cap: int, accumulate: bool) -> list:
    """Per layer: None (memory ⊕ chunk fits in cap: keep all) or the index [Hkv, cap] of the
    best rows of memory ⊕ chunk by score(queries, keys [Hkv, M + Lc, D], scale) -> [Hkv, M + Lc],
    the current window's scores, or with `accumulate` their mean over every window so far."""
    decisions = []
    ratio = step.settings.keep_ratio
    for l, ((mem_k, _), (keys, _)) in enumerate(zip(step.memory.kv(), step.chunk_kv)):
        rows = mem_k.shape[1] + keys.shape[1]
        if cap >= rows and not accumulate:
            decisions.append(KEEP_ALL)
            continue
        queries, scale = step.tail_queries[l]
        scores = score(queries, torch.cat([mem_k, keys], dim=1), scale)
        if accumulate:
            scores = WindowMeans.of(step.state).add(l, scores, queries.shape[1], keys.shape[1])
        if cap >= rows:
            decisions.append(KEEP_ALL)
            continue
        index = top_k_in_order(protect(scores, pool_protected(step, l)), cap)
        if accumulate:
            WindowMeans.of(step.state).keep(l, index)
        decisions.append((index, ratio, None, 0))
    return decisions


class WindowMeans:
    """Per layer, for each memory row [Hkv, M]: the sum of the window scores it received and how
    many windows saw it (the window's own tokens are seen by the next chunks' windows only)."""

    @classmethod
    def of(cls, state: dict) -> "WindowMeans":
        return state.setdefault("window_means", cls())

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, l: int, scores, window: int, chunk_len: int):
        """Record a window's scores [Hkv, M + Lc] (its last `window` rows are the window itself);
        return the ranking scores: the mean where seen, above every seen row for the rest (by
        the window's own order: SnapKV's position order for a context shorter than the window)."""
        n_kv, rows = scores.shape
        fresh = scores.new_zeros(n_kv, chunk_len)
        sums = torch.cat([self.sums.get(l, fresh[:, :0]), fresh], dim=1)
        counts = torch.cat([self.counts.get(l, fresh[:, :0]), fresh], dim=1)
        seen = max(0, rows - window)
        sums[:, :seen] += scores[:, :seen]
        counts[:, :seen] += 1
        self.sums[l], self.counts[l] = sums, counts
        means = sums / counts.clamp_min(1)
        top = float(means.max()) + 1.0 if means.numel() else 1.0
        return torch.where(counts > 0, means, top + scores)

    def keep(self, l: int, index) -> None:
        """The rows index [Hkv, k] of memory ⊕ chunk stay (TaskMemory's LayerMemory.select)."""
        self.sums[l] = torch.gather(self.sums[l], 1, index)
        self.counts[l] = torch.gather(self.counts[l], 1, index)


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
        return pooled_decisions(step, snapkv_scores, cap, accumulate=s.pool_scores == "mean")
