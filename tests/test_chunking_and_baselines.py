"""Chunking options (chunk_tokens, lookback_chunks), presets and the one-prefill baselines
(snapkv, tova, streaming), each against a reference written here or the model's own forward."""
import math

import pytest
import torch

import emloc
from emloc.compression.baseline_scores import snapkv_index, streaming_index, tova_index
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [
    {"input": "the movie was great", "output": "positive"},
    {"input": "terrible plot, I left early", "output": "negative"},
    {"input": "wonderful actors", "output": "positive"},
    {"input": "boring scenes", "output": "negative"},
    {"input": "what a great house", "output": "positive"},
    {"input": "the capital of france is paris", "output": "positive"},
    {"input": "I left early, boring", "output": "negative"},
]
QUERY = "the plot was boring"


# -- the score functions against loops in float64 -----------------------------------------------
def loop_window_attention(q, k, scale):
    """[Hq, w, L] float64 softmax with plain loops; query i sits at position L - w + i."""
    n_q, w, _ = q.shape
    n_kv, length, _ = k.shape
    out = torch.zeros(n_q, w, length, dtype=torch.float64)
    for h in range(n_q):
        kv = h // (n_q // n_kv)
        for i in range(w):
            visible = length - w + i + 1
            logits = [float(q[h, i].double() @ k[kv, t].double()) * scale for t in range(visible)]
            top = max(logits)
            z = sum(math.exp(x - top) for x in logits)
            for t in range(visible):
                out[h, i, t] = math.exp(logits[t] - top) / z
    return out


def loop_pool(row, width=5):
    half = width // 2
    return [sum(row[j] for j in range(t - half, t + half + 1) if 0 <= j < len(row)) / width
            for t in range(len(row))]


def loop_top_k(scores, k):
    order = sorted(range(len(scores)), key=lambda t: -scores[t])
    return sorted(order[:k])


@pytest.mark.parametrize("n_q,n_kv,length,w,k", [(4, 2, 13, 4, 6), (3, 3, 9, 1, 4), (4, 1, 7, 3, 7),
                                                  (2, 2, 5, 5, 3)])
def test_snapkv_index_matches_a_loop_reference(n_q, n_kv, length, w, k):
    torch.manual_seed(n_q * 100 + length)
    q, keys = torch.randn(n_q, w, 8), torch.randn(n_kv, length, 8)
    ours = snapkv_index(q, keys, k, 0.35)
    attn = loop_window_attention(q, keys, 0.35)
    group = n_q // n_kv
    for h in range(n_kv):
        if w >= length:
            expected = list(range(length - k, length))  # all window: the most recent
        else:
            pooled = [loop_pool([sum(attn[g, i, t].item() for i in range(w)) / w for t in range(length - w)])
                      for g in range(h * group, (h + 1) * group)]
            scores = [sum(p[t] for p in pooled) / group for t in range(length - w)]
            scores += [max(scores) + 1.0] * w  # the window is always kept
            expected = loop_top_k(scores, k)
        assert ours[h].tolist() == expected


@pytest.mark.parametrize("n_q,n_kv,length,k", [(4, 2, 11, 5), (3, 1, 6, 2), (2, 2, 1, 1)])
def test_tova_index_matches_a_loop_reference(n_q, n_kv, length, k):
    torch.manual_seed(length)
    q, keys = torch.randn(n_q, 3, 8), torch.randn(n_kv, length, 8)
    ours = tova_index(q, keys, k, 0.5)
    attn = loop_window_attention(q[:, -1:], keys, 0.5)
    scores = [sum(attn[h, 0, t].item() for h in range(n_q)) / n_q for t in range(length - 1)]
    scores += [max(scores, default=0.0) + 1.0]
    assert ours.tolist() == [loop_top_k(scores, k)] * n_kv


def test_streaming_index_keeps_sinks_and_the_most_recent():
    assert streaming_index(2, 10, 6, 4).tolist() == [[0, 1, 2, 3, 8, 9]] * 2
    assert streaming_index(1, 10, 3, 4).tolist() == [[0, 1, 2]]
    assert streaming_index(1, 5, 2, 0).tolist() == [[3, 4]]


# -- the baselines end to end against the model's own attention ----------------------------------
def context_keys_and_attention(model, comp, demos, attentions=True):
    """The model's own forward over the uncompressed context: per layer the keys [Hkv, L, D]
    and (eager attention) the attention weights [Hq, L, L]."""
    ids = comp.full_inputs(demos, QUERY)["input_ids"]
    n_context = ids.shape[1] - len(comp.renderer.query(QUERY).ids)
    with torch.no_grad():
        out = model(input_ids=ids[:, :n_context], use_cache=True, output_attentions=attentions)
    return [layer.keys[0] for layer in out.past_key_values.layers], [a[0] for a in out.attentions or ()]


