"""emloc: compress many-shot demonstrations into a reusable per-layer KV task memory (EMLoC).

Layout: compression/ (settings, presets, the chunk loop, the search, the selection methods),
serving/ (answering, the transformers Cache, attention routing, the pipeline), io/ (the memory
and its file), models/ (loading, the layer-by-layer adapter, rendering), cli/ (the command line).
"""
from emloc.compression.presets import PRESETS, RECOMMENDED_PRESET
from emloc.compression.settings import Settings
from emloc.engine import EMLoC
from emloc.errors import EMLoCError
from emloc.io.memory import TaskMemory
from emloc.serving.attention import routed
from emloc.serving import pipeline  # registers the "emloc-text-generation" transformers pipeline

__all__ = ["EMLoC", "EMLoCError", "PRESETS", "RECOMMENDED_PRESET", "Settings", "TaskMemory", "routed"]
__version__ = "0.1.0"
