"""One chunk of the compression loop (ALGORITHM.md steps 1-5): prefill, probe, select, append.

The selection itself is the settings' method (compression/methods/, one module each).

All tensors for one chunk live only while it is compressed; the memory is the only thing
that grows with the number of demos.
"""
from __future__ import annotations

import time

import torch

from emloc.compression.methods import REGISTRY, ChunkStep
from emloc.errors import EMLoCError
from emloc.models.rendering import RenderedSequence
from emloc.models.vision_language import TOKEN_TYPES
from emloc.serving.attention import PrefixPlan, ProbePlan


class ProbeBatch:
    """The probe rows of a chunk: each demo alone, right-padded, after the chunk.

    ids [B, L] int64, valid [B, L] bool (False at padding), observer [B, L] bool (answer spans),
    positions [P, B, L] int64 (start + the row's own positions; padding slots continue 0..L-1),
    rows (the RenderedSequence of each row).
    """

    def __init__(self, rows: list, start: int, pad_id: int, adapter):
        width = max(len(r.ids) for r in rows)
        self.rows = rows
        self.ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        self.valid = torch.zeros(len(rows), width, dtype=torch.bool)
        self.observer = torch.zeros(len(rows), width, dtype=torch.bool)
        positions = torch.arange(width).repeat(adapter.position_dims, len(rows), 1)
        for b, row in enumerate(rows):
            self.ids[b, :len(row.ids)] = torch.tensor(row.ids)
            self.valid[b, :len(row.ids)] = True
            self.observer[b, :len(row.ids)] = torch.tensor(row.answer_mask)
            positions[:, b, :len(row.ids)] = adapter.relative_positions(row)
        device = adapter.device
        self.ids, self.valid, self.observer = (t.to(device) for t in (self.ids, self.valid, self.observer))
        self.positions = (start + positions).to(device)


