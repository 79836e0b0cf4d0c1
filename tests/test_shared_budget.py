"""The shared-budget methods (method="budget", "tova-stream"): one budget over the whole context,
each chunk prefilled over the memory; their memory (rows with context positions), and the
baselines' protection and chunking fixes that came with them."""
import math

import pytest
import torch

import emloc
from emloc.io import memory_file
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


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=3, std=0.2, seed=8)


def compress(model, **settings):
    return emloc.EMLoC(model, chat_tokenizer(), progress=False, **settings).compress(DEMOS, system="Classify.")


def chunk_starts(memory):
    starts, at = [], 0
    for chunk in memory.stats:
        starts.append(at)
        at += chunk["tokens"]
    return starts


def test_budget_in_one_chunk_is_one_prefill_snapkv(model):
    ours = compress(model, method="budget", keep_ratio=0.3, demos_per_chunk=len(DEMOS))
    snap = compress(model, method="snapkv", keep_ratio=0.3)
    for a, b in zip(ours.layers, snap.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)


def test_budget_without_evictions_until_the_end_selects_what_one_prefill_snapkv_selects(model):
    """pool_factor = 1 / keep_ratio: the pool holds every token until the last chunk, whose
    window (the context's last `window` queries) then selects over the exact chunked prefill:
    SnapKV's choice over the whole context, by a different path (chunk by chunk)."""
    ours = compress(model, method="budget", keep_ratio=0.25, pool_factor=4, demos_per_chunk=2, window=8,
                    pool_scores="window")
    snap = compress(model, method="snapkv", keep_ratio=0.25, window=8)
    assert len(ours.stats) == 4 and len(snap.stats) == 1
    assert ours.stats[-1]["tokens"] >= 8  # the last chunk holds the whole window
    for a, b in zip(ours.layers, snap.layers):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)


def test_window_means_rank_by_the_mean_of_the_windows_that_saw_each_row():
    """Two chunks by hand: chunk 1 has 3 rows (the last 1 is its window), chunk 2 adds 2 rows
    (window 1). Row means: what the windows gave them, divided by how many windows saw them."""
    from emloc.compression.methods.budget import WindowMeans

    means = WindowMeans()
    first = torch.tensor([[0.5, 0.2, 0.3]])
    ranked = means.add(0, first, window=1, chunk_len=3)
    assert ranked[0, :2].tolist() == pytest.approx([0.5, 0.2])
    assert ranked[0, 2] > 0.5  # the window row, unseen, ranks above every seen row
    means.keep(0, torch.tensor([[0, 2]]))  # row 1 evicted
    second = torch.tensor([[0.1, 0.7, 0.4, 0.05]])  # memory rows (old 0, old 2), chunk rows 0, 1
    ranked = means.add(0, second, window=1, chunk_len=2)
    assert ranked[0, :3].tolist() == pytest.approx([(0.5 + 0.1) / 2, 0.7, 0.4])
    assert ranked[0, 3] > 0.7
    assert means.counts[0].tolist() == [[2.0, 1.0, 1.0, 0.0]]


def test_mean_scores_differ_from_the_last_window_alone(model):
    """pool_scores="mean" is a different selection from "window" once the pool evicts."""
    kw = dict(method="budget", keep_ratio=0.25, demos_per_chunk=1, window=4)
    mean, last = compress(model, **kw), compress(model, pool_scores="window", **kw)
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(mean.layers, last.layers))


@pytest.mark.parametrize("method,pool_factor", [("budget", 2.0), ("budget", 1.0), ("tova-stream", 2.0)])
def test_the_pool_stays_bounded_and_the_memory_ends_at_the_budget(model, monkeypatch, method, pool_factor):
    from emloc.io.memory import LayerMemory

    ratio, longest = 0.3, []
    real_select = LayerMemory.select

    def spy(self, *args, **kwargs):
        real_select(self, *args, **kwargs)
        longest.append(self.length)

    monkeypatch.setattr(LayerMemory, "select", spy)
    memory = compress(model, method=method, keep_ratio=ratio, pool_factor=pool_factor, demos_per_chunk=1,
                      window=4)
    total = memory.context_length
    cap = math.ceil((pool_factor if method == "budget" else 1.0) * ratio * total)
    assert longest and max(longest) <= cap  # evictions happened, never above the pool's cap
    for layer in memory.layers:
        assert layer.length == int(ratio * total)
        assert bool((layer.positions[:, 1:] > layer.positions[:, :-1]).all())
    last = memory.stats[-1]["tokens"]
    window = min(4, last) if method == "budget" else 1
    for layer in memory.layers:  # the last window is always kept
        assert bool((layer.positions[:, -window:] == torch.arange(total - window, total)).all())


