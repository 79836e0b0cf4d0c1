"""The bundled SmolLM2-135M, loaded once per test session for the tests that share it."""
import functools

from emloc.models import load_model


@functools.lru_cache(maxsize=1)
def smollm2():
    """(model, tokenizer) of the bundled model (about 15 s to load)."""
    return load_model()