class ChunkCompressor:
    """Compresses chunks into a TaskMemory with the settings' method.

    One instance serves one compression: with settings.lookback_chunks it keeps the full
    keys/values of the last chunks (see `_context`); token_types keeps each chunk's token types
    (for the kept-media counts of TaskMemory.count_kept).
    """

    def __init__(self, adapter, settings, pad_id: int):
        self.adapter, self.settings, self.pad_id = adapter, settings, pad_id
        self.backend = settings.backend
        self._recent = []  # per recent chunk: (its full (keys, values) per layer, kept rows per layer)
        self.token_types = []  # per chunk: [Lc] token types (vision_language.TOKEN_TYPES), or None
        self.method_state = {}  # the selection method's own, across chunks (ChunkStep.state)

    def _context(self, memory) -> list:
        """Per layer (keys, values) [Hkv, M, D] that the chunk attends to: the memory, except that
        the rows of the last lookback_chunks chunks are replaced by those chunks' full keys/values
        (a copy then; without lookback, views of the memory)."""
        if not self._recent:
            return memory.kv()
        context = []
        for l, (keys, values) in enumerate(memory.kv()):
            older = keys.shape[1] - sum(kept[l] for _, kept in self._recent)
            context.append((torch.cat([keys[:, :older]] + [kv[l][0] for kv, _ in self._recent], dim=1),
                            torch.cat([values[:, :older]] + [kv[l][1] for kv, _ in self._recent], dim=1)))
        return context

    def _remember(self, chunk_kv, kept: list) -> None:
        """Keep this chunk's full keys/values for the next lookback_chunks chunks."""
        lookback = self.settings.lookback_chunks
        if lookback == 0:
            return
        self._recent.append((chunk_kv, kept))
        if lookback != "all" and len(self._recent) > lookback:
            self._recent.pop(0)

    def compress(self, memory, chunk: RenderedSequence, probe_rows: list, keep_whole=False, last=False,
                 tokens_total=None) -> dict:
        """Append chunk `chunk` (with its demos alone in `probe_rows`) to `memory` by the settings'
        method, every token when keep_whole (one of the recent chunks); `last` marks the context's
        last chunk, tokens_total its token count (None when not known up front); return stats."""
        t0 = time.perf_counter()
        a, s = self.adapter, self.settings
        method = REGISTRY[s.method]
        chunk_len = len(chunk.ids)
        chunk_positions = a.relative_positions(chunk)
        context = self._context(memory)
        chunk_kv, tail_queries = self._prefill(context, memory.offset, chunk, chunk_positions,
                                               query_tail=method.query_tail(s))
        # the next chunk continues after the chunk's last token (a text token: the end of a turn);
        # this is where the full sequence's own position ids put it, M-RoPE included
        next_offset = memory.offset + int(chunk_positions[:, -1].max()) + 1
        self._check_fits(memory.offset + int(chunk_positions.max()) + 1, "the chunk")
        protected = torch.zeros(chunk_len, dtype=torch.bool, device=a.device)
        if method.needs_probe:  # the answer spans: what the probe observes
            protected |= torch.tensor(chunk.answer_mask, device=a.device)
        if memory.context_length == 0:  # the context's first tokens: the attention sink
            protected[:s.protect_first] = True
        step = ChunkStep(a, s, self.backend, memory, chunk_kv, tail_queries, protected,
                         tokens_seen=memory.context_length + chunk_len, tokens_total=tokens_total, last=last,
                         state=self.method_state)
        if keep_whole:
            decisions = REGISTRY["full"].decide(step)
        else:
            if method.probes(s):
                probe = ProbeBatch(probe_rows, next_offset, self.pad_id, a)
                self._check_fits(int(probe.positions[:, probe.valid].max()) + 1, "the chunk's probe rows")
                step.probe = self._probe(context, chunk_kv, probe)
            decisions = method.decide(step)
        modality = a.token_types(torch.tensor(chunk.ids))  # None for text models
        self.token_types.append(modality)
        layer_stats, kept_rows = [], []
        start = memory.context_length
        for l, (index, ratio, js, tests) in enumerate(decisions):
            keys, values = chunk_kv[l]
            layer = memory.layers[l]
            if index is None:
                index = torch.arange(chunk_len, device=keys.device)[None].expand(a.n_kv_heads, -1)
                layer.append(keys, values, index, start, backend=self.backend)
            elif method.pooled:
                layer.select(keys, values, index, start, backend=self.backend)
            else:
                layer.append(keys, values, index, start, backend=self.backend)
            kept_rows.append(int(index.shape[1]))
            layer_stats.append({"layer": l, "ratio": ratio, "js": js, "tests": tests})
        self._remember(chunk_kv, kept_rows)
        positions_used = next_offset - memory.offset
        memory.offset = next_offset
        memory.context_length += chunk_len
        stats = {"tokens": chunk_len, "positions": positions_used, "demos": len(probe_rows),
                 "kept_whole": keep_whole, "seconds": time.perf_counter() - t0, "layers": layer_stats}
        if modality is not None:
            stats.update({f"{kind}_tokens": int((modality == code).sum()) for kind, code in TOKEN_TYPES.items()})
        return stats

    def _check_fits(self, end: int, what: str) -> None:
        """Raise EMLoCError if positions up to `end` (exclusive) run past the model's positions."""
        if end > self.adapter.max_positions:
            raise EMLoCError(f"{what} would reach position {end}, past the model's "
                             f"{self.adapter.max_positions} positions; use fewer or shorter demos")

    # -- step 1: chunk prefill --------------------------------------------------------------
    def _prefill(self, context, offset: int, chunk: RenderedSequence, chunk_positions, query_tail=0):
        """Run the chunk (own positions [P, Lc], placed at `offset`) over `context` (per layer
        (keys, values)); return (per layer its (keys, values) [Hkv, Lc, D], per layer (queries
        [Hq, query_tail, D] of its last positions, scale) or None when query_tail is 0)."""
        a = self.adapter
        ids_t = torch.tensor([chunk.ids], device=a.device)
        positions = (offset + chunk_positions[:, None, :]).to(a.device)
        hidden = a.embed(ids_t, [chunk])
        record = [None] * a.n_layers
        queries = [None] * a.n_layers if query_tail else None
        plan = PrefixPlan(context, record=record, backend=self.backend, queries=queries, query_tail=query_tail)
        a.run_layers(hidden, positions, a.rotary(hidden, positions), 0, a.n_layers, plan)
        return [(k[0], v[0]) for k, v in record], queries

    # -- step 2-3: probe pass with importance scores ----------------------------------------
    def _probe(self, context, chunk_kv, probe: ProbeBatch) -> dict:
        """The probe pass over the unpruned chunk: what ChunkStep.probe holds (context, probe,
        layer_inputs [B, L, H] per layer, scores [Hkv, Lc] per layer, teacher [N, H], rotary)."""
        a = self.adapter
        hidden = a.embed(probe.ids, probe.rows)
        rotary = a.rotary(hidden, probe.positions)
        layer_inputs, scores = [None] * a.n_layers, {}
        plan = ProbePlan(context, dict(enumerate(chunk_kv)), probe.valid, probe.observer,
                         scores=scores, backend=self.backend)
        out = a.run_layers(hidden, probe.positions, rotary, 0, a.n_layers, plan,
                           on_layer_input=layer_inputs.__setitem__)
        teacher = a.final_norm(out)[probe.observer]
        return {"context": context, "probe": probe, "layer_inputs": layer_inputs, "scores": scores,
                "teacher": teacher, "rotary": rotary}
