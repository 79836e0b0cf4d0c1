"""Serving a memory: tokenizer fingerprint, in-place reads, per-row stops, sampling, device placement."""
import copy
import os
import stat
from types import SimpleNamespace

import pytest
import torch

import emloc
import emloc.serving.attention
from emloc.serving.answering import Sampler, generate_batch
from emloc.models.adapter import DecoderAdapter
from tiny_models import CHATML_TEMPLATE, chat_tokenizer, tiny_compressed

DEMOS = [{"input": f"review {i}: the movie was {'great' if i % 3 else 'terrible'}",
          "output": "positive" if i % 3 else "negative"} for i in range(8)]
QUERIES = [f"{adj} {noun} number {i}" for i, (adj, noun) in enumerate(
    [(a, n) for a in ("great", "boring", "terrible", "wonderful", "plain")
     for n in ("plot", "actors", "movie", "house")])]  # 20 queries of different lengths


@pytest.fixture(scope="module")
def compressed():
    return tiny_compressed(DEMOS)


def snapshot(memory):
    return [(l.keys.clone(), l.values.clone(), l._k.data_ptr()) for l in memory.layers], memory.offset


def assert_unchanged(memory, snap):
    layers, offset = snap
    assert memory.offset == offset
    for layer, (k, v, ptr) in zip(memory.layers, layers):
        assert layer._k.data_ptr() == ptr
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def other_tokenizer(change: str):
    tok = copy.deepcopy(chat_tokenizer())
    if change == "chat_template":
        tok.chat_template = CHATML_TEMPLATE.replace("a tiny test model", "another model")
    elif change == "special_ids":
        tok.pad_token = "<|im_start|>"
    return tok


# -- tokenizer fingerprint -------------------------------------------------------------------
@pytest.mark.parametrize("change", ["chat_template", "special_ids"])
def test_memory_used_with_another_tokenizer_is_refused(compressed, tmp_path, change):
    comp, memory = compressed
    path = tmp_path / "task.emloc"
    memory.save(path)
    loaded = emloc.TaskMemory.load(path, comp.model)  # the model fits: load accepts it
    assert loaded.fingerprint["tokenizer"] == memory.fingerprint["tokenizer"]
    other = emloc.EMLoC(comp.model, other_tokenizer(change), progress=False)
    for use in (lambda: other.generate(loaded, "q", max_new_tokens=2), lambda: other.logits(loaded, "q")):
        with pytest.raises(emloc.EMLoCError, match="another tokenizer"):
            use()
    same = emloc.EMLoC(comp.model, copy.deepcopy(chat_tokenizer()), progress=False)
    assert torch.equal(same.logits(loaded, "q"), comp.logits(memory, "q"))


