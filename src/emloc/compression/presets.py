"""Named compression settings: `emloc.EMLoC(model, processor, preset=name)`.

A preset is a partial Settings; arguments given to EMLoC explicitly override it. "faithful" is
the method as published (the defaults); the others are emloc's own options, each measured
against it in bench/FIDELITY.md.
"""
from __future__ import annotations

from emloc.errors import EMLoCError

PRESETS = {
    "faithful": {},
    # the context's first tokens kept (the attention sink), the most recent demos kept whole,
    # chunks of about 512 tokens; the search as published on the rest. Measured against faithful
    # in bench/FIDELITY.md; see the README for why it is not the recommended one
    "sink-recent": {"protect_first": 4, "recent_tokens": 384, "chunk_tokens": 512},
}
# the preset the README recommends: the measurements support no other one yet
RECOMMENDED_PRESET = "faithful"


def preset_settings(name) -> dict:
    """The settings of preset `name` (a copy); EMLoCError for an unknown name."""
    if name not in PRESETS:
        raise EMLoCError(f"unknown preset {name!r}; the presets are {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def resolve_settings(preset=None, **given):
    """Settings of `preset` (None = "faithful") with every argument of `given` that is not None
    replacing the preset's value; an explicit demos_per_chunk replaces the preset's chunk_tokens,
    and so does a one-prefill method (snapkv, tova, streaming: the whole context in one chunk)."""
    from emloc.compression.settings import Settings

    from emloc.compression.methods import REGISTRY

    base = preset_settings("faithful" if preset is None else preset)
    name = given.get("method") or base.get("method", "emloc")
    method = REGISTRY.get(name) if isinstance(name, str) else None  # Settings refuses the others
    if given.get("demos_per_chunk") is not None or (method is not None and method.one_chunk):
        base.pop("chunk_tokens", None)  # a one-prefill method keeps its one chunk
    return Settings(**{**base, **{k: v for k, v in given.items() if v is not None}})
