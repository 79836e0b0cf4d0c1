"""A memory file is read whole and checked: independent of the file once loaded, every tensor and
the header under a checksum, the header under a schema, the model identified by all its weights."""
import json
import struct

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import emloc
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [{"input": f"review {i}: the movie was {'great' if i % 2 else 'terrible'}",
          "output": "positive" if i % 2 else "negative"} for i in range(4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, memory, path of its file, the file's bytes) for a 2-chunk memory of a tiny Llama."""
    model = tiny_model("llama", n_layers=2, std=0.2, seed=3)
    memory = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=2, progress=False).compress(DEMOS)
    path = tmp_path_factory.mktemp("memfile") / "task.emloc"
    memory.save(path)
    return model, memory, path, path.read_bytes()


def snapshot(memory):
    return [(l.keys.clone(), l.values.clone()) for l in memory.layers]


def same(memory, snap) -> bool:
    return all(torch.equal(l.keys, k) and torch.equal(l.values, v) for l, (k, v) in zip(memory.layers, snap))


def parts(data: bytes):
    """(safetensors JSON dict, {name: tensor}) of a file's bytes, read without emloc."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), safetensors_load(data)


def rebuilt(data: bytes, edit, reseal: bool) -> bytes:
    """The file with edit(header dict) applied to its emloc header; reseal=True recomputes the
    header checksum (as a forger or a buggy writer would), else the old checksum stays."""
    import hashlib

    outer, tensors = parts(data)
    metadata = dict(outer["__metadata__"])
    header = json.loads(metadata["header"])
    edit(header)
    metadata["header"] = json.dumps(header)
    if reseal:
        metadata["header_sha256"] = hashlib.sha256(metadata["header"].encode()).hexdigest()
    return safetensors_save(tensors, metadata=metadata)


# -- independence from the file ---------------------------------------------------------------
def test_loaded_memory_does_not_change_when_the_file_is_rewritten(saved, tmp_path):
    model, memory, path, data = saved
    copy = tmp_path / "task.emloc"
    copy.write_bytes(data)
    loaded = emloc.TaskMemory.load(copy, model)
    snap = snapshot(loaded)
    with open(copy, "r+b") as f:  # same size, other bytes: an mmap would show them
        f.write(bytes(len(data)))
    assert same(loaded, snap)
    copy.write_bytes(b"")  # truncated: an mmap would raise SIGBUS on the next read
    assert same(loaded, snap) and sum(float(l.keys.sum()) for l in loaded.layers) == \
        sum(float(k.sum()) for k, _ in snap)
    copy.unlink()
    assert same(loaded, snap) and same(memory, snap)


# -- integrity ------------------------------------------------------------------------------------
def test_file_is_standard_safetensors_with_a_checksum_per_tensor(saved):
    _, memory, _, data = saved
    outer, tensors = parts(data)
    header = json.loads(outer["__metadata__"]["header"])
    assert outer["__metadata__"]["version"] == "3"
    assert sorted(header["tensors"]) == sorted(tensors) and len(tensors) == 3 * len(memory.layers)
    import hashlib
    for name, tensor in tensors.items():
        assert header["tensors"][name]["sha256"] == hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    for i, layer in enumerate(memory.layers):
        assert torch.equal(tensors[f"layers.{i}.keys"], layer.keys)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_bit_in_the_tensor_data_is_refused(saved, tmp_path, where):
    model, _, _, data = saved
    (n,) = struct.unpack("<Q", data[:8])
    position = {"first": 8 + n, "middle": (8 + n + len(data)) // 2, "last": len(data) - 1}[where]
    damaged = bytearray(data)
    damaged[position] ^= 0x04
    path = tmp_path / "flipped.emloc"
    path.write_bytes(damaged)
    with pytest.raises(emloc.EMLoCError, match="does not match its checksum"):
        emloc.TaskMemory.load(path, model)
    with pytest.raises(emloc.EMLoCError, match="does not match its checksum"):
        emloc.io.memory.read_header(path)  # what `emloc inspect` reads


def set_offset(value):
    def edit(header):
        header["offset"] = value
    return edit


def set_chunk(key, value, chunk=0):
    def edit(header):
        header["stats"][chunk][key] = value
    return edit


def set_kept(delta):
    def edit(header):
        header["stats"][0]["layers"][1]["kept"] += delta
    return edit


def set_fingerprint(key, value):
    def edit(header):
        header["fingerprint"][key] = value
    return edit


def drop(key):
    def edit(header):
        del header[key]
    return edit


def set_shape(dim, delta):
    def edit(header):
        header["tensors"]["layers.0.keys"]["shape"][dim] += delta
    return edit


HEADER_EDITS = [  # each makes the header wrong in a way the schema must see
    (set_offset(-1), "offset"), (set_offset("278"), "offset"), (set_offset(None), "offset"),
    (lambda h: h.update(offset=h["offset"] - 100), "offset"),
    (lambda h: h.update(context_length=h["context_length"] + 1), "context_length"),
    (set_chunk("tokens", "12"), "tokens"), (set_chunk("tokens", -3), "tokens"),
    (set_chunk("tokens", 1.5), "tokens"), (set_chunk("positions", True), "positions"),
    (set_chunk("demos", 0), "demos"), (set_chunk("seconds", "fast"), "seconds"),
    (set_chunk("layers", []), "layers"), (set_kept(1), "say"), (set_kept(-10**6), "kept"),
    (set_fingerprint("n_layers", 3), "layers"), (set_fingerprint("n_kv_heads", "2"), "n_kv_heads"),
    (set_fingerprint("head_dim", 0), "head_dim"), (set_fingerprint("dtype", "int8"), "dtype"),
    (set_fingerprint("dtype", "float16"), "say"), (set_shape(0, 1), "say"), (set_shape(2, -1), "say"),
    (drop("stats"), "exactly"), (drop("tensors"), "exactly"), (lambda h: h.update(extra=1), "exactly"),
    (lambda h: h["tensors"].pop("layers.1.values"), "keys and values"),
]


@pytest.mark.parametrize("edit,message", HEADER_EDITS)
def test_an_edited_header_is_refused(saved, tmp_path, edit, message):
    """Without its checksum updated any edit is refused by the checksum; with it updated (a
    forged or badly written file) by the schema, before any raw TypeError can happen."""
    model, _, _, data = saved
    path = tmp_path / "edited.emloc"
    path.write_bytes(rebuilt(data, edit, reseal=False))
    with pytest.raises(emloc.EMLoCError, match="header does not match its checksum"):
        emloc.TaskMemory.load(path, model)
    path.write_bytes(rebuilt(data, edit, reseal=True))
    with pytest.raises(emloc.EMLoCError, match=message):
        emloc.TaskMemory.load(path, model)


def test_a_version_1_file_is_refused_with_compress_again(saved, tmp_path):
    """A file in the previous format (a bare safetensors with the header, no checksums)."""
    model, _, _, data = saved
    outer, tensors = parts(data)
    header = json.loads(outer["__metadata__"]["header"])
    del header["tensors"]
    old = tmp_path / "old.emloc"
    old.write_bytes(safetensors_save(tensors, metadata={"format": "emloc-task-memory", "version": "1",
                                                         "header": json.dumps(header)}))
    with pytest.raises(emloc.EMLoCError, match="version '1'.*Compress the task again"):
        emloc.TaskMemory.load(old, model)


# -- the model fingerprint --------------------------------------------------------------------------
def test_any_retrained_weight_is_refused(saved):
    """A low-rank update (a merged LoRA, a fine-tune) of any attention or MLP weight, or any norm,
    leaves the embeddings alone and must still be refused."""
    model, _, path, _ = saved
    g = torch.Generator().manual_seed(0)
    names = [name for name, _ in model.named_parameters() if name.startswith("model.layers.")]
    assert len(names) == 2 * 9  # q, k, v, o, gate, up, down, two norms per layer
    for name in names:
        weight = dict(model.named_parameters())[name]
        saved_weight = weight.detach().clone()
        with torch.no_grad():
            if weight.dim() == 2:
                u, v = torch.randn(weight.shape[0], 1, generator=g), torch.randn(1, weight.shape[1], generator=g)
                weight += 1e-4 * u @ v
            else:
                weight *= 1.001
        try:
            with pytest.raises(emloc.EMLoCError, match="another model.*weights_sha256"):
                emloc.TaskMemory.load(path, model)
        finally:
            with torch.no_grad():
                weight.copy_(saved_weight)
    emloc.TaskMemory.load(path, model)  # restored: accepted again


def test_fingerprint_ignores_placement_but_not_dtype(saved):
    model, memory, _, _ = saved
    import copy

    from emloc.models.adapter import DecoderAdapter
    again = DecoderAdapter(copy.deepcopy(model)).fingerprint()
    assert again == DecoderAdapter(model).fingerprint()
    assert DecoderAdapter(copy.deepcopy(model).half()).fingerprint()["weights_sha256"] != again["weights_sha256"]
