"""Token-selection methods, one module each behind SelectionMethod (base.py).

Adding a method: a module with a SelectionMethod subclass, and one line in REGISTRY.
"""
from __future__ import annotations

from emloc.compression.methods.base import ChunkStep, SelectionMethod
from emloc.compression.methods.budget import SharedBudget
from emloc.compression.methods.emloc_search import EMLoCSearch
from emloc.compression.methods.full import Full
from emloc.compression.methods.pyramid import Pyramid
from emloc.compression.methods.snapkv import SnapKV
from emloc.compression.methods.streaming import Streaming
from emloc.compression.methods.tova import TOVA
from emloc.compression.methods.tova_stream import StreamingTOVA
from emloc.compression.methods.uniform import Uniform

REGISTRY = {m.name: m for m in (EMLoCSearch(), Full(), Uniform(), Pyramid(), SnapKV(), TOVA(), Streaming(),
                                SharedBudget(), StreamingTOVA())}

__all__ = ["REGISTRY", "ChunkStep", "SelectionMethod"]
