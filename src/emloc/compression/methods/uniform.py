"""method="uniform": every layer keeps keep_ratio of each chunk, ranked by emloc's probe scores."""
from __future__ import annotations

from emloc_kernels import rank_tokens

from emloc.compression.methods.base import SelectionMethod, candidate_sizes
from emloc.compression.methods.emloc_search import protection_bonus


def scheduled_decisions(step, ratios) -> list:
    """Per layer l, keep ratios[l] of the chunk by the probe's scores (protected tokens first)."""
    s, scores = step.settings, step.probe["scores"]
    decisions = []
    for l, ratio in enumerate(ratios):
        (k,) = candidate_sizes([ratio], step.chunk_len, int(step.protected.sum()))
        index = None if k >= step.chunk_len else rank_tokens(
            scores[l], step.protected, [k], s.pool_width, protection_bonus(scores[l], s.protect_bonus),
            backend=step.backend)[0]
        decisions.append((index, ratio, None, 0))
    return decisions


class Uniform(SelectionMethod):
    name = "uniform"
    needs_keep_ratio = True
    needs_probe = True

    def decide(self, step):
        return scheduled_decisions(step, [step.settings.keep_ratio] * step.adapter.n_layers)
