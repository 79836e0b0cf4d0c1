"""The task memory: per-layer kept keys/values, the position offset, and how they were made."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from emloc_kernels import gather_append

from emloc.errors import EMLoCError
from emloc.io.fingerprints import fingerprint_diff, model_part
from emloc.io.memory_file import decode, encode
from emloc.io.output_files import atomic_write, output_path

def read_file(path):
    """(header, {name: CPU tensor}) of a memory file, checked as memory_file.decode describes.

    The file is read whole into memory the process owns (no memory map): after this returns,
    nothing done to the file (rewritten, truncated, deleted) affects the tensors.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise EMLoCError(f"a memory path must be a string or a path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise EMLoCError(f"no memory file at {path}")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = bytearray(size)
            got = f.readinto(data)
            more = f.read(1)
    except OSError as exc:
        raise EMLoCError(f"could not read {path}: {exc.strerror or exc}") from None
    if got != size or more:
        raise EMLoCError(f"{path} changed while it was being read; try again")
    return decode(data, str(path))


def read_header(path) -> dict:
    """The header of a memory file (offset, context_length, fingerprint, settings, stats,
    tensors), after every check of read_file (tensor checksums included); raises EMLoCError for
    a missing, damaged or foreign file or another version."""
    return read_file(path)[0]


class LayerMemory:
    """One layer's kept tokens: keys/values in a growable buffer [Hkv, capacity, D], and the
    context index of each kept row, positions [Hkv, capacity] int64 (increasing along each head).

    Rows [0, length) are in use; appends write only the new rows. The buffer grows by
    GROWTH (amortised O(1) copies per row, at most 25% unused rows); `trim` drops the unused
    rows when compression ends. Tensors are plain (never inference tensors, no autograd).
    """

    GROWTH = 1.25

    def __init__(self, n_kv_heads, head_dim, dtype, device):
        """An empty layer memory on `device` (the device of the decoder layer it serves)."""
        with torch.inference_mode(False):
            self._k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
            self._v = torch.empty_like(self._k)
            self._p = torch.empty(n_kv_heads, 0, dtype=torch.long, device=device)
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :self.length]

    @property
    def positions(self) -> torch.Tensor:
        """[Hkv, M] int64: the index in the uncompressed context of each kept row."""
        return self._p[:, :self.length]

    def _reserve(self, rows: int) -> None:
        if rows <= self._k.shape[1]:
            return
        capacity = max(rows, int(self.GROWTH * self._k.shape[1]))
        with torch.inference_mode(False):
            new_k = self._k.new_empty(self._k.shape[0], capacity, self._k.shape[2])
            new_v = torch.empty_like(new_k)
            new_p = self._p.new_empty(self._p.shape[0], capacity)
        new_k[:, :self.length] = self.keys
        new_v[:, :self.length] = self.values
        new_p[:, :self.length] = self.positions
        self._k, self._v, self._p = new_k, new_v, new_p

    def append(self, src_k, src_v, index, start: int, backend="auto") -> None:
        """Append src rows [Hkv, Lc, D] chosen per head by index [Hkv, k] (position order) of a
        chunk whose first token is context token `start`."""
        old = self.length
        self._reserve(old + index.shape[1])
        self.length = gather_append(self._k, self._v, old, src_k, src_v, index, backend=backend)
        self._p[:, old:self.length] = start + index.to(self._p.device)

    def select(self, src_k, src_v, index, start: int, backend="auto") -> None:
        """Replace the content by the rows index [Hkv, k] (increasing) of this memory ⊕ src rows
        [Hkv, Lc, D] of a chunk whose first token is context token `start` (row M + i of the
        concatenation is src row i)."""
        index = index.to(self._k.device)
        with torch.inference_mode(False):
            new = LayerMemory(self._k.shape[0], self._k.shape[2], self._k.dtype, self._k.device)
        new._reserve(index.shape[1])
        pool_k = torch.cat([self.keys, src_k], dim=1)
        pool_v = torch.cat([self.values, src_v], dim=1)
        new.length = gather_append(new._k, new._v, 0, pool_k, pool_v, index, backend=backend)
        chunk_positions = start + torch.arange(src_k.shape[1], device=self._p.device)
        pool_p = torch.cat([self.positions, chunk_positions[None].expand(self._p.shape[0], -1)], dim=1)
        new._p[:, :new.length] = torch.gather(pool_p, 1, index)
        self._k, self._v, self._p, self.length = new._k, new._v, new._p, new.length

    def trim(self) -> None:
        """Release the unused rows of the buffer (one copy of the used rows if there are any)."""
        if self._k.shape[1] > self.length:
            with torch.inference_mode(False):
                self._k, self._v, self._p = self.keys.clone(), self.values.clone(), self.positions.clone()

    def set(self, keys, values, positions) -> None:
        """Replace the content with keys/values [Hkv, M, D] and positions [Hkv, M] (loading)."""
        self._k, self._v, self._p = keys.contiguous(), values.contiguous(), positions.contiguous()
        self.length = keys.shape[1]