@pytest.mark.parametrize("method", ["snapkv", "tova", "streaming"])
def test_one_prefill_baselines_keep_the_tokens_the_model_attention_picks(method):
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, std=0.2, seed=3)
    model.set_attn_implementation("eager")
    comp = emloc.EMLoC(model, chat_tokenizer(), method=method, keep_ratio=0.4, window=8, progress=False)
    memory = comp.compress(DEMOS)
    keys, attentions = context_keys_and_attention(model, comp, DEMOS)
    length = keys[0].shape[1]
    k = int(0.4 * length)
    assert len(memory.stats) == 1 and memory.context_length == length
    for l, (full_keys, attn) in enumerate(zip(keys, attentions)):
        if method == "snapkv":
            scores = attn[:, -8:, :-8].mean(dim=1)
            scores = torch.nn.functional.avg_pool1d(scores[:, None], 5, stride=1, padding=2)[:, 0]
            scores = scores.view(2, 2, -1).mean(dim=1)
            scores = torch.cat([scores, torch.full((2, 8), scores.max().item() + 1)], dim=1)
        elif method == "tova":
            scores = attn[:, -1, :-1].mean(dim=0)
            scores = torch.cat([scores, scores.max()[None] + 1])[None].expand(2, -1)
        else:
            scores = torch.zeros(2, length)
            scores[:, :4] = 1
            scores[:, length - (k - 4):] = 1
        index = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        expected = torch.gather(full_keys, 1, index[:, :, None].expand(-1, -1, full_keys.shape[-1]))
        assert memory.layers[l].keys.shape == expected.shape
        assert (memory.layers[l].keys - expected).abs().max().item() <= 1e-5


# -- lookback: chunks prefilled over the uncompressed history --------------------------------------
def nearest_row_distance(memory, full_keys) -> float:
    """Largest distance from a memory key row to the closest key of the same head in the
    uncompressed context's forward (0 = every kept key is an exact context key)."""
    worst = 0.0
    for layer, keys in zip(memory.layers, full_keys):
        for h in range(keys.shape[0]):
            worst = max(worst, torch.cdist(layer.keys[h].double(), keys[h].double()).min(dim=1).values.max().item())
    return worst


def test_lookback_all_keeps_the_uncompressed_contexts_keys_and_zero_drifts():
    model = tiny_model("qwen2", n_heads=4, n_kv_heads=2, std=0.2, seed=4)
    tok = chat_tokenizer()
    drift = {}
    for lookback in (0, "all"):
        comp = emloc.EMLoC(model, tok, method="uniform", keep_ratio=0.5, demos_per_chunk=2,
                           lookback_chunks=lookback, progress=False)
        memory = comp.compress(DEMOS)
        keys, _ = context_keys_and_attention(model, comp, DEMOS, attentions=False)
        drift[lookback] = nearest_row_distance(memory, keys)
        assert len(memory.stats) == 4 and memory.compression_ratio > 1.8
    print(drift)
    assert drift["all"] <= 1e-4   # every kept key is the full context's key at that position
    assert drift[0] > 1e-2        # faithful chunking: later chunks see a pruned memory


def test_lookback_one_sees_only_the_previous_chunk_uncompressed():
    """lookback 1 = lookback 'all' on two chunks, and differs from it on three or more."""
    model = tiny_model("llama", std=0.2, seed=6)
    tok = chat_tokenizer()

    def memory(lookback, demos):
        return emloc.EMLoC(model, tok, method="uniform", keep_ratio=0.5, demos_per_chunk=2,
                           lookback_chunks=lookback, progress=False).compress(demos)

    two, many = DEMOS[:4], DEMOS
    for a, b in zip(memory(1, two).layers, memory("all", two).layers):
        assert torch.equal(a.keys, b.keys)
    diffs = [(a.keys - b.keys).abs().max().item() for a, b in zip(memory(1, many).layers, memory("all", many).layers)]
    assert max(diffs) > 1e-4


# -- chunk_tokens ------------------------------------------------------------------------------
def test_chunk_tokens_cuts_greedily_and_keeps_the_full_context_exact():
    model = tiny_model("llama", std=0.2, seed=1)
    tok = chat_tokenizer()
    comp = emloc.EMLoC(model, tok, method="full", chunk_tokens=40, progress=False)
    memory = comp.compress(DEMOS, system="Classify the sentiment.")
    alone = [len(comp.renderer.demos([d], system=False).ids) for d in DEMOS]
    sizes = [c["demos"] for c in memory.stats]
    assert sum(sizes) == len(DEMOS) and len(sizes) > 1
    start = 0
    for size in sizes:
        used = sum(alone[start:start + size])
        assert size == 1 or used <= 40
        if start + size < len(DEMOS):  # the next demo would not have fit
            assert used + alone[start + size] > 40
        start += size
    with torch.no_grad():
        reference = model(**comp.full_inputs(DEMOS, QUERY, system="Classify the sentiment.")).logits[0, -1]
    assert (comp.logits(memory, QUERY)[0] - reference).abs().max().item() <= 1e-4


