"""One chunk of the EMLoC loop (ALGORITHM.md steps 1-5): prefill, probe, search, append.

All tensors for one chunk live only while it is compressed; the memory is the only thing
that grows with the number of demos.
"""
from __future__ import annotations

import time

import torch

from emloc_kernels import TeacherJS, rank_tokens

from emloc.serving.attention import CandidateProbePlan, PrefixPlan, ProbePlan
from emloc.compression.baseline_scores import snapkv_index, streaming_index, tova_index
from emloc.errors import EMLoCError
from emloc.models.rendering import RenderedSequence
from emloc.compression.settings import ONE_PREFILL_METHODS
from emloc.models.vision_language import TOKEN_TYPES


def gather_rows(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor):
    """keys/values [Hkv, Lc, D], index [Hkv, k] -> the chosen rows per head, [Hkv, k, D] each."""
    idx = index[:, :, None].expand(-1, -1, keys.shape[-1])
    return torch.gather(keys, 1, idx), torch.gather(values, 1, idx)


def candidate_sizes(ratios, chunk_len: int, n_protected: int) -> list:
    """k = int(r * Lc), at least the protected count and 1, at most Lc (one per ratio)."""
    return [min(chunk_len, max(int(r * chunk_len), n_protected, 1)) for r in ratios]


def protection_bonus(scores: torch.Tensor, bonus: float) -> float:
    """The bonus added to protected tokens' pooled scores so that every one of them outranks every
    unprotected token: `bonus` (ALGORITHM.md's +100) while all scores [Hkv, Lc] stay below it, else
    bonus + the largest score (pooled scores never exceed it). Scores are sums over observers and
    query heads, so long chunks and wide GQA groups can pass 100."""
    top = float(scores.max()) if scores.numel() else 0.0
    return bonus if top < bonus else bonus + top


def distinct_trials(ratios, ks, chunk_len: int) -> list:
    """(ratio, k) per candidate size that prunes anything (k < chunk_len), the first ratio of each
    k only: two ratios clamped to the same k are the same candidate, so testing it once makes the
    same decision."""
    trials, seen = [], set()
    for r, k in zip(ratios, ks):
        if k < chunk_len and k not in seen:
            seen.add(k)
            trials.append((r, k))
    return trials


def layer_groups(n_layers: int, size: int) -> list:
    """Top-down groups of consecutive layers, each listed bottom-up: 7 layers, size 3 ->
    [[4, 5, 6], [1, 2, 3], [0]]."""
    tops = range(n_layers - 1, -1, -size)
    return [list(range(max(0, top - size + 1), top + 1)) for top in tops]


