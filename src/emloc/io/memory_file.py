"""The task-memory file: a safetensors file whose every byte is checked when it is read.

Layout (standard safetensors, readable by any safetensors reader):
  8 bytes     little-endian length N of the JSON that follows
  N bytes     JSON: {"__metadata__": {...}, "<tensor name>": {"dtype", "shape", "data_offsets"}, ...}
  data        the tensors' bytes, back to back
__metadata__ holds exactly: format ("emloc-task-memory"), version ("3"), header (the emloc header
as JSON text) and header_sha256 (SHA-256 of that text). The emloc header holds offset,
context_length, fingerprint, settings, stats, and "tensors": {name: {dtype, shape, sha256 of its
bytes}}. Reading (decode) refuses, with EMLoCError, anything that is not exactly such a file:
wrong lengths, overlapping or gapped data, trailing bytes, duplicate JSON keys, a header whose
checksum or schema fails (types, ranges, token counts that add up to the offset and context
length, per layer one keys/values tensor of [KV heads, kept tokens, head dim] in the
fingerprint's dtype and one int64 positions tensor of [KV heads, kept tokens]: the context index
of each kept row, increasing along each head, whose count per chunk is the chunk's "kept"
statistic), or tensor bytes that do not match their checksum.

Older versions are refused: compress again (version 1 had no checksums and a weaker model
fingerprint; version 2 had no positions, so a memory had to be contiguous runs of its chunks).
"""
from __future__ import annotations

import hashlib
import json
import math
import struct

import torch

from emloc.errors import EMLoCError

FORMAT_NAME = "emloc-task-memory"
FORMAT_VERSION = 3
METADATA_KEYS = {"format", "version", "header", "header_sha256"}
HEADER_KEYS = {"offset", "context_length", "fingerprint", "settings", "stats", "tensors"}
# safetensors dtype codes of the dtypes a model (and so its memory) can have
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
DTYPE_NAMES = {str(dtype).replace("torch.", ""): dtype for dtype in DTYPES.values()}
DTYPES["I64"] = torch.int64  # the positions tensors
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
MODEL_INT_KEYS = ("n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_size", "vocab_size")