# -- recent_tokens -----------------------------------------------------------------------------
def test_recent_tokens_keeps_the_last_demos_whole_and_prunes_the_rest_as_before():
    model, tok = tiny_model("llama", std=0.2, seed=8), chat_tokenizer()
    plain = emloc.EMLoC(model, tok, method="uniform", keep_ratio=0.3, demos_per_chunk=2, progress=False)
    alone = [len(plain.renderer.demos([d], system=False).ids) for d in DEMOS]
    budget = sum(alone[-3:])  # exactly the last three demos fit
    recent = emloc.EMLoC(model, tok, method="uniform", keep_ratio=0.3, demos_per_chunk=2,
                         recent_tokens=budget, progress=False)
    a, b = plain.compress(DEMOS), recent.compress(DEMOS)
    assert [c["demos"] for c in b.stats] == [2, 2, 2, 1]  # older demos 0-3, recent demos 4-6
    assert [c["kept_whole"] for c in b.stats] == [False, False, True, True]
    for l, layer in enumerate(b.layers):
        older = sum(c["layers"][l]["kept"] for c in b.stats[:2])
        assert layer.length == older + sum(c["tokens"] for c in b.stats[2:])
        assert older < sum(c["tokens"] for c in b.stats[:2])
    older_tokens = sum(c["tokens"] for c in b.stats[:2])
    for x, y in zip(a.layers, b.layers):  # the older chunks: as before
        n = int((y.positions[0] < older_tokens).sum())
        assert torch.equal(x.keys[:, :n], y.keys[:, :n]) and torch.equal(x.positions[:, :n], y.positions[:, :n])
        assert int((x.positions[0] < older_tokens).sum()) == n
    with pytest.raises(emloc.EMLoCError, match="recent_tokens"):  # not what compressing 4 demos keeps
        b.first_chunks(2)
    one_less = emloc.EMLoC(model, tok, method="uniform", keep_ratio=0.3, demos_per_chunk=2,
                           recent_tokens=budget - 1, progress=False).compress(DEMOS)
    assert sum(c["demos"] for c in one_less.stats if c["kept_whole"]) == 2


def test_recent_and_token_chunks_render_the_full_sequence_exactly():
    model = tiny_model("qwen2", n_kv_heads=2, std=0.2, seed=9)
    comp = emloc.EMLoC(model, chat_tokenizer(), method="full", chunk_tokens=30, recent_tokens=50,
                       progress=False)
    memory = comp.compress(DEMOS, system="Classify.")
    assert any(c["kept_whole"] for c in memory.stats) and not all(c["kept_whole"] for c in memory.stats)
    with torch.no_grad():
        reference = model(**comp.full_inputs(DEMOS, QUERY, system="Classify.")).logits[0, -1]
    assert (comp.logits(memory, QUERY)[0] - reference).abs().max().item() <= 1e-4


# -- presets and settings ----------------------------------------------------------------------
def test_presets_fill_settings_and_explicit_arguments_win():
    model, tok = tiny_model("llama"), chat_tokenizer()
    assert "faithful" in emloc.PRESETS
    faithful = emloc.EMLoC(model, tok, preset="faithful").settings
    assert faithful == emloc.EMLoC(model, tok).settings == emloc.Settings()
    assert faithful.demos_per_chunk == 4 and faithful.lookback_chunks == 0
    for name, values in emloc.PRESETS.items():
        settings = emloc.EMLoC(model, tok, preset=name).settings
        assert all(getattr(settings, key) == value for key, value in values.items())
        assert emloc.EMLoC(model, tok, preset=name, tolerance=0.5).settings.tolerance == 0.5
        assert emloc.EMLoC(model, tok, preset=name, demos_per_chunk=3).settings.demos_per_chunk == 3
    with pytest.raises(emloc.EMLoCError, match="unknown preset"):
        emloc.EMLoC(model, tok, preset="fastest")