def test_budget_memory_rows_differ_per_head_and_survive_a_file(model, tmp_path):
    memory = compress(model, method="budget", keep_ratio=0.3, demos_per_chunk=1, window=4)
    assert any(not torch.equal(l.positions[0], l.positions[1]) for l in memory.layers)  # per-head choices
    starts = chunk_starts(memory)
    for l, layer in enumerate(memory.layers):
        for c, chunk in enumerate(memory.stats):  # kept: the chunk's rows in the memory, per head
            end = starts[c] + chunk["tokens"]
            count = ((layer.positions >= starts[c]) & (layer.positions < end)).sum(dim=1).double().mean()
            assert chunk["layers"][l]["kept"] == pytest.approx(float(count))
    path = tmp_path / "budget.emloc"
    memory.save(path)
    loaded = emloc.TaskMemory.load(path, model)
    for a, b in zip(memory.layers, loaded.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.keys, b.keys)
    with pytest.raises(emloc.EMLoCError, match="shares one budget"):
        memory.first_chunks(2)


def file_parts(memory):
    header = {"offset": memory.offset, "context_length": memory.context_length,
              "fingerprint": memory.fingerprint, "settings": memory.settings, "stats": memory.stats}
    tensors = {}
    for i, layer in enumerate(memory.layers):
        tensors[f"layers.{i}.keys"] = layer.keys.contiguous()
        tensors[f"layers.{i}.values"] = layer.values.contiguous()
        tensors[f"layers.{i}.positions"] = layer.positions.clone()
    return header, tensors


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.__setitem__((0, 1), p[0, 0]), "do not increase"),
    (lambda p: p.__setitem__((1, -1), 10_000), "outside the context"),
    (lambda p: p.__setitem__((0, 0), -1), "outside the context"),
])
def test_positions_that_break_the_memory_are_never_written(model, edit, match):
    header, tensors = file_parts(compress(model, method="budget", keep_ratio=0.5, demos_per_chunk=2))
    memory_file.encode(header, tensors)  # the memory as made is fine
    edit(tensors["layers.1.positions"])
    with pytest.raises(emloc.EMLoCError, match=match):
        memory_file.encode(header, tensors)


def test_positions_must_agree_with_the_chunks_kept_counts(model):
    """A kept count moved from one chunk to another (the layer's total, so the tensor shapes, the
    same) contradicts the positions: refused."""
    import copy

    memory = compress(model, method="uniform", keep_ratio=0.5, demos_per_chunk=2)
    header, tensors = file_parts(memory)
    header["stats"] = copy.deepcopy(memory.stats)
    header["stats"][0]["layers"][2]["kept"] -= 1
    header["stats"][1]["layers"][2]["kept"] += 1
    with pytest.raises(emloc.EMLoCError, match="chunk 0, layer 2: kept is"):
        memory_file.encode(header, tensors)


def test_one_prefill_baselines_keep_protect_first(model):
    for method in ("snapkv", "tova", "streaming"):
        memory = compress(model, method=method, keep_ratio=0.2, protect_first=5, sinks=0)
        for layer in memory.layers:
            assert bool((layer.positions[:, :5] == torch.arange(5)).all()), method


def test_streaming_keeps_the_sinks_of_the_context_not_of_every_chunk(model):
    memory = compress(model, method="streaming", keep_ratio=0.5, demos_per_chunk=2, sinks=3)
    starts = chunk_starts(memory)
    for layer in memory.layers:
        kept = set(layer.positions[0].tolist())
        assert {0, 1, 2} <= kept
        for c in range(1, len(starts)):  # a later chunk keeps its most recent tokens only
            assert starts[c] not in kept


def test_a_preset_does_not_chunk_a_one_prefill_method(model):
    comp = emloc.EMLoC(model, chat_tokenizer(), preset="sink-recent", method="snapkv", keep_ratio=0.5, progress=False)
    assert comp.settings.chunk_tokens is None
    assert emloc.EMLoC(model, chat_tokenizer(), preset="sink-recent", progress=False).settings.chunk_tokens == 512


@pytest.mark.parametrize("bad", [0.5, -1, float("nan"), "2", True])
def test_pool_factor_must_be_a_number_of_at_least_one(bad):
    with pytest.raises(emloc.EMLoCError, match="pool_factor"):
        emloc.Settings(method="budget", keep_ratio=0.3, pool_factor=bad)


def test_budget_methods_refuse_lookback():
    with pytest.raises(emloc.EMLoCError, match="lookback_chunks"):
        emloc.Settings(method="budget", keep_ratio=0.3, lookback_chunks=1)