def test_saved_file_is_readable_by_others_as_umask_allows(compressed, tmp_path):
    comp, memory = compressed
    path = tmp_path / "shared.emloc"
    old = os.umask(0o022)
    try:
        memory.save(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_memory_without_tokenizer_fingerprint_is_refused(compressed):
    comp, memory = compressed
    stripped = memory.first_chunks(len(memory.stats))
    del stripped.fingerprint["tokenizer"]
    with pytest.raises(emloc.EMLoCError, match="another tokenizer"):
        comp.generate(stripped, "q")


# -- answering reads the memory in place and never changes it ---------------------------------
def test_twenty_queries_leave_memory_bit_identical_and_read_in_place(compressed, monkeypatch):
    comp, memory = compressed
    snap = snapshot(memory)
    buffers = {(t.data_ptr(), t.shape) for l in memory.layers for t in (l.keys, l.values)}
    seen = []
    real = emloc.serving.attention.prefix_attention

    def spy(q, mem_k, mem_v, own_k, own_v, *args, **kwargs):
        seen.extend([(mem_k.data_ptr(), mem_k.shape), (mem_v.data_ptr(), mem_v.shape)])
        return real(q, mem_k, mem_v, own_k, own_v, *args, **kwargs)

    monkeypatch.setattr(emloc.serving.attention, "prefix_attention", spy)
    for start in range(0, 16, 8):
        comp.generate(memory, QUERIES[start:start + 8], max_new_tokens=3)
    for q in QUERIES[16:19]:
        comp.logits(memory, q, continuation="positive")
    comp.generate(memory, QUERIES[19], max_new_tokens=3, do_sample=True, temperature=0.8, top_k=5, seed=3)
    assert len(seen) >= 2 * 3 * 6  # K and V of 3 layers in at least one forward per call
    assert set(seen) <= buffers  # the memory's own buffers, [Hkv, M, D]: no copy, no per-row expand
    assert_unchanged(memory, snap)


# -- per-row lengths and stops ----------------------------------------------------------------
def test_each_row_stops_at_its_own_stop_token(compressed):
    comp, memory = compressed
    rows = [comp.renderer.query(q) for q in ("great plot", "the boring movie was terrible", "actors")]
    assert len({len(r.ids) for r in rows}) == 3  # the batch is padded differently per row
    with comp.adapter.emloc_attention():
        free = generate_batch(comp.adapter, memory, rows, set(), comp.pad_id, 6, Sampler(), "auto")
        stop = {free[0][2]}
        stopped = generate_batch(comp.adapter, memory, rows, stop, comp.pad_id, 6, Sampler(), "auto")
    for run, out in zip(free, stopped):
        first = next((i for i, t in enumerate(run) if t in stop), None)
        assert out == (run if first is None else run[:first + 1])
    assert len(stopped[0]) <= 3 and len(free[0]) == 6


def test_batch_of_different_lengths_equals_one_by_one(compressed):
    comp, memory = compressed
    queries = QUERIES[::3]
    assert comp.generate(memory, queries, max_new_tokens=5) == [
        comp.generate(memory, q, max_new_tokens=5) for q in queries]


# -- sampling --------------------------------------------------------------------------------
def test_sampling_options(compressed):
    comp, memory = compressed
    greedy = comp.generate(memory, QUERIES[:4], max_new_tokens=5)
    assert comp.generate(memory, QUERIES[:4], max_new_tokens=5, do_sample=True, top_k=1, seed=1) == greedy
    assert comp.generate(memory, QUERIES[:4], max_new_tokens=5, do_sample=True, top_p=1e-6, seed=2) == greedy
    hot = dict(max_new_tokens=6, do_sample=True, temperature=5.0, seed=11)
    assert comp.generate(memory, QUERIES[:4], **hot) == comp.generate(memory, QUERIES[:4], **hot)
    assert comp.generate(memory, QUERIES[:4], **hot) != greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    sampler = Sampler(do_sample=True, top_p=0.8)
    sampler.seed("cpu", 0)
    drawn = {int(sampler(logits)) for _ in range(200)}
    assert drawn == {0, 1}


@pytest.mark.parametrize("kwargs,message", [
    ({"top_k": 3}, "do_sample=True"),
    ({"do_sample": True, "top_k": 0}, "top_k"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": True, "temperature": 0}, "temperature"),
])
def test_bad_sampling_options(compressed, kwargs, message):
    comp, memory = compressed
    with pytest.raises(emloc.EMLoCError, match=message):
        comp.generate(memory, "q", **kwargs)


# -- memories of fewer chunks -----------------------------------------------------------------
def test_first_chunks_equals_compressing_fewer_demos(compressed):
    comp, memory = compressed
    direct = comp.compress(DEMOS[:4], system="Classify.")
    part = memory.first_chunks(1)
    assert part.layer_lengths == direct.layer_lengths and part.offset == direct.offset
    assert part.context_length == direct.context_length
    for a, b in zip(part.layers, direct.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert comp.generate(part, QUERIES[:3], max_new_tokens=4) == comp.generate(direct, QUERIES[:3],
                                                                               max_new_tokens=4)
    with pytest.raises(emloc.EMLoCError, match="chunks"):
        memory.first_chunks(3)


# -- device placement ---------------------------------------------------------------------------
def test_layer_memory_follows_each_layer_device(compressed, tmp_path):
    comp, memory = compressed
    path = tmp_path / "task.emloc"
    memory.save(path)
    split = copy.deepcopy(comp.model)
    split.model.layers[1]._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))  # a second device
    split.model.layers[2]._hf_hook = SimpleNamespace(execution_device=torch.device("meta"))
    adapter = DecoderAdapter(split)
    assert [d.type for d in adapter.layer_devices] == ["cpu", "meta", "meta"]
    assert adapter.device.type == "cpu"
    loaded = emloc.TaskMemory.load(path, split)
    assert [l.keys.device.type for l in loaded.layers] == ["cpu", "meta", "meta"]
    assert loaded.layer_lengths == memory.layer_lengths
    with pytest.raises(emloc.EMLoCError, match="layer 1 of the memory is on meta"):
        comp.generate(loaded, "q")


def test_layers_on_different_devices_answer_like_one_device(compressed):
    comp, memory = compressed
    expected = comp.generate(memory, QUERIES[:5], max_new_tokens=6)
    split = emloc.EMLoC(comp.model, chat_tokenizer(), progress=False)
    # cpu and cpu:0 are distinct devices to the routing (one plan, cache and mask per device),
    # non-contiguous: layers 0 and 2 share a device, so their cache indices are local.
    split.adapter.layer_devices = [torch.device("cpu"), torch.device("cpu", 0), torch.device("cpu")]
    assert split.generate(memory, QUERIES[:5], max_new_tokens=6) == expected
    assert torch.equal(split.logits(memory, QUERIES[0]), comp.logits(memory, QUERIES[0]))
