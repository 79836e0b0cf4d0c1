"""Answering queries from a task memory: prefill over the memory, greedy or sampled decoding.

The memory is only read (PrefixPlan attends to it in place); each query batch keeps its own
keys/values in an OwnKVCache, so answering never changes the memory.
"""
from __future__ import annotations

import torch

from .attention import OwnKVCache, PrefixPlan
from .errors import EMLoCError


def _left_padded(rows: list, pad_id: int, device):
    """rows of token ids -> ids [B, T], valid [B, T] (False at the left padding), pad counts [B]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
        valid[b, width - len(row):] = True
    pads = torch.tensor([width - len(r) for r in rows])
    return ids.to(device), valid.to(device), pads.to(device)


def check_positions(adapter, memory, needed: int) -> None:
    if memory.offset + needed > adapter.max_positions:
        raise EMLoCError(
            f"the memory's offset {memory.offset} plus {needed} query/answer tokens exceeds the "
            f"model's {adapter.max_positions} positions; use fewer demos or shorter queries")


def query_logits(adapter, memory, ids: list, first_row: int, backend: str) -> torch.Tensor:
    """fp32 logits [len(ids) - first_row, V] of one token sequence read after the memory."""
    check_positions(adapter, memory, len(ids))
    ids_t = torch.tensor([ids], device=adapter.device)
    positions = memory.offset + torch.arange(len(ids), device=adapter.device)[None]
    hidden = adapter.embed(ids_t)
    plan = PrefixPlan(memory.kv(), backend=backend)
    out = adapter.run_layers(hidden, positions, adapter.rotary(hidden, positions), 0,
                             adapter.n_layers, plan)
    return adapter.logits(adapter.final_norm(out[0, first_row:]))


def generate_batch(adapter, memory, rows: list, stop_ids: set, pad_id: int, max_new_tokens: int,
                   do_sample: bool, temperature: float, generator, backend: str) -> list:
    """Decode up to max_new_tokens for each row of token ids; returns the new ids per row."""
    a = adapter
    check_positions(a, memory, max(len(r) for r in rows) + max_new_tokens)
    ids, valid0, pads = _left_padded(rows, pad_id, a.device)
    batch, width = ids.shape
    valid = torch.zeros(batch, width + max_new_tokens, dtype=torch.bool, device=a.device)
    valid[:, :width] = valid0
    cache = OwnKVCache(a.n_layers, batch, a.n_kv_heads, a.head_dim, width + max_new_tokens,
                       a.dtype, a.device)
    positions = (memory.offset + torch.arange(width, device=a.device)[None] - pads[:, None]).clamp_min(memory.offset)
    step_ids, outputs = ids, [[] for _ in rows]
    done = torch.zeros(batch, dtype=torch.bool, device=a.device)
    stop = torch.tensor(sorted(stop_ids), device=a.device)
    for step in range(max_new_tokens):
        hidden = a.embed(step_ids)
        plan = PrefixPlan(memory.kv(), own_valid=valid[:, :width + step], own_cache=cache, backend=backend)
        out = a.run_layers(hidden, positions, a.rotary(hidden, positions), 0, a.n_layers, plan)
        logits = a.logits(a.final_norm(out[:, -1]))
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            token = logits.argmax(dim=-1)
        for b in range(batch):
            if not done[b]:
                outputs[b].append(int(token[b]))
        done |= torch.isin(token, stop)
        if bool(done.all()):
            break
        valid[:, width + step] = True
        step_ids = token[:, None]
        positions = positions[:, -1:] + 1
    return outputs
