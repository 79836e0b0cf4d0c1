"""What the integrity checks cost when a memory file is loaded (bundled SmolLM2-135M, CPU).

For a memory the size 128 capitals demos compress to (2,881 context tokens, 1.99x: 1,448 kept
tokens per layer, 32 chunks; bench/QUERY_RESULTS.md) and for the uncompressed context (method
"full", 2,881 per layer), prints medians of --repeats runs of:
  read        the file's bytes into memory (what any load must do)
  checks      header schema + SHA-256 of every tensor (memory_file.decode)
  fingerprint the model fingerprint (a strided sample of every weight, hashed)
  load        the whole TaskMemory.load (read + checks + fingerprint + placing the layers)
  v1 mmap     the previous loader for comparison: safetensors safe_open, memory-mapped, no checks
              (and "+ touched": every byte read once, as the first answer then does)
  read_file   read + checks, what `emloc inspect` and `emloc answer` do before loading the model
The memory is synthetic (random keys/values of the real shapes and a consistent header): the
cost depends only on sizes. Rows go to bench/results.csv.

    python bench/memory_load.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, time_ms  # noqa: E402

from emloc.io.fingerprints import tokenizer_fingerprint
from emloc.io.memory import LayerMemory, TaskMemory, read_file  # noqa: E402
from emloc.io.memory_file import decode  # noqa: E402
from emloc.models import load_model  # noqa: E402
from emloc.models.vision_language import adapter_for  # noqa: E402

CONTEXT, CHUNKS = 2881, 32


def synthetic_memory(adapter, tokenizer, kept_per_layer: int) -> TaskMemory:
    """A memory of CHUNKS chunks, CONTEXT tokens, kept_per_layer kept tokens in every layer."""
    g = torch.Generator().manual_seed(0)
    tokens = [CONTEXT // CHUNKS + (c < CONTEXT % CHUNKS) for c in range(CHUNKS)]
    kept = [kept_per_layer // CHUNKS + (c < kept_per_layer % CHUNKS) for c in range(CHUNKS)]
    layers = []
    for _ in range(adapter.n_layers):
        layer = LayerMemory(adapter.n_kv_heads, adapter.head_dim, adapter.dtype, torch.device("cpu"))
        shape = (adapter.n_kv_heads, kept_per_layer, adapter.head_dim)
        layer.set(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
        layers.append(layer)
    stats = [{"chunk": c, "tokens": tokens[c], "positions": tokens[c], "demos": 4, "seconds": 1.0,
              "layers": [{"layer": l, "kept": kept[c], "ratio": kept[c] / tokens[c], "js": 0.001, "tests": 2}
                         for l in range(adapter.n_layers)]} for c in range(CHUNKS)]
    fingerprint = {**adapter.fingerprint(), "tokenizer": tokenizer_fingerprint(tokenizer)}
    return TaskMemory(layers, CONTEXT, CONTEXT, fingerprint, {"method": "synthetic"}, stats)


def v1_mmap_load(path, touch: bool) -> None:
    """The previous loader: memory-mapped tensors, no checks; touch=True reads every byte once
    (what the first answer then pays in page faults)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        f.metadata()
        tensors = [f.get_tensor(name) for name in f.keys()]
    if touch:
        sum(float(t.sum()) for t in tensors)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    model, tokenizer = load_model()
    adapter = adapter_for(model)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case, kept in (("128 demos, emloc 1.99x", round(CONTEXT / 1.99)), ("128 demos, full", CONTEXT)):
            path = Path(folder) / "task.emloc"
            synthetic_memory(adapter, tokenizer, kept).save(path)
            size_mb = path.stat().st_size / 2**20

            def read():
                with open(path, "rb") as f:
                    return bytearray(f.read())

            data = read()
            timings = {"read": read, "checks": lambda: decode(data, str(path)),
                       "fingerprint": adapter.fingerprint, "load": lambda: TaskMemory.load(path, model),
                       "v1 mmap": lambda: v1_mmap_load(path, False),
                       "v1 mmap + touched": lambda: v1_mmap_load(path, True), "read_file": lambda: read_file(path)}
            for impl, fn in timings.items():
                median, spread = time_ms(fn, "cpu", args.repeats)
                rows.append({"bench": "memory_load", "case": case, "impl": impl, "median_ms": round(median, 3),
                             "spread_ms": round(spread, 3), "metric": "file_MB", "value": round(size_mb, 2),
                             "note": "SmolLM2-135M"})
    append_rows(rows, "cpu")


if __name__ == "__main__":
    main()
