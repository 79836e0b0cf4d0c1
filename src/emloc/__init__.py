"""emloc: compress many-shot demonstrations into a reusable per-layer KV task memory (EMLoC)."""
from .attention import routed
from .compressor import EMLoC
from .errors import EMLoCError
from .memory import TaskMemory
from .presets import PRESETS, RECOMMENDED_PRESET
from .settings import Settings

from . import pipeline  # registers the "emloc-text-generation" transformers pipeline

__all__ = ["EMLoC", "EMLoCError", "PRESETS", "RECOMMENDED_PRESET", "Settings", "TaskMemory", "routed"]
__version__ = "0.1.0"
