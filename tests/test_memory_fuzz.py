"""Fuzz: random mutations of a real memory file are refused with EMLoCError, or load bit-identical.

Byte flips (weighted towards the header), random bytes written, truncations, insertions, deletions,
and edits of the emloc header with and without its checksum updated. A load that succeeds must
give exactly the original memory (tensors, offset, context, fingerprint, settings, stats).
"""
import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import emloc
from tiny_models import chat_tokenizer, tiny_model

MUTATIONS_PER_KIND = 150  # 7 kinds: 1,050 mutated files
DEMOS = [{"input": f"review {i}: {'great' if i % 2 else 'terrible'}",
          "output": "positive" if i % 2 else "negative"} for i in range(4)]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    model = tiny_model("llama", n_layers=2, hidden=32, head_dim=8, n_heads=4, n_kv_heads=2, std=0.2, seed=4)
    memory = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=2, progress=False).compress(DEMOS)
    path = tmp_path_factory.mktemp("fuzz") / "task.emloc"
    memory.save(path)
    return model, memory, path.read_bytes()


def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def flip(rng, data):
    out = bytearray(data)
    i = rng.randrange(header_length(data)) if rng.random() < 0.7 else rng.randrange(len(data))
    out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def overwrite(rng, data):
    out = bytearray(data)
    i = rng.randrange(header_length(data)) if rng.random() < 0.7 else rng.randrange(len(data))
    out[i] = rng.randrange(256)
    return bytes(out)


def truncate(rng, data):
    return data[:rng.randrange(len(data))]


def insert(rng, data):
    i = rng.randrange(len(data) + 1)
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9))) + data[i:]


def delete(rng, data):
    i = rng.randrange(len(data))
    return data[:i] + data[i + rng.randint(1, 9):]


def _leaves(node, path=()):
    """Paths of every scalar in a JSON tree (and of every dict entry, for removals)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield path + (k,)
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))


def _edited(rng, data, reseal: bool):
    (n,) = struct.unpack("<Q", data[:8])
    metadata = dict(json.loads(data[8:8 + n])["__metadata__"])
    header = json.loads(metadata["header"])
    target = rng.choice(list(_leaves(header)))
    parent = header
    for key in target[:-1]:
        parent = parent[key]
    old = parent[target[-1]]
    choices = ["drop", "string", "null", "list", "bool"]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
        choices += ["plus", "minus", "negative"]
    change = rng.choice(choices)
    if change == "drop" and isinstance(parent, dict):
        del parent[target[-1]]
    else:
        parent[target[-1]] = {"drop": lambda: "x", "string": lambda: str(old), "null": lambda: None,
                              "list": lambda: [old], "bool": lambda: True,
                              "plus": lambda: old + rng.randint(1, 300), "minus": lambda: old - rng.randint(1, 300),
                              "negative": lambda: -1 - rng.randint(0, 9)}[change]()
    metadata["header"] = json.dumps(header)
    if reseal:
        metadata["header_sha256"] = hashlib.sha256(metadata["header"].encode()).hexdigest()
    return safetensors_save(safetensors_load(data), metadata=metadata), (target, change)


def header_edit(rng, data):
    return _edited(rng, data, reseal=False)[0]


# what a resealed edit may target: the fields the schema or the fingerprint comparison constrain
# (any change to them makes the file wrong). Other fields are free records (timings, settings,
# search records a later emloc may add): an edit there with the checksum updated is a valid file.
MODEL_KEYS = {"architecture", "model_type", "n_layers", "n_heads", "n_kv_heads", "head_dim",
              "hidden_size", "vocab_size", "dtype", "weights_sha256"}


def covered(target) -> bool:
    top, rest = target[0], target[1:]
    if not rest:
        return True
    if top == "fingerprint":
        return len(rest) == 1 and rest[0] in MODEL_KEYS
    if top == "stats":
        return len(rest) == 1 or rest[1] in ("tokens", "positions") or (
            rest[1] == "layers" and (len(rest) <= 3 or rest[3] == "kept"))
    return top == "tensors"


def resealed_header_edit(rng, data):
    while True:
        out, (target, _) = _edited(rng, data, reseal=True)
        if covered(target):
            return out


KINDS = [flip, overwrite, truncate, insert, delete, header_edit, resealed_header_edit]


def identical(loaded, memory) -> bool:
    return (loaded.offset == memory.offset and loaded.context_length == memory.context_length
            and loaded.fingerprint == memory.fingerprint and loaded.settings == memory.settings
            and loaded.stats == memory.stats
            and all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                    and a.keys.dtype == b.keys.dtype for a, b in zip(loaded.layers, memory.layers)))


def test_every_mutation_is_refused_or_loads_identical(original, tmp_path):
    model, memory, data = original
    rng = random.Random(14)
    path = tmp_path / "mutated.emloc"
    tried, refused, no_ops, accepted_changed = 0, 0, 0, []
    for kind in KINDS:
        for _ in range(MUTATIONS_PER_KIND):
            mutated = kind(rng, data)
            path.write_bytes(mutated)
            tried += 1
            try:
                loaded = emloc.TaskMemory.load(path, model)
            except emloc.EMLoCError:
                refused += 1
                continue
            if identical(loaded, memory):
                no_ops += 1
            else:
                accepted_changed.append((kind.__name__, mutated))
    print(f"\nfuzz: {tried} mutations, {refused} refused, {no_ops} loaded identical (no-ops)")
    assert tried >= 1000 and not accepted_changed, [k for k, _ in accepted_changed]
    assert refused >= 0.95 * tried
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"{tried:,} random mutations" in " ".join(readme.split())  # the count the README quotes