def empty_layers(adapter) -> list:
    """One empty LayerMemory per decoder layer, each on the device its layer runs on."""
    return [LayerMemory(adapter.n_kv_heads, adapter.head_dim, adapter.dtype, device)
            for device in adapter.layer_devices]


class TaskMemory:
    """Per-layer KV memory compressed from demonstrations; never changed by answering.

    layers          list[LayerMemory], one per decoder layer (lengths differ between layers)
    offset          position at which queries start: the positions the uncompressed context
                    takes (its token count for plain RoPE; fewer with M-RoPE images)
    context_length  tokens of the uncompressed demonstration context
    fingerprint     identifies the model (DecoderAdapter.fingerprint) and, under "tokenizer",
                    the tokenizer (tokenizer_fingerprint); load checks the model part, EMLoC both
    settings        the compression settings used (dict)
    stats           per chunk: tokens, demos, seconds, and per layer kept (the chunk's tokens in the
                    memory, per KV head) / ratio / JS (see count_kept)
    """

    def __init__(self, layers, offset, context_length, fingerprint, settings, stats):
        self.layers, self.offset, self.context_length = layers, offset, context_length
        self.fingerprint, self.settings, self.stats = fingerprint, settings, stats

    @property
    def layer_lengths(self) -> list:
        return [layer.length for layer in self.layers]

    @property
    def compression_ratio(self) -> float:
        mean = sum(self.layer_lengths) / max(1, len(self.layers))
        return self.context_length / mean if mean else float("inf")

    @property
    def nbytes(self) -> int:
        """Bytes of the kept keys and values."""
        return sum(2 * l.keys.numel() * l.keys.element_size() for l in self.layers)

    def first_chunks(self, n: int) -> "TaskMemory":
        """A new memory of the first n chunks only (copied; this one is unchanged).

        For the methods that append chunk by chunk (a chunk never changes what earlier chunks
        kept) this equals compressing only those chunks' demos with the same settings: a memory
        of fewer demos without compressing again. Refused (EMLoCError) where it would not: a
        shared-budget method (method="budget", "tova-stream") or recent_tokens (whose whole
        chunks are the last ones of the context).
        """
        from emloc.compression.methods import REGISTRY

        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self.stats):
            raise EMLoCError(f"n must be an integer in [1, {len(self.stats)}] (the chunks of this "
                             f"memory), got {n!r}")
        method = REGISTRY.get(self.settings.get("method"))
        if method is not None and not method.sequential:
            raise EMLoCError(f"this memory was made with method={method.name!r}, which shares one budget "
                             "over all chunks: its first chunks are not what compressing their demos "
                             "alone keeps; compress those demos again")
        if self.settings.get("recent_tokens") and n < len(self.stats):
            raise EMLoCError("this memory keeps its last demos whole (recent_tokens); the first chunks "
                             "of it are not what compressing those demos alone keeps; compress them again")
        chunks = copy.deepcopy(self.stats[:n])
        tokens = sum(chunk["tokens"] for chunk in chunks)
        layers = []
        for layer in self.layers:
            kept = int((layer.positions[0] < tokens).sum())  # the same count in every head
            part = LayerMemory(layer.keys.shape[0], layer.keys.shape[2], layer.keys.dtype, layer.keys.device)
            part.set(layer.keys[:, :kept].clone(), layer.values[:, :kept].clone(), layer.positions[:, :kept].clone())
            layers.append(part)
        offset = sum(chunk.get("positions", chunk["tokens"]) for chunk in chunks)
        return TaskMemory(layers, offset, tokens, copy.deepcopy(self.fingerprint), dict(self.settings), chunks)

    def count_kept(self, token_types=None) -> None:
        """Write into stats, per chunk and layer, how many of the chunk's tokens the memory keeps:
        kept (rows per KV head, averaged over the heads), kept_fraction, and with token_types (per
        chunk [Lc] types of vision_language.TOKEN_TYPES, or None) the kept image/video tokens."""
        from emloc.models.vision_language import TOKEN_TYPES

        bounds = [0]
        for chunk in self.stats:
            bounds.append(bounds[-1] + chunk["tokens"])
        edges = torch.tensor(bounds[1:-1])
        for l, layer in enumerate(self.layers):
            positions = layer.positions.cpu()
            which = torch.bucketize(positions, edges, right=True)  # [Hkv, M] chunk of each row
            counts = torch.stack([(which == c).sum(dim=1) for c in range(len(self.stats))])  # [C, Hkv]
            for c, chunk in enumerate(self.stats):
                kept = float(counts[c].double().mean())
                entry = chunk["layers"][l]
                entry["kept"] = int(kept) if kept.is_integer() else kept
                entry["kept_fraction"] = kept / chunk["tokens"]
                types = None if token_types is None else token_types[c]
                if types is not None:
                    local = positions[which == c] - bounds[c]
                    kinds = types.cpu()[local]
                    entry.update({f"kept_{kind}": float((kinds == code).sum()) / positions.shape[0]
                                  for kind, code in TOKEN_TYPES.items()})

    def kv(self) -> list:
        """Per layer (keys, values) views [Hkv, M_l, D] of the buffers (no copy), each on its layer's device."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def as_cache(self, model, backend="auto"):
        """A fresh transformers Cache (emloc.cache.MemoryCache) whose layers start with this
        memory, shared read-only (not copied); pass it as past_key_values= to model(...) or
        model.generate(...) of a model routed to emloc's attention (emloc.routed)."""
        from emloc.serving.cache import MemoryCache

        return MemoryCache(self, model, backend=backend)

    def __repr__(self):
        lengths = self.layer_lengths
        return (f"TaskMemory(layers={len(lengths)}, context={self.context_length}, "
                f"kept min/mean/max={min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}, "
                f"ratio={self.compression_ratio:.2f}x)")

    # -- file ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the memory to `path` (format: memory_file.py) atomically: its folder must exist;
        a failure (disk full, interrupted) raises EMLoCError and leaves any old file unchanged."""
        path = output_path(path)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = layer.keys.detach().cpu().contiguous()
            tensors[f"layers.{i}.values"] = layer.values.detach().cpu().contiguous()
            tensors[f"layers.{i}.positions"] = layer.positions.cpu().contiguous()
        header = {"offset": self.offset, "context_length": self.context_length,
                  "fingerprint": self.fingerprint, "settings": self.settings, "stats": self.stats}
        with atomic_write(path, binary=True) as out:
            out.write(encode(header, tensors))

    @classmethod
    def load(cls, path, model) -> "TaskMemory":
        """Read a memory saved by `save` for `model` into memory of its own (see read_file), each
        layer onto the device its decoder layer runs on; raises EMLoCError if the file is
        damaged, of another version, or made with another model."""
        header, tensors = read_file(path)
        return cls.from_file(header, tensors, model, path)

    @classmethod
    def from_file(cls, header: dict, tensors: dict, model, where) -> "TaskMemory":
        """The memory of a file already read by read_file, checked against `model`'s fingerprint."""
        from emloc.models.vision_language import adapter_for

        adapter = adapter_for(model)
        stored = header["fingerprint"]
        diff = fingerprint_diff(model_part(stored), adapter.fingerprint())
        if diff:
            raise EMLoCError(f"{where} was made with another model (file vs this model: {diff}); "
                             "load it with the model it was compressed with, or compress again")
        layers = empty_layers(adapter)
        for i, layer in enumerate(layers):
            device = adapter.layer_devices[i]
            layer.set(tensors[f"layers.{i}.keys"].to(device), tensors[f"layers.{i}.values"].to(device),
                      tensors[f"layers.{i}.positions"].to(device))
        return cls(layers, header["offset"], header["context_length"], stored,
                   header["settings"], header["stats"])
