"""method="emloc": the published search (ALGORITHM.md step 4), top-down, per layer.

Each layer (or group of settings.layer_group layers) tries the candidate keep-ratios in
increasing order and accepts the first whose probe output stays within the JS tolerance of the
unpruned chunk's (the teacher). Tokens are ranked by the probe's importance scores, answer
spans (and protect_first tokens) protected.
"""
from __future__ import annotations

from emloc_kernels import TeacherJS, rank_tokens

from emloc.compression.methods.base import KEEP_ALL, SelectionMethod, candidate_sizes, gather_rows
from emloc.serving.attention import CandidateProbePlan, ProbePlan


def protection_bonus(scores, bonus: float) -> float:
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


class EMLoCSearch(SelectionMethod):
    name = "emloc"
    needs_probe = True

    def probes(self, settings):
        return settings.tolerance > 0

    def decide(self, step):
        if step.settings.tolerance == 0:  # nothing is pruned
            return [KEEP_ALL] * step.adapter.n_layers
        return _Search(step).run()


class _Search:
    """One chunk's search; step.probe holds context, probe (ProbeBatch), layer_inputs, scores,
    teacher [N, H] and rotary (the probe rows' rotary tables)."""

    def __init__(self, step):
        self.a, self.s, self.backend = step.adapter, step.settings, step.backend
        self.chunk_kv, self.protected = step.chunk_kv, step.protected
        p = step.probe
        self.context, self.probe, self.rotary = p["context"], p["probe"], p["rotary"]
        self.layer_inputs, self.scores, self.teacher = p["layer_inputs"], p["scores"], p["teacher"]

    def run(self) -> list:
        """Per layer (index or None, ratio, JS, tests): the first candidate ratio whose test passes.

        Layers are searched top-down in groups of settings.layer_group sharing one ratio (1 =
        the faithful per-layer search); each test restarts the probe at the group's lowest layer
        with the accepted sets of every layer above it.
        """
        a, s = self.a, self.s
        chunk_len = len(self.protected)
        teacher_js = TeacherJS(self.teacher, a.lm_head.weight, backend=self.backend)  # once per chunk
        ks = candidate_sizes(s.ratios, chunk_len, int(self.protected.sum()))
        # ks never decreases, so the candidates that prune anything are a prefix of the ratios;
        # one that would keep every token is the configuration already accepted above: keep all.
        trials = distinct_trials(s.ratios, ks, chunk_len)
        batched = s.batch_candidates if s.batch_candidates is not None else a.device.type == "cuda"
        kept_segments = {}  # layer -> (keys, values) of the accepted rows, for layers above
        decisions = [None] * a.n_layers
        for group in layer_groups(a.n_layers, s.layer_group):
            indices = {l: rank_tokens(self.scores[l], self.protected, [k for _, k in trials], s.pool_width,
                                      protection_bonus(self.scores[l], s.protect_bonus), backend=self.backend)
                       for l in group} if trials else {}
            test = self._test_batched if batched else self._test_in_order
            chosen, js, tests = test(group, indices, kept_segments, teacher_js, len(trials)) if trials else (None, None, 0)
            for l in group:
                index = None if chosen is None else indices[l][chosen]
                ratio = 1.0 if chosen is None else trials[chosen][0]
                decisions[l] = (index, ratio, js if chosen is not None else None, tests if l == group[0] else 0)
                kept_segments[l] = self.chunk_kv[l] if index is None else gather_rows(*self.chunk_kv[l], index)
        return decisions

    def _test_in_order(self, group, indices, kept_segments, teacher_js, n_trials):
        """Test candidates one by one; stop at the first that passes. -> (chosen or None, JS, tests)."""
        js = None
        for c in range(n_trials):
            segments = dict(kept_segments)
            for l in group:
                segments[l] = gather_rows(*self.chunk_kv[l], indices[l][c])
            js = self._js(group[0], segments, teacher_js)
            if js <= self.s.tolerance:
                return c, js, c + 1
        return None, js, n_trials

    def _js(self, start, segments, teacher_js) -> float:
        """Mean JS over answer positions of the probe restarted at layer `start` with `segments`."""
        a, probe = self.a, self.probe
        plan = ProbePlan(self.context, segments, probe.valid, probe.observer, backend=self.backend)
        out = a.run_layers(self.layer_inputs[start], probe.positions, self.rotary, start, a.n_layers, plan)
        student = a.final_norm(out)[probe.observer]
        return float(teacher_js(student).mean())  # rows are clamped at 0

    def _test_batched(self, group, indices, kept_segments, teacher_js, n_trials):
        """All candidates in one forward of n_trials replicas of the probe; same decision as in
        order (the first that passes), one host sync. -> (chosen or None, JS, tests)."""
        a, C, probe = self.a, n_trials, self.probe
        candidates = {l: [gather_rows(*self.chunk_kv[l], indices[l][c]) for c in range(C)] for l in group}
        plan = CandidateProbePlan(self.context, kept_segments, candidates, probe.valid.repeat(C, 1),
                                  backend=self.backend)
        hidden = self.layer_inputs[group[0]].repeat(C, 1, 1)
        positions = probe.positions.repeat(1, C, 1)
        out = a.run_layers(hidden, positions, a.rotary(hidden, positions), group[0], a.n_layers, plan)
        student = a.final_norm(out)[probe.observer.repeat(C, 1)]
        js = teacher_js(student, replicas=C).view(C, -1).mean(dim=1)
        passed = (js <= self.s.tolerance).tolist()
        chosen = passed.index(True) if True in passed else None
        return chosen, float(js[chosen if chosen is not None else C - 1]), C
