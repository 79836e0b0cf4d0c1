"""emloc's attention function, registered with transformers' AttentionInterface.

While the compressor drives a model (DecoderAdapter.emloc_attention), every attention module
calls `emloc_attention_forward`, which hands the post-RoPE queries/keys/values of its layer to
the *plan* passed down as the `emloc_plan` keyword. A plan says what the rows attend to:

- PrefixPlan: the task memory (shared by all rows, unmasked, read in place) plus the rows' own
  tokens, causal with padding. Chunk prefill, query prefill and decoding.
- ProbePlan: memory ⊕ a chunk segment (both shared, unmasked) ⊕ own tokens; optionally
  records per-layer importance scores. The probe pass and every search test.

Without a plan (someone else's call while routed) it falls back to SDPA.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from emloc_kernels import prefix_attention, probe_scores

ATTENTION_NAME = "emloc"


def emloc_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            emloc_plan=None, **kwargs):
    """transformers attention signature; query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D].

    Returns ([B, Lq, Hq, D], None) like the stock implementations.
    """
    if emloc_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = emloc_plan.attend(module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, emloc_attention_forward)


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
    """

    def __init__(self, memory, own_valid=None, own_cache=None, record=None, backend="auto"):
        self.memory, self.own_valid, self.own_cache = memory, own_valid, own_cache
        self.record, self.backend = record, backend

    def attend(self, layer, q, k, v, scale):
        if self.record is not None:
            self.record[layer] = (k, v)
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
