"""EMLoC: the public compressor (docs/API.md is the contract)."""
from __future__ import annotations

import sys

import torch

from emloc.serving.answering import (Sampler, cache_inputs, decoding_config, generate_batch, query_logits, seeded,
                        until_stop)
from emloc.serving.attention import routed
from emloc.serving.cache import MemoryCache, cache_keyword
from emloc.compression.chunk_loop import ChunkCompressor
from emloc.errors import EMLoCError
from emloc.compression.presets import resolve_settings
from emloc.io.fingerprints import TOKENIZER_KEY, fingerprint_diff, model_part, tokenizer_fingerprint
from emloc.io.memory import TaskMemory, empty_layers
from emloc.models.media import MediaPreparer
from emloc.models.rendering import ChatRenderer
from emloc.compression.settings import Settings
from emloc.models.vision_language import VisionLanguageAdapter, adapter_for


def _check_demos(demos) -> list:
    if isinstance(demos, (str, bytes, dict)) or not hasattr(demos, "__iter__"):
        raise EMLoCError("demos must be a list of {'input': ..., 'output': ...} dicts")
    demos = list(demos)
    if not demos:
        raise EMLoCError("no demos: give at least one {'input': ..., 'output': ...} demonstration")
    for i, demo in enumerate(demos):
        if not isinstance(demo, dict):
            raise EMLoCError(f"demo {i} is a {type(demo).__name__}, expected a dict with 'input' and 'output'")
        for key in ("input", "output"):
            if key not in demo or demo[key] is None or (isinstance(demo[key], str) and not demo[key].strip()):
                raise EMLoCError(f"demo {i} has no {key!r}: every demo needs a non-empty input and output")
        if not isinstance(demo["output"], str):
            raise EMLoCError(f"demo {i}: 'output' must be a string, got {type(demo['output']).__name__}")
    return demos


