"""A task memory as a transformers Cache: model(...) and model.generate(...) read it like a KV cache.

`TaskMemory.as_cache(model)` returns a MemoryCache: one MemoryLayer per decoder layer, each
starting with that layer's kept keys/values (the memory, shared read-only, never copied) and
appending the rows' own tokens after it. Lengths:

- logical  get_seq_length() = memory.offset + own tokens: positions continue where the
           uncompressed context would, and generate trims already-seen ids by it;
- physical memory.layer_lengths[l] + own tokens: ragged over layers.

transformers builds one mask per forward, sized by get_mask_sizes: the own tokens only
(logical columns [offset, offset + own)), the memory being all visible. The model must be
routed to emloc's attention (emloc.routed(model), or attn_implementation="emloc"): there each
layer attends to its memory plus its own tokens with the padding taken from that mask
(attention.own_padding), through emloc_kernels.prefix_attention. update() raises EMLoCError
when the model is not routed.

Calling convention (EMLoC.query_inputs builds it): input_ids [B, T] are the query tokens only,
left-padded; attention_mask [B, offset + T] starts with offset ones (the memory) followed by the
query's mask; position_ids [B, T] count from offset at each row's first real token.
"""
from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from emloc_kernels import prefix_attention

from emloc.serving.attention import ROUTED_NAMES, attention_configs, hand_over, own_padding
from emloc.errors import EMLoCError


class MemoryLayer(CacheLayerMixin):
    """One decoder layer of a MemoryCache.

    memory_keys/memory_values  [Hkv, M, D] views of the TaskMemory's buffers (read, never written)
    keys/values                [B, Hkv, T, D] the rows' own tokens (views of a growing buffer),
                               None before the first update
    """

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, cache: "MemoryCache", memory_keys: torch.Tensor, memory_values: torch.Tensor):
        super().__init__()
        self.cache, self.memory_keys, self.memory_values = cache, memory_keys, memory_values
        self.length = 0
        self._k = self._v = None  # own-token buffers [B, Hkv, capacity, D]

    def lazy_initialization(self, key_states, value_states) -> None:
        b, h, _, d = key_states.shape
        if (h, d) != (self.memory_keys.shape[0], self.memory_keys.shape[2]) or key_states.dtype != self.memory_keys.dtype:
            raise EMLoCError(f"keys {tuple(key_states.shape)} {key_states.dtype} do not fit the memory's "
                             f"{tuple(self.memory_keys.shape)} {self.memory_keys.dtype}: use the model the "
                             "memory was compressed with")
        self.device = key_states.device
        self._k = key_states.new_empty(b, h, 0, d)
        self._v = value_states.new_empty(b, h, 0, d)
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        """Append key/value states [B, Hkv, T, D] after the own tokens; returns all own tokens.
        The memory is handed to the attention call that follows (see attention.hand_over)."""
        self.cache.check_routed()
        if not self.is_initialized or (self.length == 0 and self._k.shape[0] != key_states.shape[0]):
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self._k.shape[0]:
            raise EMLoCError(f"this cache holds {self._k.shape[0]} rows, the forward has "
                             f"{key_states.shape[0]}: use a fresh memory.as_cache(model) per batch")
        stop = self.length + key_states.shape[2]
        if stop > self._k.shape[2]:
            capacity = max(stop, 2 * self._k.shape[2], 16)
            grown_k = self._k.new_empty(*self._k.shape[:2], capacity, self._k.shape[3])
            grown_v = self._v.new_empty(*grown_k.shape)
            grown_k[:, :, :self.length] = self.keys
            grown_v[:, :, :self.length] = self.values
            self._k, self._v = grown_k, grown_v
        self._k[:, :, self.length:stop] = key_states
        self._v[:, :, self.length:stop] = value_states
        self.length = stop
        self._views()
        hand_over(self, self.keys)
        return self.keys, self.values

    def attend(self, query, own_k, own_v, mask, scale) -> torch.Tensor:
        """query [B, Hq, Lq, D] over memory ⊕ own tokens (causal, padded as `mask` says) -> [B, Hq, Lq, D]."""
        own_valid = self.cache.own_valid(mask, query.shape[2], own_k.shape[2])
        return prefix_attention(query, self.memory_keys, self.memory_values, own_k, own_v, own_valid,
                                scale, backend=self.cache.backend)

    def get_seq_length(self) -> int:
        return self.cache.offset + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the mask covers the own tokens, at logical positions from offset."""
        return self.length + query_length, self.cache.offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop the own tokens (the memory stays)."""
        self.length = 0
        if self.is_initialized:
            self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last -tokens_to_remove own tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if -tokens_to_remove > self.length:
            raise EMLoCError(f"cannot crop {-tokens_to_remove} tokens: only {self.length} follow the "
                             "memory, which is never cropped")
        self.length += tokens_to_remove
        if self.is_initialized:
            self._views()

    def _select_rows(self, select) -> None:
        if self.is_initialized:
            self._k, self._v = select(self._k), select(self._v)
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_rows(lambda t: t[indices])


class MemoryCache(Cache):
    """A transformers Cache whose layers start with a TaskMemory's kept keys/values.

    Build it with TaskMemory.as_cache(model); one cache serves one batch of one generate call
    (or a sequence of forwards continuing each other), like a DynamicCache. The memory is only
    read: any number of caches may share it, and it is bit-identical after they are used.
    """

    def __init__(self, memory, model, backend: str = "auto", check_model: bool = True):
        """check_model=False skips comparing the memory's fingerprint with the model's (for
        callers that already did, like EMLoC)."""
        from emloc.io.fingerprints import fingerprint_diff, model_part
        from emloc.models.vision_language import adapter_for

        if check_model:
            diff = fingerprint_diff(model_part(memory.fingerprint), adapter_for(model).fingerprint())
            if diff:
                raise EMLoCError(f"this memory was compressed with another model (memory vs this "
                                 f"model: {diff}); compress again with this one")
        super().__init__(layers=[MemoryLayer(self, k, v) for k, v in memory.kv()])
        self.offset, self.backend = memory.offset, backend
        self._configs = attention_configs(model)
        self._fitted = None  # (mask, q_len, own_len, own_valid) of the forward in progress

    def check_routed(self) -> None:
        if any(c._attn_implementation not in ROUTED_NAMES for c in self._configs):
            raise EMLoCError("the model's attention is not routed to emloc, which a memory cache needs "
                             "(its layers differ in length): run it inside `with emloc.routed(model):`, "
                             "or load the model with attn_implementation=\"emloc\"")

    def own_valid(self, mask, q_len: int, own_len: int):
        """own_padding(mask, ...), computed once per forward (every layer gets the same mask)."""
        f = self._fitted
        if f is None or f[0] is not mask or f[1:3] != (q_len, own_len):
            self._fitted = f = (mask, q_len, own_len, own_padding(mask, q_len, own_len))
        return f[3]

    def __repr__(self):
        return (f"MemoryCache(offset={self.offset}, memory={[l.memory_keys.shape[1] for l in self.layers]}, "
                f"own={self.layers[0].length if self.layers else 0})")


def cache_keyword(model) -> str:
    """The keyword model(...) and model.generate(...) take a cache by: "cache" in transformers
    versions that renamed it, else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