def sha256(data) -> str:
    """Hex SHA-256 of bytes-like `data`."""
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (no copy)."""
    flat = tensor.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def layer_names(n_layers: int) -> list:
    return [f"layers.{i}.{part}" for i in range(n_layers) for part in ("keys", "values", "positions")]


# -- writing ---------------------------------------------------------------------------------------
def encode(header: dict, tensors: dict) -> bytes:
    """The file's bytes for `header` (without "tensors": it is added here) and CPU contiguous
    `tensors` {name: tensor}."""
    from safetensors.torch import save

    header = {**header, "tensors": {name: {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                                           "sha256": sha256(tensor_bytes(t))}
                                    for name, t in tensors.items()}}
    validate_header(header, "the memory to save")  # never write a file that reading refuses
    validate_positions(header, tensors, "the memory to save")
    text = json.dumps(header, allow_nan=True)
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "header": text,
                "header_sha256": sha256(text.encode("utf-8"))}
    return save(tensors, metadata=metadata)


# -- reading ---------------------------------------------------------------------------------------
def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key")
    return dict(pairs)


def _json(text, what: str, where: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise EMLoCError(f"{where} is damaged or truncated: its {what} is not valid JSON ({exc})") from None


def decode(data: bytearray, where: str):
    """(header, {name: tensor}) of a memory file's bytes, every check of the module doc passed.

    The tensors are views of `data` (no copy): they own nothing but keep `data` alive.
    """
    damaged = f"{where} is damaged or truncated, or not an emloc memory"
    if len(data) < 8:
        raise EMLoCError(f"{damaged} ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n > len(data) - 8:
        raise EMLoCError(f"{damaged} (its header length {n} runs past the end of the file)")
    try:
        text = bytes(data[8:8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise EMLoCError(f"{damaged} (its header is not UTF-8)") from None
    outer = _json(text, "safetensors header", where)
    if not isinstance(outer, dict) or not isinstance(outer.get("__metadata__"), dict):
        raise EMLoCError(f"{where} is not an emloc task memory (no safetensors metadata)")
    metadata = outer.pop("__metadata__")
    if metadata.get("format") != FORMAT_NAME:
        raise EMLoCError(f"{where} is not an emloc task memory")
    if metadata.get("version") != str(FORMAT_VERSION):
        raise EMLoCError(f"{where} has format version {metadata.get('version')!r}; this emloc reads "
                         f"version {FORMAT_VERSION} only. Compress the task again with this emloc")
    if set(metadata) != METADATA_KEYS or not all(isinstance(v, str) for v in metadata.values()):
        raise EMLoCError(f"{damaged} (its metadata has keys {sorted(metadata)})")
    if sha256(metadata["header"].encode("utf-8", "surrogatepass")) != metadata["header_sha256"]:
        raise EMLoCError(f"{where} is damaged: its header does not match its checksum")
    header = _json(metadata["header"], "emloc header", where)
    validate_header(header, where)
    tensors = _tensors(outer, header["tensors"], data, 8 + n, where)
    validate_positions(header, tensors, where)
    return header, tensors


def _tensors(entries: dict, expected: dict, data: bytearray, start: int, where: str) -> dict:
    """{name: tensor view of data} of the safetensors entries, checked against the header's
    "tensors" (same names, dtypes, shapes), their offsets (tiling the data exactly) and sha256."""
    if set(entries) != set(expected):
        raise EMLoCError(f"{where} is damaged: it holds tensors {sorted(entries)[:4]}..., its header "
                         f"lists {sorted(expected)[:4]}...")
    spans, tensors = [], {}
    for name, entry in entries.items():
        want = expected[name]
        ok = (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
              and entry["dtype"] == want["dtype"] and entry["shape"] == want["shape"]
              and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
              and all(_is_int(o) and o >= 0 for o in entry["data_offsets"]))
        if not ok:
            raise EMLoCError(f"{where} is damaged: the entry of tensor {name} does not match the header")
        a, b = entry["data_offsets"]
        dtype = DTYPES[want["dtype"]]
        count = math.prod(want["shape"])
        if b - a != count * dtype.itemsize:
            raise EMLoCError(f"{where} is damaged: tensor {name} has {b - a} bytes for shape {want['shape']}")
        spans.append((a, b, name, dtype, count))
    spans.sort()
    end = 0
    for a, b, name, _, _ in spans:
        if a != end:
            raise EMLoCError(f"{where} is damaged: the data of tensor {name} does not follow the previous one")
        end = b
    if start + end != len(data):
        raise EMLoCError(f"{where} is damaged or truncated: {len(data) - start} bytes of tensor data, "
                         f"the header describes {end}")
    for a, b, name, dtype, count in spans:
        if sha256(memoryview(data)[start + a:start + b]) != expected[name]["sha256"]:
            raise EMLoCError(f"{where} is damaged: the data of tensor {name} does not match its checksum")
        flat = (torch.frombuffer(data, dtype=dtype, count=count, offset=start + a) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.view(expected[name]["shape"])
    return tensors


# -- the header's schema ---------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _nonneg(value) -> bool:
    """A number >= 0, or NaN (a JS that could not be measured)."""
    return _is_number(value) and (value >= 0 or math.isnan(value))


def validate_header(header, where: str) -> None:
    """Raise EMLoCError unless `header` follows the schema of the module doc."""
    def fail(what):
        raise EMLoCError(f"{where} is damaged: {what}; compress the task again")

    if not isinstance(header, dict) or set(header) != HEADER_KEYS:
        fail(f"its header must hold exactly {sorted(HEADER_KEYS)}")
    fp = header["fingerprint"]
    if not isinstance(fp, dict):
        fail("its model fingerprint is not an object")
    for key in MODEL_INT_KEYS:
        if not _is_int(fp.get(key)) or fp[key] < 1:
            fail(f"the fingerprint's {key} is {fp.get(key)!r}, not an integer >= 1")
    for key in ("architecture", "model_type", "weights_sha256"):
        if not isinstance(fp.get(key), str):
            fail(f"the fingerprint's {key} is {fp.get(key)!r}, not a string")
    if not isinstance(fp.get("dtype"), str) or fp["dtype"] not in DTYPE_NAMES:
        fail(f"the fingerprint's dtype {fp.get('dtype')!r} is not one of {sorted(DTYPE_NAMES)}")
    if not isinstance(fp.get("tokenizer", {}), dict):
        fail("the tokenizer fingerprint is not an object")
    if not isinstance(header["settings"], dict):
        fail("its settings are not an object")
    n_layers = fp["n_layers"]
    stats = header["stats"]
    if not isinstance(stats, list) or not stats:
        fail("its per-chunk statistics are not a non-empty list")
    kept = [0] * n_layers
    for c, chunk in enumerate(stats):
        _check_chunk(chunk, c, n_layers, fail)
        for l, layer in enumerate(chunk["layers"]):
            kept[l] += layer["kept"]
    for l, total in enumerate(kept):  # rows per head: a whole number
        if abs(total - round(total)) > 1e-6 * len(stats):
            fail(f"layer {l}'s kept counts add up to {total}, not a whole number of rows")
        kept[l] = round(total)
    for key, total in (("context_length", sum(c["tokens"] for c in stats)),
                       ("offset", sum(c["positions"] for c in stats))):
        if not _is_int(header[key]) or header[key] != total:
            fail(f"its {key} {header[key]!r} is not the chunks' total {total}")
    tensors = header["tensors"]
    names = layer_names(n_layers)
    if not isinstance(tensors, dict) or sorted(tensors) != sorted(names):
        fail(f"it must hold the keys and values of its {n_layers} layers")
    for name in names:
        entry, l = tensors[name], int(name.split(".")[1])
        if name.endswith(".positions"):
            shape, code = [fp["n_kv_heads"], kept[l]], DTYPE_CODES[torch.int64]
        else:
            shape, code = [fp["n_kv_heads"], kept[l], fp["head_dim"]], DTYPE_CODES[DTYPE_NAMES[fp["dtype"]]]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "sha256"}:
            fail(f"the entry of tensor {name} is malformed")
        if entry["dtype"] != code or entry["shape"] != shape or not isinstance(entry["sha256"], str):
            fail(f"tensor {name} is {entry['dtype']!r} {entry['shape']!r}; the fingerprint and "
                 f"statistics say {code} {shape}")


def _check_chunk(chunk, c: int, n_layers: int, fail) -> None:
    """The statistics of chunk c: token counts, timings and one entry per layer."""
    if not isinstance(chunk, dict):
        fail(f"the statistics of chunk {c} are not an object")
    for key, low in (("tokens", 1), ("positions", 0), ("demos", 1)):
        if not _is_int(chunk.get(key)) or chunk[key] < low:
            fail(f"chunk {c}'s {key} is {chunk.get(key)!r}, not an integer >= {low}")
    if not _nonneg(chunk.get("seconds")):
        fail(f"chunk {c}'s seconds is {chunk.get('seconds')!r}, not a number >= 0")
    for kind in ("image", "video"):
        value = chunk.get(f"{kind}_tokens", 0)
        if not _is_int(value) or not 0 <= value <= chunk["tokens"]:
            fail(f"chunk {c}'s {kind}_tokens is {value!r}, not an integer in [0, {chunk['tokens']}]")
    layers = chunk.get("layers")
    if not isinstance(layers, list) or len(layers) != n_layers:
        fail(f"chunk {c} must have statistics for each of the {n_layers} layers")
    for l, layer in enumerate(layers):
        if not isinstance(layer, dict):
            fail(f"chunk {c}, layer {l}: statistics are not an object")
        if not _is_number(layer.get("kept")) or not 0 <= layer["kept"] <= chunk["tokens"]:
            fail(f"chunk {c}, layer {l}: kept is {layer.get('kept')!r}, not a number in [0, {chunk['tokens']}]")
        ratio = layer.get("ratio")
        if ratio is not None and not (_is_number(ratio) and 0 <= ratio <= 1):
            fail(f"chunk {c}, layer {l}: ratio is {ratio!r}, not a number in [0, 1] or null")
        for key in ("js", "kept_image", "kept_video"):
            if layer.get(key) is not None and not _nonneg(layer[key]):
                fail(f"chunk {c}, layer {l}: {key} is {layer[key]!r}, not a number >= 0 or null")


def validate_positions(header: dict, tensors: dict, where: str) -> None:
    """Raise EMLoCError unless every layer's positions [Hkv, M] increase along each head, lie in
    [0, context_length), and hold, per chunk, the chunk's "kept" rows (averaged over heads)."""
    def fail(what):
        raise EMLoCError(f"{where} is damaged: {what}; compress the task again")

    stats = header["stats"]
    bounds = [0]
    for chunk in stats:
        bounds.append(bounds[-1] + chunk["tokens"])
    edges = torch.tensor(bounds[1:-1], dtype=torch.int64)
    for l in range(header["fingerprint"]["n_layers"]):
        positions = tensors[f"layers.{l}.positions"]
        if positions.numel() == 0:
            counts = torch.zeros(len(stats), dtype=torch.float64)
        else:
            if bool((positions[:, 1:] <= positions[:, :-1]).any()):
                fail(f"layer {l}'s positions do not increase along each head")
            if int(positions.min()) < 0 or int(positions.max()) >= header["context_length"]:
                fail(f"layer {l}'s positions run outside the context's {header['context_length']} tokens")
            which = torch.bucketize(positions, edges, right=True)
            counts = torch.stack([(which == c).sum(dim=1) for c in range(len(stats))]).double().mean(dim=1)
        for c, chunk in enumerate(stats):
            if abs(float(counts[c]) - chunk["layers"][l]["kept"]) > 1e-9 * max(1, chunk["tokens"]):
                fail(f"chunk {c}, layer {l}: kept is {chunk['layers'][l]['kept']}, its positions hold "
                     f"{float(counts[c])} rows per head")