class EMLoC:
    """Compress demonstrations into a TaskMemory and answer queries from it.

    model      a transformers decoder-only causal LM (Llama, Qwen2/3, Mistral families), or a
               Qwen2-VL / Qwen2.5-VL for conditional generation
    processor  its tokenizer (with a chat template), or for a vision-language model its processor
               (a bare tokenizer there takes text-only demos and queries)
    preset     a name of emloc.PRESETS ("faithful", the default, reproduces the published method)
    The remaining arguments are the Settings fields (see emloc.Settings); None (or leaving one
    out) takes the preset's value, else the Settings default; progress=True shows a progress bar
    over chunks on stderr.
    """

    def __init__(self, model, processor, tolerance=None, ratios=None, demos_per_chunk=None,
                 method=None, keep_ratio=None, backend=None, progress=True, layer_group=None,
                 batch_candidates=None, preset=None, chunk_tokens=None, lookback_chunks=None,
                 window=None, sinks=None, recent_tokens=None, protect_first=None, pool_factor=None,
                 pool_scores=None):
        given = {"tolerance": tolerance, "ratios": ratios, "demos_per_chunk": demos_per_chunk,
                 "method": method, "keep_ratio": keep_ratio, "backend": backend,
                 "layer_group": layer_group, "batch_candidates": batch_candidates,
                 "chunk_tokens": chunk_tokens, "lookback_chunks": lookback_chunks,
                 "window": window, "sinks": sinks, "recent_tokens": recent_tokens,
                 "protect_first": protect_first, "pool_factor": pool_factor,
                 "pool_scores": pool_scores}
        self.settings = resolve_settings(preset, **given)
        self.model = model
        self.adapter = adapter_for(model)
        self.settings.check_model(self.adapter)
        takes_media = (isinstance(self.adapter, VisionLanguageAdapter)
                       and getattr(processor, "image_processor", None) is not None)
        self.renderer = ChatRenderer(processor, media=MediaPreparer(processor) if takes_media else None)
        self.tokenizer = self.renderer.tokenizer
        self.progress = progress
        self._fingerprint = {**self.adapter.fingerprint(), TOKENIZER_KEY: tokenizer_fingerprint(self.tokenizer)}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    # -- compression -------------------------------------------------------------------------
    def _chunk_bounds(self, demos) -> tuple:
        """([start, end) demo indices of each chunk, index of the first chunk kept whole).

        The last demos whose tokens fit in recent_tokens form the chunks kept whole (none when
        recent_tokens is 0); the demos before them are cut into chunks of demos_per_chunk (all in
        one chunk when None) or by chunk_tokens. Token counts are of each demo rendered alone.
        """
        s = self.settings
        lengths = None
        if s.chunk_tokens is not None or s.recent_tokens:
            if self.renderer.media is not None:
                raise EMLoCError("chunk_tokens and recent_tokens measure text demos; with images or "
                                 "videos give demos_per_chunk and recent_tokens=0")
            lengths = [len(self.renderer.demos([self.renderer.prepared(d, f"demo {i} input")], system=False).ids)
                       for i, d in enumerate(demos)]
        split, used = len(demos), 0
        while s.recent_tokens and split > 0 and used + lengths[split - 1] <= s.recent_tokens:
            split -= 1
            used += lengths[split]
        older = self._cut(0, split, lengths)
        return older + self._cut(split, len(demos), lengths), len(older)

    def _cut(self, start: int, end: int, lengths) -> list:
        """Chunks of demos [start, end): demos_per_chunk at a time, or while their tokens fit in
        chunk_tokens (at least one demo per chunk)."""
        s = self.settings
        if s.chunk_tokens is None:
            size = s.demos_per_chunk or max(1, end - start)
            return [(i, min(i + size, end)) for i in range(start, end, size)]
        bounds, used = [], 0
        for i in range(start, end):
            if i > start and used + lengths[i] > s.chunk_tokens:
                bounds.append((start, i))
                start, used = i, 0
            used += lengths[i]
        return bounds + [(start, end)] if end > start else bounds

    def _render_chunk(self, demos, bounds, c: int, system):
        """Chunk c: its demos rendered as one chat (with `system` in chunk 0) and each demo
        rendered alone (the probe rows); both share the demos' processed images/videos."""
        start, end = bounds[c]
        group = [self.renderer.prepared(d, f"demo {start + i} input") for i, d in enumerate(demos[start:end])]
        chunk = self.renderer.demos(group, system=system if c == 0 else False)
        return chunk, [self.renderer.demos([d], system=False) for d in group]

    def _chunks(self, demos, system, bounds=None):
        """Rendered chunks and, per chunk, each demo rendered alone (the probe rows); bounds as
        _chunk_bounds gives them (computed when None)."""
        bounds = self._chunk_bounds(demos)[0] if bounds is None else bounds
        rendered = [self._render_chunk(demos, bounds, c, system) for c in range(len(bounds))]
        return [chunk for chunk, _ in rendered], [rows for _, rows in rendered]

    def compress(self, demos, system=None) -> TaskMemory:
        """Compress `demos` chunk by chunk into a TaskMemory; `system` opens the first chunk.

        Chunks are rendered (and their images processed and encoded) one at a time, so memory
        in use is bounded by a chunk plus the growing task memory.
        """
        demos = _check_demos(demos)
        if system is not None and not isinstance(system, str):
            raise EMLoCError(f"system must be a string or None, got {type(system).__name__}")
        for i, demo in enumerate(demos):  # fail before any work on a demo that cannot be rendered
            self.renderer.check(demo["input"], f"demo {i} input")
        bounds, first_recent = self._chunk_bounds(demos)
        n_chunks = len(bounds)
        # with images, render (and process) one chunk at a time; text is cheap: check it all first
        rendered = (self._render_chunk(demos, bounds, c, system) for c in range(n_chunks))
        total = None  # context tokens, known up front for text only
        if self.renderer.media is None:
            chunks, probes = self._chunks(demos, system, bounds)
            rendered = zip(chunks, probes)
            total = sum(len(c.ids) for c in chunks)
            longest_probe = max(len(r.ids) for rows in probes for r in rows)
            if total + longest_probe > self.adapter.max_positions:
                raise EMLoCError(
                    f"the demonstrations take {total} tokens (+{longest_probe} for the probe), more than "
                    f"the model's {self.adapter.max_positions} positions; use fewer or shorter demos")
        a = self.adapter
        memory = TaskMemory(empty_layers(a), offset=0, context_length=0, fingerprint=self._fingerprint,
                            settings=self.settings.to_dict(), stats=[])
        worker = ChunkCompressor(a, self.settings, self.pad_id)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=n_chunks, desc="compressing", unit="chunk", file=sys.stderr)
        with a.emloc_attention():
            for c, (chunk, rows) in enumerate(rendered):
                stats = worker.compress(memory, chunk, rows, keep_whole=c >= first_recent,
                                        last=c == n_chunks - 1, tokens_total=total)
                memory.stats.append({"chunk": c, **stats})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(kept=f"{sum(memory.layer_lengths) / a.n_layers:.0f}/{memory.context_length}")
        if bar is not None:
            bar.close()
        for layer in memory.layers:
            layer.trim()
        memory.count_kept(worker.token_types)
        return memory

    # -- answering ---------------------------------------------------------------------------
    def _check_memory(self, memory) -> None:
        """Raise EMLoCError unless `memory` was made with this model and tokenizer and each of its
        layers sits on the device its decoder layer runs on."""
        if not isinstance(memory, TaskMemory):
            raise EMLoCError(f"expected an emloc.TaskMemory, got {type(memory).__name__}")
        diff = fingerprint_diff(model_part(memory.fingerprint), model_part(self._fingerprint))
        if diff:
            raise EMLoCError(f"this memory was compressed with another model (memory vs this model: "
                             f"{diff}); compress again with this one")
        diff = fingerprint_diff(memory.fingerprint.get(TOKENIZER_KEY) or {}, self._fingerprint[TOKENIZER_KEY])
        if diff:
            raise EMLoCError(f"this memory was compressed with another tokenizer (memory vs this "
                             f"tokenizer: {diff}); use the tokenizer it was compressed with, or compress again")
        for l, (layer, device) in enumerate(zip(memory.layers, self.adapter.layer_devices)):
            here = layer.keys.device
            if (here.type, here.index or 0) != (device.type, device.index or 0):
                raise EMLoCError(f"layer {l} of the memory is on {here} but the model runs that layer "
                                 f"on {device}; load the memory after placing the model "
                                 "(TaskMemory.load puts each layer on its layer's device)")

    def _stop_ids(self) -> set:
        if not hasattr(self, "_stop"):
            probe = self.renderer.demos([{"input": "a", "output": "b"}], system=False)
            stop = {probe.ids[probe.spans[0][1] - 1]}
            if self.tokenizer.eos_token_id is not None:
                stop.add(self.tokenizer.eos_token_id)
            self._stop = stop
        return self._stop

    def generate(self, memory, query, max_new_tokens=None, do_sample=None, temperature=None, seed=None,
                 top_k=None, top_p=None, generation_config=None, streamer=None, logits_processor=None,
                 stopping_criteria=None, num_return_sequences=1, **generate_kwargs):
        """Answer one query (-> str) or a list of queries (-> list[str], one padded batch).

        Greedy unless do_sample=True, which samples from softmax(logits / temperature), restricted
        to the top_k most likely tokens and/or the smallest set of probability >= top_p, with a
        generator seeded by `seed` (0 when None). Each row stops at its end-of-turn token or after
        max_new_tokens (default 32); the memory is read in place and never changed.

        transformers' options (a GenerationConfig, streamer=, logits_processor=,
        stopping_criteria=, num_return_sequences=, or any other keyword of model.generate) run
        model.generate on memory.as_cache (the same tokens as emloc's own decoding when greedy);
        the keywords above override the config's fields; it stops at the end-of-turn token unless
        the config names its eos_token_id. num_return_sequences=n > 1 returns n answers per query
        (a list for one query, a list of lists for several).
        """
        self._check_memory(memory)
        single = not isinstance(query, (list, tuple)) or (query and isinstance(query[0], dict))
        queries = [query] if single else list(query)
        if not queries:
            raise EMLoCError("no queries given")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise EMLoCError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if do_sample not in (True, False, None):
            raise EMLoCError(f"do_sample must be True or False, got {do_sample!r}")
        t = temperature  # checked even when greedy: a wrong value is a mistake either way
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf")):
            raise EMLoCError(f"temperature must be a finite number > 0, got {temperature!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise EMLoCError(f"seed must be an integer >= 0 or None, got {seed!r}")
        rows = [self.renderer.query(q) for q in queries]
        stop = self._stop_ids()
        transformers_options = (generation_config, streamer, logits_processor, stopping_criteria)
        if any(o is not None for o in transformers_options) or num_return_sequences != 1 or generate_kwargs:
            config = decoding_config(generation_config, stop, self.pad_id, max_new_tokens=max_new_tokens,
                                     do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                     num_return_sequences=num_return_sequences)
            if streamer is not None and len(rows) > 1:
                raise EMLoCError("a streamer takes one query at a time (transformers' streamers are batch 1)")
            inputs = cache_inputs(self.adapter, memory, rows, self.pad_id)
            inputs[cache_keyword(self.model)] = MemoryCache(memory, self.model, self.settings.backend,
                                                            check_model=False)
            with routed(self.model), torch.inference_mode(), seeded(self.adapter.device, seed, config.do_sample):
                out = self.model.generate(**inputs, generation_config=config, streamer=streamer,
                                          logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                          **generate_kwargs)
            outputs = [until_stop(row, stop) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]
            n = config.num_return_sequences or 1
        else:
            sampler = Sampler(bool(do_sample), 1.0 if temperature is None else temperature, top_k, top_p)
            if do_sample:
                sampler.seed(self.adapter.device, 0 if seed is None else seed)
            with self.adapter.emloc_attention():
                outputs = generate_batch(self.adapter, memory, rows, stop, self.pad_id,
                                         32 if max_new_tokens is None else max_new_tokens, sampler,
                                         self.settings.backend)
            n = 1
        texts = [self.tokenizer.decode([t for t in out if t not in stop], skip_special_tokens=True).strip()
                 for out in outputs]
        if n > 1:
            texts = [texts[i:i + n] for i in range(0, len(texts), n)]
        return texts[0] if single else texts

    def logits(self, memory, query, continuation=None) -> torch.Tensor:
        """fp32 [1 + len(continuation tokens), V]: row 0 predicts the first answer token."""
        self._check_memory(memory)
        seq = self.renderer.query(query)
        first = len(seq.ids) - 1
        if continuation is not None:
            if not isinstance(continuation, str):
                raise EMLoCError("continuation must be a string")
            seq.ids = seq.ids + self.renderer.text_ids(continuation)
        with self.adapter.emloc_attention():
            return query_logits(self.adapter, memory, seq, first, self.settings.backend)

    def query_inputs(self, memory, query, cache=True) -> dict:
        """Keyword inputs of model(...) and model.generate(...) that answer `query` (a string or
        content parts; a list of them: one left-padded batch) from `memory`, rendered as
        EMLoC.generate renders it: input_ids [B, T] (the query tokens only), attention_mask
        [B, memory.offset + T] (ones for the memory, then the padding), position_ids [B, T]
        and, with cache=True, a fresh memory.as_cache(model) under the keyword this
        transformers takes ("cache" or "past_key_values"). The model must be routed to emloc's
        attention (emloc.routed). Text models only."""
        self._check_memory(memory)
        single = not isinstance(query, (list, tuple)) or (query and isinstance(query[0], dict))
        queries = [query] if single else list(query)
        if not queries:
            raise EMLoCError("no queries given")
        inputs = cache_inputs(self.adapter, memory, [self.renderer.query(q) for q in queries], self.pad_id)
        if cache:
            inputs[cache_keyword(self.model)] = MemoryCache(memory, self.model, self.settings.backend,
                                                            check_model=False)
        return inputs

    def full_inputs(self, demos, query, system=None) -> dict:
        """Model inputs for the uncompressed sequence: all chunks, then the query, as rendered here."""
        demos = _check_demos(demos)
        chunks, _ = self._chunks(demos, system)
        query = self.renderer.query(query)
        ids = [t for c in chunks for t in c.ids] + query.ids
        return self.adapter.model_inputs(ids, [m for c in chunks for m in c.media] + query.media)