def pyramid_ratios(keep_ratio: float, n_layers: int) -> list:
    """PyramidKV-style linear schedule: 1.5x the mean at the bottom layer, 0.5x at the top."""
    if n_layers == 1:
        return [keep_ratio]
    return [min(1.0, keep_ratio * (1.5 - l / (n_layers - 1))) for l in range(n_layers)]


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
    keys/values of the last chunks (see `_context`).
    """

    def __init__(self, adapter, settings, pad_id: int):
        self.adapter, self.settings, self.pad_id = adapter, settings, pad_id
        self.backend = settings.backend
        self._recent = []  # per recent chunk: (its full (keys, values) per layer, kept rows per layer)

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

    def compress(self, memory, chunk: RenderedSequence, probe_rows: list, keep_whole=False) -> dict:
        """Append chunk `chunk` (with its demos alone in `probe_rows`) to `memory`, every token
        when keep_whole (one of the recent chunks); return stats."""
        t0 = time.perf_counter()
        a, s = self.adapter, self.settings
        chunk_len = len(chunk.ids)
        chunk_positions = a.relative_positions(chunk)
        context = self._context(memory)
        one_prefill = s.method in ONE_PREFILL_METHODS
        tail = {"snapkv": s.window, "tova": 1}.get(s.method, 0)  # queries the baseline scores use
        chunk_kv, tail_queries = self._prefill(context, memory.offset, chunk, chunk_positions, query_tail=tail)
        # the next chunk continues after the chunk's last token (a text token: the end of a turn);
        # this is where the full sequence's own position ids put it, M-RoPE included
        next_offset = memory.offset + int(chunk_positions[:, -1].max()) + 1
        self._check_fits(memory.offset + int(chunk_positions.max()) + 1, "the chunk")
        # per layer: (index [Hkv, k] or None = keep all, ratio, JS of the accepted test, tests run)
        if keep_whole or s.method == "full" or (s.method == "emloc" and s.tolerance == 0):
            decisions = [(None, 1.0, None, 0)] * a.n_layers
        elif one_prefill:
            decisions = self._baseline(chunk_kv, tail_queries)
        else:
            probe = ProbeBatch(probe_rows, next_offset, self.pad_id, a)
            self._check_fits(int(probe.positions[:, probe.valid].max()) + 1, "the chunk's probe rows")
            protected = torch.tensor(chunk.answer_mask, device=a.device)
            if memory.context_length == 0:  # the context's first tokens: the attention sink
                protected[:s.protect_first] = True
            layer_inputs, scores, teacher = self._probe(context, chunk_kv, probe)
            if s.method == "emloc":
                decisions = self._search(context, chunk_kv, probe, protected, layer_inputs, scores, teacher)
            else:
                decisions = self._fixed_schedule(chunk_len, protected, scores)
        modality = a.token_types(torch.tensor(chunk.ids))  # None for text models
        layer_stats, kept_rows = [], []
        for l, (index, ratio, js, tests) in enumerate(decisions):
            keys, values = chunk_kv[l]
            if index is None:
                index = torch.arange(chunk_len, device=keys.device)[None].expand(a.n_kv_heads, -1)
            memory.layers[l].append(keys, values, index, backend=self.backend)
            kept_rows.append(int(index.shape[1]))
            layer_stats.append({"layer": l, "kept": int(index.shape[1]), "ratio": ratio,
                                "kept_fraction": int(index.shape[1]) / chunk_len, "js": js, "tests": tests})
            if modality is not None:  # kept media tokens, averaged over KV heads
                kept = modality.to(index.device)[index]
                layer_stats[-1].update({f"kept_{kind}": float((kept == code).sum()) / a.n_kv_heads
                                        for kind, code in TOKEN_TYPES.items()})
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
    def _probe(self, context, chunk_kv, probe: ProbeBatch):
        """Returns (layer inputs [B, L, H] per layer, scores [Hkv, Lc] per layer, teacher [N, H])."""
        a = self.adapter
        hidden = a.embed(probe.ids, probe.rows)
        self._rotary = a.rotary(hidden, probe.positions)
        layer_inputs, scores = [None] * a.n_layers, {}
        plan = ProbePlan(context, dict(enumerate(chunk_kv)), probe.valid, probe.observer,
                         scores=scores, backend=self.backend)
        out = a.run_layers(hidden, probe.positions, self._rotary, 0, a.n_layers, plan,
                           on_layer_input=layer_inputs.__setitem__)
        teacher = a.final_norm(out)[probe.observer]
        return layer_inputs, scores, teacher

    # -- step 4: top-down search -------------------------------------------------------------
    def _search(self, context, chunk_kv, probe, protected, layer_inputs, scores, teacher) -> list:
        """Per layer (index or None, ratio, JS, tests): the first candidate ratio whose test passes.

        Layers are searched top-down in groups of settings.layer_group sharing one ratio (1 =
        the faithful per-layer search); each test restarts the probe at the group's lowest layer
        with the accepted sets of every layer above it.
        """
        a, s = self.adapter, self.settings
        chunk_len = len(protected)
        teacher_js = TeacherJS(teacher, a.lm_head.weight, backend=self.backend)  # once per chunk
        ks = candidate_sizes(s.ratios, chunk_len, int(protected.sum()))
        # ks never decreases, so the candidates that prune anything are a prefix of the ratios;
        # one that would keep every token is the configuration already accepted above: keep all.
        trials = distinct_trials(s.ratios, ks, chunk_len)
        batched = s.batch_candidates if s.batch_candidates is not None else a.device.type == "cuda"
        kept_segments = {}  # layer -> (keys, values) of the accepted rows, for layers above
        decisions = [None] * a.n_layers
        for group in layer_groups(a.n_layers, s.layer_group):
            indices = {l: rank_tokens(scores[l], protected, [k for _, k in trials], s.pool_width,
                                      protection_bonus(scores[l], s.protect_bonus), backend=self.backend)
                       for l in group} if trials else {}
            test = self._test_batched if batched else self._test_in_order
            chosen, js, tests = test(context, chunk_kv, probe, layer_inputs[group[0]], group, indices,
                                     kept_segments, teacher_js, len(trials)) if trials else (None, None, 0)
            for l in group:
                index = None if chosen is None else indices[l][chosen]
                ratio = 1.0 if chosen is None else trials[chosen][0]
                decisions[l] = (index, ratio, js if chosen is not None else None, tests if l == group[0] else 0)
                kept_segments[l] = chunk_kv[l] if index is None else gather_rows(*chunk_kv[l], index)
        return decisions

    def _test_in_order(self, context, chunk_kv, probe, layer_input, group, indices, kept_segments,
                       teacher_js, n_trials):
        """Test candidates one by one; stop at the first that passes. -> (chosen or None, JS, tests)."""
        js = None
        for c in range(n_trials):
            segments = dict(kept_segments)
            for l in group:
                segments[l] = gather_rows(*chunk_kv[l], indices[l][c])
            js = self._js(context, probe, layer_input, group[0], segments, teacher_js)
            if js <= self.settings.tolerance:
                return c, js, c + 1
        return None, js, n_trials

    def _js(self, context, probe, layer_input, start, segments, teacher_js) -> float:
        """Mean JS over answer positions of the probe restarted at layer `start` with `segments`."""
        a = self.adapter
        plan = ProbePlan(context, segments, probe.valid, probe.observer, backend=self.backend)
        out = a.run_layers(layer_input, probe.positions, self._rotary, start, a.n_layers, plan)
        student = a.final_norm(out)[probe.observer]
        return float(teacher_js(student).mean())  # rows are clamped at 0

    def _test_batched(self, context, chunk_kv, probe, layer_input, group, indices, kept_segments,
                      teacher_js, n_trials):
        """All candidates in one forward of n_trials replicas of the probe; same decision as in
        order (the first that passes), one host sync. -> (chosen or None, JS, tests)."""
        a, C = self.adapter, n_trials
        candidates = {l: [gather_rows(*chunk_kv[l], indices[l][c]) for c in range(C)] for l in group}
        plan = CandidateProbePlan(context, kept_segments, candidates, probe.valid.repeat(C, 1),
                                  backend=self.backend)
        hidden = layer_input.repeat(C, 1, 1)
        positions = probe.positions.repeat(1, C, 1)
        out = a.run_layers(hidden, positions, a.rotary(hidden, positions), group[0], a.n_layers, plan)
        student = a.final_norm(out)[probe.observer.repeat(C, 1)]
        js = teacher_js(student, replicas=C).view(C, -1).mean(dim=1)
        passed = (js <= self.settings.tolerance).tolist()
        chosen = passed.index(True) if True in passed else None
        return chosen, float(js[chosen if chosen is not None else C - 1]), C

    # -- baselines: fixed per-layer ratios by the same scores -----------------------------------
    def _fixed_schedule(self, chunk_len, protected, scores) -> list:
        a, s = self.adapter, self.settings
        if s.method == "uniform":
            ratios = [s.keep_ratio] * a.n_layers
        else:
            ratios = pyramid_ratios(s.keep_ratio, a.n_layers)
        decisions = []
        for l, ratio in enumerate(ratios):
            (k,) = candidate_sizes([ratio], chunk_len, int(protected.sum()))
            index = None if k >= chunk_len else rank_tokens(
                scores[l], protected, [k], s.pool_width, protection_bonus(scores[l], s.protect_bonus),
                backend=self.backend)[0]
            decisions.append((index, ratio, None, 0))
        return decisions

    def _baseline(self, chunk_kv, tail_queries) -> list:
        """Decisions of the one-prefill baselines (snapkv, tova, streaming) at keep_ratio."""
        s = self.settings
        decisions = []
        for l, (keys, _) in enumerate(chunk_kv):
            length = keys.shape[1]
            (k,) = candidate_sizes([s.keep_ratio], length, 0)
            if k >= length:
                index = None
            elif s.method == "streaming":
                index = streaming_index(keys.shape[0], length, k, s.sinks, keys.device)
            else:
                queries, scale = tail_queries[l]
                select = snapkv_index if s.method == "snapkv" else tova_index
                index = select(queries, keys, k, scale)
            decisions.append((index, s.keep_ratio, None, 0))
        return decisions
