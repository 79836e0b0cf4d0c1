"""The task memory: per-layer kept keys/values, the position offset, and how they were made."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from emloc_kernels import gather_append

from .errors import EMLoCError

FORMAT_NAME = "emloc-task-memory"
FORMAT_VERSION = 1


class LayerMemory:
    """One layer's kept tokens: keys/values in a growable buffer [Hkv, capacity, D].

    Rows [0, length) are in use; appends write only the new rows (the buffer grows
    geometrically, so existing rows are copied O(log n) times in total).
    """

    def __init__(self, n_kv_heads, head_dim, dtype, device):
        self._k = torch.empty(n_kv_heads, 0, head_dim, dtype=dtype, device=device)
        self._v = torch.empty_like(self._k)
        self.length = 0

    @property
    def keys(self) -> torch.Tensor:
        return self._k[:, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._v[:, :self.length]

    def _reserve(self, rows: int) -> None:
        if rows <= self._k.shape[1]:
            return
        capacity = max(rows, 2 * self._k.shape[1])
        new_k = self._k.new_empty(self._k.shape[0], capacity, self._k.shape[2])
        new_v = torch.empty_like(new_k)
        new_k[:, :self.length] = self.keys
        new_v[:, :self.length] = self.values
        self._k, self._v = new_k, new_v

    def append(self, src_k, src_v, index, backend="auto") -> None:
        """Append src rows [Hkv, Lc, D] chosen per head by index [Hkv, k] (position order)."""
        self._reserve(self.length + index.shape[1])
        self.length = gather_append(self._k, self._v, self.length, src_k, src_v, index, backend=backend)

    def set(self, keys, values) -> None:
        """Replace the content with keys/values [Hkv, M, D] (used when loading)."""
        self._k, self._v, self.length = keys.contiguous(), values.contiguous(), keys.shape[1]


class TaskMemory:
    """Per-layer KV memory compressed from demonstrations; never changed by answering.

    layers          list[LayerMemory], one per decoder layer (lengths differ between layers)
    offset          position at which queries start (tokens of the uncompressed context)
    context_length  tokens of the uncompressed demonstration context
    fingerprint     identifies the model (see DecoderAdapter.fingerprint)
    settings        the compression settings used (dict)
    stats           per chunk: tokens, demos, seconds, and per layer kept / ratio / JS
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

    def kv(self) -> list:
        """Per layer (keys, values) views [Hkv, M_l, D]."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def __repr__(self):
        lengths = self.layer_lengths
        return (f"TaskMemory(layers={len(lengths)}, context={self.context_length}, "
                f"kept min/mean/max={min(lengths)}/{sum(lengths) / len(lengths):.1f}/{max(lengths)}, "
                f"ratio={self.compression_ratio:.2f}x)")

    # -- file ------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write a safetensors file atomically (a crash never leaves a partial file at `path`)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = layer.keys.detach().cpu().contiguous()
            tensors[f"layers.{i}.values"] = layer.values.detach().cpu().contiguous()
        header = {"offset": self.offset, "context_length": self.context_length,
                  "fingerprint": self.fingerprint, "settings": self.settings, "stats": self.stats}
        metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "header": json.dumps(header)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, model) -> "TaskMemory":
        """Read a memory saved by `save` for `model`; raises EMLoCError if it does not fit."""
        from safetensors import SafetensorError, safe_open

        from .model_adapter import DecoderAdapter

        adapter = DecoderAdapter(model)
        path = Path(path)
        if not path.is_file():
            raise EMLoCError(f"no memory file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != FORMAT_NAME:
                    raise EMLoCError(f"{path} is not an emloc task memory")
                if metadata.get("version") != str(FORMAT_VERSION):
                    raise EMLoCError(f"{path} has format version {metadata.get('version')!r}; this "
                                     f"emloc reads version {FORMAT_VERSION}. Compress the task again")
                header = json.loads(metadata["header"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            if isinstance(exc, EMLoCError):
                raise
            raise EMLoCError(f"{path} is damaged or truncated ({exc})") from None
        expected = adapter.fingerprint()
        if header.get("fingerprint") != expected:
            diff = {k: (header.get("fingerprint", {}).get(k), v) for k, v in expected.items()
                    if header.get("fingerprint", {}).get(k) != v}
            raise EMLoCError(f"{path} was made with another model (file vs this model: {diff})")
        layers = []
        for i in range(adapter.n_layers):
            try:
                k, v = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
            except KeyError:
                raise EMLoCError(f"{path} is damaged: layer {i} is missing") from None
            shape_ok = (k.shape == v.shape and k.dim() == 3 and k.shape[0] == adapter.n_kv_heads
                        and k.shape[2] == adapter.head_dim)
            if not shape_ok or k.dtype != adapter.dtype:
                raise EMLoCError(f"{path} is damaged: layer {i} has shape {tuple(k.shape)} {k.dtype}")
            layer = LayerMemory(adapter.n_kv_heads, adapter.head_dim, adapter.dtype, adapter.device)
            layer.set(k.to(adapter.device), v.to(adapter.device))
            layers.append(layer)
        return cls(layers, header["offset"], header["context_length"], header["fingerprint"],
                   header["settings"], header["stats"])
