"""The bundled SmolLM2-135M, loaded once per test session for the tests that share it."""
import contextlib
import functools
import io

from emloc.models import load_model


@functools.lru_cache(maxsize=1)
def smollm2_loading():
    """(model, tokenizer, what loading wrote to stderr) of the bundled model (~15 s to load)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        model, tokenizer = load_model()
    return model, tokenizer, err.getvalue()


def smollm2():
    """(model, tokenizer) of the bundled model."""
    return smollm2_loading()[:2]
