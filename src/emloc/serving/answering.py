"""Answering queries from a task memory: prefill over the memory, greedy or sampled decoding.

The memory is only read (PrefixPlan attends to each layer's memory buffers in place, shared by
every row of the batch); each query batch keeps its own keys/values in OwnKVCaches, so
answering never changes the memory. On a model split over devices, each device gets its own
PrefixPlan, own-token cache and padding mask for the layers it runs (DevicePlans); the memory of
a layer is read where it lives, on that layer's device.
"""
from __future__ import annotations

import contextlib
import copy

import torch

from emloc.serving.attention import OwnKVCache, PrefixPlan
from emloc.errors import EMLoCError


def _left_padded(adapter, rows: list, pad_id: int, offset: int):
    """Rendered query rows -> ids [B, T], valid [B, T] (False at the left padding), positions
    [P, B, T] (offset + each row's own positions; padding slots at the offset)."""
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.full((adapter.position_dims, len(rows), width), offset, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row.ids):] = torch.tensor(row.ids, dtype=torch.long)
        valid[b, width - len(row.ids):] = True
        positions[:, b, width - len(row.ids):] += adapter.relative_positions(row)
    return ids.to(adapter.device), valid.to(adapter.device), positions.to(adapter.device)


def cache_inputs(adapter, memory, rows: list, pad_id: int) -> dict:
    """Inputs of model(...) / model.generate(...) for rendered query rows read after `memory`
    through a MemoryCache (see emloc.cache): input_ids [B, T] left-padded, attention_mask
    [B, offset + T] (offset ones for the memory, then the rows' padding), position_ids [B, T]
    (offset + each row's own positions, as generate_batch uses; [3, B, T] M-RoPE positions for
    a vision-language model, which also gets mm_token_type_ids and the rows' pixel values and
    grids, in row order)."""
    check_positions(adapter, memory, max(len(r.ids) for r in rows))
    ids, valid, positions = _left_padded(adapter, rows, pad_id, memory.offset)
    mask = torch.cat([valid.new_ones(len(rows), memory.offset), valid], dim=1).long()
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions[0]}
    if adapter.position_dims != 1:
        media = [m for row in rows for m in row.media]
        flat = adapter.model_inputs([t for row in rows for t in row.ids], media)
        inputs.update({k: v for k, v in flat.items() if k not in ("input_ids", "attention_mask")})
        inputs["mm_token_type_ids"] = adapter.token_types(ids).to(ids.device)
        inputs["position_ids"] = positions
    return inputs


def check_positions(adapter, memory, needed: int) -> None:
    if memory.offset + needed > adapter.max_positions:
        raise EMLoCError(
            f"the memory's offset {memory.offset} plus {needed} query/answer tokens exceeds the "
            f"model's {adapter.max_positions} positions; use fewer demos or shorter queries")


class Sampler:
    """Chooses the next token from fp32 logits [B, V]: argmax, or a sample.

    do_sample=False is greedy. Otherwise softmax(logits / temperature) restricted to the top_k
    most likely tokens (None: all) and to the smallest most-likely set whose probability reaches
    top_p (None: 1.0), drawn with the generator set by `seed`.
    """

    def __init__(self, do_sample=False, temperature=1.0, top_k=None, top_p=None):
        if not do_sample and (top_k is not None or top_p is not None):
            raise EMLoCError("top_k and top_p apply only when sampling: pass do_sample=True")
        if do_sample:
            t = temperature
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
                raise EMLoCError(f"temperature must be > 0 when sampling, got {temperature!r}")
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise EMLoCError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
            if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                      or not 0 < top_p <= 1):
                raise EMLoCError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        self.generator = None

    def seed(self, device, seed: int) -> None:
        """Make sampling reproducible: a generator on `device` (where the logits are) seeded with `seed`."""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] fp32 -> token ids [B] int64."""
        if not self.do_sample:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p  # more likely tokens reach top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


class DevicePlans:
    """Decoding plans of one batch, one PrefixPlan per device the model's layers run on.

    Each device's part holds the memory views of its layers, an OwnKVCache for those layers only
    (indexed locally) and the rows' validity mask on that device. `plan(n_own)` returns the plan
    for a forward in which the rows have n_own own tokens in total (cached + new); with a single
    device it is a plain PrefixPlan.
    """

    def __init__(self, adapter, memory, valid: torch.Tensor, backend: str):
        """valid [B, capacity] bool: False at left padding, True for every later own token."""
        batch, capacity = valid.shape
        kv = memory.kv()
        by_device = {}
        for l, device in enumerate(adapter.layer_devices):
            by_device.setdefault(device, []).append(l)
        self._parts = []  # (memory views, OwnKVCache, valid) per device
        self._route = {}  # layer -> (part index, local layer index)
        for device, layers in by_device.items():
            cache = OwnKVCache(len(layers), batch, adapter.n_kv_heads, adapter.head_dim, capacity,
                               adapter.dtype, device)
            self._parts.append(([kv[l] for l in layers], cache, valid.to(device)))
            for local, l in enumerate(layers):
                self._route[l] = (len(self._parts) - 1, local)
        self.backend = backend

    def plan(self, n_own: int):
        plans = [PrefixPlan(mem, own_valid=valid[:, :n_own], own_cache=cache, backend=self.backend)
                 for mem, cache, valid in self._parts]
        return plans[0] if len(plans) == 1 else _RoutedPlan(plans, self._route)


class _RoutedPlan:
    """Sends layer l's attention to its device's PrefixPlan under the layer's local index."""

    def __init__(self, plans: list, route: dict):
        self.plans, self.route = plans, route

    def attend(self, layer, q, k, v, scale):
        part, local = self.route[layer]
        return self.plans[part].attend(local, q, k, v, scale)


