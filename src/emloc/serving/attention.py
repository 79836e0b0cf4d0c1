"""emloc's attention function, registered with transformers' AttentionInterface.

While the compressor drives a model (DecoderAdapter.emloc_attention), every attention module
calls emloc's function (registered as "emloc"), which hands the post-RoPE queries/keys/values of its layer to
the *plan* passed down as the `emloc_plan` keyword. A plan says what the rows attend to:

- PrefixPlan: the task memory (shared by all rows, unmasked, read in place) plus the rows' own
  tokens, causal with padding. Chunk prefill, query prefill and decoding.
- ProbePlan: memory ⊕ a chunk segment (both shared, unmasked) ⊕ own tokens; optionally
  records per-layer importance scores. The probe pass and every search test.

Without a plan, a layer whose cache is a task memory (emloc.cache.MemoryCache) hands its
memory to the attention call that follows its update (`hand_over`): the call attends to the
memory (all visible) plus the rows' own tokens, whose padding comes from the mask transformers
built (`own_padding`). Any other call falls back to the stock implementation the routing name
says: "emloc" to SDPA, "emloc_eager" to eager attention (`routed` picks the one matching the
model's own implementation).
"""
from __future__ import annotations

import contextlib
import sys
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from emloc_kernels import prefix_attention, probe_scores

from emloc.errors import EMLoCError

ATTENTION_NAME = "emloc"              # routed; calls without a plan or a memory run SDPA
EAGER_ATTENTION_NAME = "emloc_eager"  # routed; calls without a plan or a memory run eager attention
ROUTED_NAMES = (ATTENTION_NAME, EAGER_ATTENTION_NAME)

_handed = threading.local()  # .entry: (memory-cache layer, the keys its update returned)


def hand_over(layer, keys) -> None:
    """Called by a memory-cache layer's update: the attention call that receives `keys` (the
    tensor update returned) attends to `layer`'s memory as well."""
    _handed.entry = (layer, keys)


def _take_handed(key):
    """The memory-cache layer whose update returned `key`, or None when no layer handed over."""
    entry = getattr(_handed, "entry", None)
    if entry is None:
        return None
    _handed.entry = None
    layer, keys = entry
    if keys is not key:
        raise EMLoCError("the model changed the keys between its cache update and its attention "
                         "call; emloc's memory cache supports Llama-style attention only")
    return layer


def _routed_attention(fallback):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  emloc_plan=None, **kwargs):
        """transformers attention signature; query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D].

        Returns ([B, Lq, Hq, D], None) like the stock implementations.
        """
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if emloc_plan is not None:
            out = emloc_plan.attend(module.layer_idx, query, key, value, scale)
            return out.transpose(1, 2).contiguous(), None
        layer = _take_handed(key)
        if layer is not None:
            out = layer.attend(query, key, value, attention_mask, scale)
            return out.transpose(1, 2).contiguous(), None
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                        **kwargs)
    return attention


def _eager_attention(module, *args, **kwargs):
    """The eager attention of the module's own modeling file (Llama's when it has none)."""
    forward = getattr(sys.modules[type(module).__module__], "eager_attention_forward", eager_attention_forward)
    return forward(module, *args, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _routed_attention(sdpa_attention_forward))
AttentionInterface.register(EAGER_ATTENTION_NAME, _routed_attention(_eager_attention))
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)    # boolean masks (None when causal suffices)
AttentionMaskInterface.register(EAGER_ATTENTION_NAME, eager_mask)  # additive float masks


def attention_configs(model) -> list:
    """The distinct configs whose _attn_implementation selects the model's attention."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    return list({id(c): c for c in configs}.values())


@contextlib.contextmanager
def routed(model):
    """Run the model's attention through emloc's function inside the block (needed for a
    MemoryCache): "emloc_eager" for a model loaded with eager attention, else "emloc" (SDPA for
    every call that does not read a memory). The previous implementation is restored on exit."""
    saved = [(c, c._attn_implementation) for c in attention_configs(model)]
    try:
        for c, impl in saved:
            if impl not in ROUTED_NAMES:
                c._attn_implementation = EAGER_ATTENTION_NAME if impl == "eager" else ATTENTION_NAME
        yield model
    finally:
        for c, impl in saved:
            c._attn_implementation = impl


def own_padding(mask, q_len: int, own_len: int):
    """The padding of the rows' own tokens from the mask transformers built for a forward.

    mask: None (causal, nothing padded), a boolean [B, 1, q_len, K] (True = visible) or an
    additive float mask (0 = visible), K >= own_len; its last own_len columns are the own tokens
    (the memory columns, always visible, are read by prefix_attention, not from the mask).
    Returns own_valid [B, own_len] bool (False at padding) or None. Raises EMLoCError unless the
    columns are causal with padding (what prefix_attention computes), or when a row sees no own
    token (an attention_mask that does not span memory.offset + the tokens).
    """
    if mask is None:
        return None
    if mask.dim() != 4 or mask.shape[-1] < own_len or mask.shape[-2] != q_len:
        raise EMLoCError(f"the attention mask has shape {tuple(mask.shape)}; a memory cache expects "
                         f"[batch, 1, {q_len}, >= {own_len}] (pass a 2-D attention_mask)")
    mask = mask[..., -own_len:]
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        if not bool((visible | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise EMLoCError("a memory cache takes masks of visible/hidden keys only (no attention biases)")
    if visible.shape[1] != 1:
        raise EMLoCError("a memory cache takes masks shared by all heads")
    visible = visible[:, 0]
    valid = visible[:, -1]
    i = torch.arange(q_len, device=mask.device)[:, None] + (own_len - q_len)
    causal = torch.arange(own_len, device=mask.device)[None, :] <= i
    if not torch.equal(visible, causal[None] & valid[:, None, :]):
        raise EMLoCError("a memory cache supports causal attention with padding only (the mask "
                         "given is another pattern: a custom 4-D mask, a sliding window or packing)")
    if not bool(valid.any(dim=-1).all()):
        raise EMLoCError("a row sees none of its tokens: with a memory cache the attention_mask "
                         "must have memory.offset + (cached + new tokens) columns, the first "
                         "memory.offset of them ones (EMLoC.query_inputs builds it)")
    return None if bool(valid.all()) else valid


class OwnKVCache:
    """The rows' own keys/values during decoding: per layer a preallocated [B, Hkv, capacity, D]."""

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, capacity, dtype, device):
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, Hkv, T, D] after the layer's rows; return views of all rows so far."""
        start, stop = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if stop > self.keys[layer].shape[2]:
            raise RuntimeError("OwnKVCache capacity exceeded")
        self.keys[layer][:, :, start:stop] = k
        self.values[layer][:, :, start:stop] = v
        self.lengths[layer] = stop
        return self.keys[layer][:, :, :stop], self.values[layer][:, :, :stop]


