"""method="full": no pruning, every token of every chunk kept (the uncompressed context)."""
from __future__ import annotations

from emloc.compression.methods.base import KEEP_ALL, SelectionMethod


class Full(SelectionMethod):
    name = "full"

    def decide(self, step):
        return [KEEP_ALL] * step.adapter.n_layers
