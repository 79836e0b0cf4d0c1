"""A memory is never changed by answering, compression is deterministic, files round-trip."""
import pytest
import torch

import emloc
from tiny_models import chat_tokenizer, tiny_compressed, tiny_model

DEMOS = [{"input": f"review {i}: the movie was {'great' if i % 2 else 'terrible'}",
          "output": "positive" if i % 2 else "negative"} for i in range(6)]
QUERIES = ["the plot was boring", "wonderful actors", "what is the capital of france", "2 plus 3"]


@pytest.fixture(scope="module")
def compressed():
    return tiny_compressed(DEMOS)


def snapshot(memory):
    return [(l.keys.clone(), l.values.clone()) for l in memory.layers], memory.offset, memory.layer_lengths


def assert_same(memory, snap):
    kv, offset, lengths = snap
    assert memory.offset == offset and memory.layer_lengths == lengths
    for layer, (k, v) in zip(memory.layers, kv):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_memory_bit_identical_after_answering(compressed):
    comp, memory = compressed
    assert memory.compression_ratio > 1.0
    snap = snapshot(memory)
    for q in QUERIES:
        comp.generate(memory, q, max_new_tokens=4)
        comp.logits(memory, q, continuation="positive")
    comp.generate(memory, QUERIES, max_new_tokens=4)
    comp.generate(memory, QUERIES[0], max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    assert_same(memory, snap)


def test_compressing_twice_gives_identical_memories(compressed):
    comp, memory = compressed
    again = comp.compress(DEMOS, system="Classify.")
    assert_same(again, snapshot(memory))
    assert [c["layers"] for c in again.stats] == [c["layers"] for c in memory.stats]


def test_batch_equals_one_by_one(compressed):
    comp, memory = compressed
    batch = comp.generate(memory, QUERIES, max_new_tokens=6)
    single = [comp.generate(memory, q, max_new_tokens=6) for q in QUERIES]
    assert batch == single


def test_generate_first_token_is_argmax_of_logits(compressed):
    comp, memory = compressed
    tok = chat_tokenizer()
    for q in QUERIES:
        first = int(comp.logits(memory, q)[0].argmax())
        if first == tok.convert_tokens_to_ids("<|im_end|>"):
            assert comp.generate(memory, q, max_new_tokens=1) == ""
        else:
            answer = comp.generate(memory, q, max_new_tokens=1)
            assert answer == tok.decode([first], skip_special_tokens=True).strip()


def test_save_load_round_trip_is_bit_exact(compressed, tmp_path):
    comp, memory = compressed
    path = tmp_path / "task.emloc"
    memory.save(path)
    loaded = emloc.TaskMemory.load(path, comp.model)
    assert_same(loaded, snapshot(memory))
    assert loaded.stats == memory.stats and loaded.settings == memory.settings
    assert loaded.context_length == memory.context_length
    for q in QUERIES[:2]:
        assert torch.equal(comp.logits(loaded, q), comp.logits(memory, q))
    assert not list(tmp_path.glob(".*.tmp"))


def test_load_rejects_other_model_and_damaged_files(compressed, tmp_path):
    comp, memory = compressed
    path = tmp_path / "task.emloc"
    memory.save(path)
    other = tiny_model("llama", n_layers=3, std=0.2, seed=8)
    with pytest.raises(emloc.EMLoCError, match="another model"):
        emloc.TaskMemory.load(path, other)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.emloc"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(emloc.EMLoCError, match="damaged or truncated"):
        emloc.TaskMemory.load(truncated, comp.model)
    garbage = tmp_path / "garbage.emloc"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(emloc.EMLoCError):
        emloc.TaskMemory.load(garbage, comp.model)
    with pytest.raises(emloc.EMLoCError, match="no memory file"):
        emloc.TaskMemory.load(tmp_path / "missing.emloc", comp.model)
    newer = tmp_path / "newer.emloc"
    for version in (b"9", b"2"):  # a newer one, and version 2 (no positions): compress again
        newer.write_bytes(data.replace(b'"version":"3"', b'"version":"' + version + b'"'))
        with pytest.raises(emloc.EMLoCError, match="format version.*Compress the task again"):
            emloc.TaskMemory.load(newer, comp.model)


def test_memory_from_another_model_is_refused_when_answering(compressed):
    comp, memory = compressed
    other = emloc.EMLoC(tiny_model("llama", n_layers=3, std=0.2, seed=9), chat_tokenizer(), progress=False)
    with pytest.raises(emloc.EMLoCError, match="another model"):
        other.generate(memory, "q")


def test_layer_buffer_appends_grow_and_trim():
    """Appends of chunks land in order (per head its chosen rows), the buffer keeps at most
    GROWTH x the rows in use, and trim leaves exactly the rows in use."""
    from emloc.io.memory import LayerMemory

    g = torch.Generator().manual_seed(0)
    layer, expected_k, expected_v, expected_p = LayerMemory(2, 8, torch.float32, torch.device("cpu")), [], [], []
    for chunk in range(12):
        length = 5 + chunk % 4
        k, v = torch.randn(2, length, 8, generator=g), torch.randn(2, length, 8, generator=g)
        index = torch.stack([torch.randperm(length, generator=g)[:3].sort().values for _ in range(2)])
        layer.append(k, v, index, 100 * chunk, backend="torch")
        expected_p.append(100 * chunk + index)
        expected_k.append(torch.stack([k[h, index[h]] for h in range(2)]))
        expected_v.append(torch.stack([v[h, index[h]] for h in range(2)]))
        assert layer._k.shape[1] <= max(3 * (chunk + 1), int(LayerMemory.GROWTH * 3 * chunk) + 3)
    assert torch.equal(layer.keys, torch.cat(expected_k, dim=1))
    assert torch.equal(layer.values, torch.cat(expected_v, dim=1))
    assert torch.equal(layer.positions, torch.cat(expected_p, dim=1))
    layer.trim()
    assert layer._k.shape[1] == layer._v.shape[1] == layer._p.shape[1] == layer.length == 36
    assert torch.equal(layer.keys, torch.cat(expected_k, dim=1))
    assert torch.equal(layer.positions, torch.cat(expected_p, dim=1))


def test_compressed_memory_holds_no_unused_rows(compressed):
    _, memory = compressed
    for layer in memory.layers:
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()