class PrefixPlan:
    """Attend to the memory of each layer plus the rows' own tokens (causal, padded).

    memory     sequence over layers of (keys, values) [Hkv, M_l, D]
    own_valid  [B, T_own] bool, False at padding (None: no padding); covers cached rows too
    own_cache  OwnKVCache for decoding, or None when the call sees only its own new tokens
    record     a list of length n_layers to receive each layer's new (keys, values), or None
    queries    a list of length n_layers to receive each layer's (queries [Hq, query_tail, D]
               of the last query_tail positions of row 0, scale), or None
    """

    def __init__(self, memory, own_valid=None, own_cache=None, record=None, backend="auto",
                 queries=None, query_tail=0):
        self.memory, self.own_valid, self.own_cache = memory, own_valid, own_cache
        self.record, self.backend = record, backend
        self.queries, self.query_tail = queries, query_tail

    def attend(self, layer, q, k, v, scale):
        if self.record is not None:
            self.record[layer] = (k, v)
        if self.queries is not None:
            self.queries[layer] = (q[0, :, -self.query_tail:], scale)
        if self.own_cache is not None:
            k, v = self.own_cache.append(layer, k, v)
        mem_k, mem_v = self.memory[layer]
        return prefix_attention(q, mem_k, mem_v, k, v, self.own_valid, scale, backend=self.backend)


class ProbePlan:
    """Attend to memory ⊕ chunk segment ⊕ own tokens (causal, padded); optionally score.

    memory     sequence over layers of (keys, values) [Hkv, M_l, D]
    chunk      mapping layer -> (keys, values) [Hkv, Lc_l, D]: the whole chunk or a kept subset
    own_valid  [B, L] bool, False at padding
    observer   [B, L] bool, the answer-span rows whose attention is scored
    scores     dict to receive layer -> [Hkv, Lc] fp32 importance, or None to skip scoring
    """

    def __init__(self, memory, chunk, own_valid, observer, scores=None, backend="auto"):
        self.memory, self.chunk, self.own_valid = memory, chunk, own_valid
        self.observer, self.scores, self.backend = observer, scores, backend

    def attend(self, layer, q, k, v, scale):
        mem_k, mem_v = self.memory[layer]
        chunk_k, chunk_v = self.chunk[layer]
        observer = self.observer if self.scores is not None else None  # None: no score pass
        out, scores = probe_scores(q, mem_k, mem_v, chunk_k, chunk_v, k, v, self.own_valid, observer,
                                   scale, backend=self.backend)
        if self.scores is not None:
            self.scores[layer] = scores
        return out


class CandidateProbePlan:
    """The probe rows replicated once per candidate (candidate-major: rows [c*B, (c+1)*B)).

    Layers in `candidates` give each replica its own chunk segment (candidates[layer][c]);
    every other layer shares chunk[layer]. Used to test a layer's candidates in one batched
    forward; no scores are recorded.

    memory      sequence over layers of (keys, values) [Hkv, M_l, D]
    chunk       mapping layer -> (keys, values) [Hkv, Lc_l, D] for the shared layers
    candidates  mapping layer -> list of C (keys, values) [Hkv, k_c, D]
    own_valid   [C*B, L] bool, False at padding
    """

    def __init__(self, memory, chunk, candidates, own_valid, backend="auto"):
        self.memory, self.chunk, self.candidates = memory, chunk, candidates
        self.own_valid, self.backend = own_valid, backend

    def attend(self, layer, q, k, v, scale):
        mem_k, mem_v = self.memory[layer]
        if layer not in self.candidates:
            chunk_k, chunk_v = self.chunk[layer]
            return probe_scores(q, mem_k, mem_v, chunk_k, chunk_v, k, v, self.own_valid, None,
                                scale, backend=self.backend)[0]
        segments = self.candidates[layer]
        rows = q.shape[0] // len(segments)
        outs = []
        for c, (chunk_k, chunk_v) in enumerate(segments):
            part = slice(c * rows, (c + 1) * rows)
            outs.append(probe_scores(q[part], mem_k, mem_v, chunk_k, chunk_v, k[part], v[part],
                                     self.own_valid[part], None, scale, backend=self.backend)[0])
        return torch.cat(outs)