def query_logits(adapter, memory, seq, first_row: int, backend: str) -> torch.Tensor:
    """fp32 logits [len(seq.ids) - first_row, V] of one rendered sequence read after the memory."""
    check_positions(adapter, memory, len(seq.ids))
    ids_t = torch.tensor([seq.ids], device=adapter.device)
    positions = (memory.offset + adapter.relative_positions(seq)[:, None, :]).to(adapter.device)
    hidden = adapter.embed(ids_t, [seq])
    plan = PrefixPlan(memory.kv(), backend=backend)
    out = adapter.run_layers(hidden, positions, adapter.rotary(hidden, positions), 0,
                             adapter.n_layers, plan)
    return adapter.logits(adapter.final_norm(out[0, first_row:]))


def generate_batch(adapter, memory, rows: list, stop_ids: set, pad_id: int, max_new_tokens: int,
                   sampler: Sampler, backend: str) -> list:
    """Decode up to max_new_tokens for each rendered query row (one left-padded batch).

    Row b's positions start at memory.offset whatever its padding, and each new token takes the
    row's largest position + 1; a row stops after emitting a token of stop_ids (included in its
    output) or max_new_tokens. Returns the new ids per row.
    """
    a = adapter
    check_positions(a, memory, max(len(r.ids) for r in rows) + max_new_tokens)
    ids, valid0, positions = _left_padded(a, rows, pad_id, memory.offset)
    batch, width = ids.shape
    valid = torch.ones(batch, width + max_new_tokens, dtype=torch.bool, device=a.device)
    valid[:, :width] = valid0
    plans = DevicePlans(a, memory, valid, backend)
    seqs = rows
    step_ids, outputs = ids, [[] for _ in rows]
    done = torch.zeros(batch, dtype=torch.bool, device=a.device)
    stop = torch.tensor(sorted(stop_ids), device=a.device)
    for step in range(max_new_tokens):
        hidden = a.embed(step_ids, seqs)
        out = a.run_layers(hidden, positions, a.rotary(hidden, positions), 0, a.n_layers,
                           plans.plan(width + step))
        token = sampler(a.logits(a.final_norm(out[:, -1])))
        for b, (t, finished) in enumerate(zip(token.tolist(), done.tolist())):
            if not finished:
                outputs[b].append(t)
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        step_ids, seqs = token[:, None], None
        positions = (positions.amax(dim=(0, 2))[None, :, None].repeat(a.position_dims, 1, 1) + 1
                     if step == 0 else positions + 1)
    return outputs


def decoding_config(generation_config, stop_ids: set, pad_id: int, num_return_sequences=1, **fields):
    """The transformers GenerationConfig of an EMLoC.generate call that runs model.generate:
    a copy of `generation_config` (default: greedy, 32 new tokens), stopping at stop_ids unless
    it names its own eos_token_id, with the non-None `fields` (max_new_tokens, do_sample,
    temperature, top_k, top_p) set over it."""
    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise EMLoCError(f"generation_config must be a transformers GenerationConfig, got "
                         f"{type(generation_config).__name__}")
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    if generation_config is None or generation_config.max_new_tokens is None:
        config.max_new_tokens = 32
    if config.eos_token_id is None:
        config.eos_token_id = sorted(stop_ids)
    if config.pad_token_id is None:
        config.pad_token_id = pad_id
    for name, value in fields.items():
        if value is not None:
            setattr(config, name, value)
    if num_return_sequences != 1:
        if isinstance(num_return_sequences, bool) or not isinstance(num_return_sequences, int) or num_return_sequences < 1:
            raise EMLoCError(f"num_return_sequences must be an integer >= 1, got {num_return_sequences!r}")
        config.num_return_sequences = num_return_sequences
    return config


@contextlib.contextmanager
def seeded(device, seed, do_sample: bool):
    """Inside, torch's global generators (CPU and `device`) start from `seed` (0 when None) if
    sampling; their previous state is restored on exit."""
    if not do_sample:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0 if seed is None else seed)
        yield


def until_stop(ids: list, stop_ids: set) -> list:
    """ids up to and including the first token of stop_ids (what follows is generate's padding)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[:i + 1]
    return ids