@pytest.mark.parametrize("kwargs,match", [
    ({"chunk_tokens": 0}, "chunk_tokens"), ({"chunk_tokens": 2.5}, "chunk_tokens"),
    ({"chunk_tokens": 100, "demos_per_chunk": 2}, "not both"),
    ({"lookback_chunks": -1}, "lookback_chunks"), ({"lookback_chunks": "some"}, "lookback_chunks"),
    ({"lookback_chunks": True}, "lookback_chunks"), ({"recent_tokens": -1}, "recent_tokens"),
    ({"recent_tokens": 1.5}, "recent_tokens"),
    ({"method": "snapkv"}, "keep_ratio"), ({"method": "tova", "keep_ratio": 1.5}, "keep_ratio"),
    ({"method": "snapkv", "keep_ratio": 0.5, "window": 0}, "window"),
    ({"method": "streaming", "keep_ratio": 0.5, "sinks": -1}, "sinks"),
])
def test_bad_chunking_and_baseline_settings_are_refused(kwargs, match):
    with pytest.raises(emloc.EMLoCError, match=match):
        emloc.Settings(**kwargs)


def test_baselines_take_the_whole_context_in_one_chunk_unless_told():
    assert emloc.Settings(method="snapkv", keep_ratio=0.5).demos_per_chunk is None
    assert emloc.Settings().demos_per_chunk == 4
    model = tiny_model("llama", std=0.2, seed=2)
    comp = emloc.EMLoC(model, chat_tokenizer(), method="tova", keep_ratio=0.5, demos_per_chunk=3, progress=False)
    assert len(comp.compress(DEMOS).stats) == 3


# -- the demo ----------------------------------------------------------------------------------
def test_demo_prints_answers_without_demos_with_the_full_context_and_from_the_memory(monkeypatch):
    import emloc.cli.demo

    model = tiny_model("llama", std=0.2, seed=5)
    monkeypatch.setattr(emloc.cli.demo, "load_model", lambda path=None: (model, chat_tokenizer()))
    lines = []
    result = emloc.cli.demo.run_demo(n_demos=8, n_queries=3, preset="sink-recent", out=lines.append)
    demos, queries = emloc.cli.demo.load_word_sentiment()
    assert len(demos) == 108 and len(queries) == 150
    header = next(i for i, line in enumerate(lines) if line.startswith("word"))
    assert "no demos" in lines[header] and "full context" in lines[header]
    assert len(lines[header + 1:header + 4]) == 3 and lines[-1].startswith("exact answers: no demos")
    assert result["memory"].settings["recent_tokens"] == emloc.PRESETS["sink-recent"]["recent_tokens"]
    assert len(result["zero_shot_answers"]) == len(result["answers"]) == len(result["full_answers"]) == 3


# -- protected tokens and candidate sizes ---------------------------------------------------------
def test_protected_tokens_are_kept_even_when_scores_pass_the_bonus():
    from emloc.compression.methods.emloc_search import protection_bonus
    from emloc_kernels import rank_tokens

    torch.manual_seed(0)
    scores = torch.rand(2, 23) * 3.0
    scores[:, 5:12] += 400.0  # sums over many observers and a wide GQA group can pass 100
    protected = torch.zeros(23, dtype=torch.bool)
    protected[[0, 1, 17, 18, 22]] = True
    k = int(protected.sum()) + 2
    plain = rank_tokens(scores, protected, [k], 5, 100.0, backend="torch")[0]
    assert not all(set(protected.nonzero().flatten().tolist()) <= set(row.tolist()) for row in plain)
    bonus = protection_bonus(scores, 100.0)
    assert bonus > 100.0 and protection_bonus(scores.clamp(max=50.0), 100.0) == 100.0
    for backend in ("torch", "triton"):
        kept = rank_tokens(scores, protected, [k], 5, bonus, backend=backend)[0]
        for row in kept.tolist():
            assert set(protected.nonzero().flatten().tolist()) <= set(row) and row == sorted(row)


def test_ratios_clamped_to_the_same_size_are_tested_once_and_the_kept_fraction_is_reported():
    from emloc.compression.methods.emloc_search import distinct_trials

    assert distinct_trials([0.1, 0.2, 0.5, 0.9], [7, 7, 12, 20], 20) == [(0.1, 7), (0.5, 12)]
    model = tiny_model("llama", std=0.2, seed=7)
    comp = emloc.EMLoC(model, chat_tokenizer(), ratios=(0.01, 0.02, 0.5), tolerance=1e-9, demos_per_chunk=3,
                       progress=False, backend="torch")
    memory = comp.compress(DEMOS)
    for chunk in memory.stats:
        for layer in chunk["layers"]:
            assert layer["tests"] <= 2  # 0.01 and 0.02 both clamp to the protected count
            assert layer["kept_fraction"] == layer["kept"] / chunk["tokens"]
    assert any(layer["tests"] == 2 for chunk in memory.stats for layer in chunk["layers"])
