"""`emloc.cache` as docs/API.md names it: the transformers Cache lives in emloc.serving.cache."""
from emloc.serving.cache import MemoryCache, cache_keyword

__all__ = ["MemoryCache", "cache_keyword"]
