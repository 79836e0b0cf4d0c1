"""method="pyramid": a PyramidKV-style schedule over layers, ranked by emloc's probe scores."""
from __future__ import annotations

from emloc.compression.methods.base import SelectionMethod
from emloc.compression.methods.uniform import scheduled_decisions


def pyramid_ratios(keep_ratio: float, n_layers: int) -> list:
    """Linear schedule: 1.5x the mean at the bottom layer, 0.5x at the top."""
    if n_layers == 1:
        return [keep_ratio]
    return [min(1.0, keep_ratio * (1.5 - l / (n_layers - 1))) for l in range(n_layers)]


class Pyramid(SelectionMethod):
    name = "pyramid"
    needs_keep_ratio = True
    needs_probe = True

    def decide(self, step):
        return scheduled_decisions(step, pyramid_ratios(step.settings.keep_ratio, step.adapter.n_layers))
