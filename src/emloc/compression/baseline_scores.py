"""Token selection of the one-prefill baselines (SnapKV, TOVA, StreamingLLM), for comparisons.

Each runs on one layer of a context prefilled in one piece (exact keys/values) and returns,
per KV head, the indices of the kept tokens in position order, [Hkv, k] int64 (the *_scores
functions give the scores they rank by; the shared-budget methods rank a pool with them). The scores
follow the papers as kvpress 0.5.5 implements them (fp32 softmax over the context's keys):

- SnapKV (Li et al., 2024): the attention of the last `window` queries to the earlier keys,
  averaged over those queries, mean-pooled along the keys (width 5, zero padding counted), and
  averaged over the query heads of each KV group; the window itself is always kept (a context
  no longer than the window keeps its most recent tokens).
- TOVA (Oren et al., 2024): the attention of the last query to the earlier keys, averaged over
  all query heads (one set of tokens for every KV head); the last token is always kept.
- StreamingLLM (Xiao et al., 2024): the first `sinks` tokens and the most recent ones.

Plain PyTorch on purpose: they run once per compression on [Hq, window, L] scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SNAPKV_POOL = 5


def _window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 softmax of the last w queries [Hq, w, D] over keys [Hkv, L, D] (GQA, causal: the
    query of position L-w+i sees keys <= L-w+i) -> [Hq, w, L]."""
    n_q, w, _ = queries.shape
    n_kv, length, _ = keys.shape
    k = keys.float().repeat_interleave(n_q // n_kv, dim=0)
    logits = torch.einsum("hwd,hld->hwl", queries.float(), k) * scale
    future = torch.arange(length, device=keys.device)[None, :] > (length - w + torch.arange(w, device=keys.device))[:, None]
    return logits.masked_fill(future, float("-inf")).softmax(dim=-1)


def top_k_in_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[Hkv, L] scores -> the k highest per row, in position order, [Hkv, k] int64."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def snapkv_scores(queries, keys, scale: float) -> torch.Tensor:
    """SnapKV's scores [Hkv, L] fp32: queries [Hq, w, D] of the last w positions over keys
    [Hkv, L, D]; the window's own tokens score above every other (always kept). A context no
    longer than the window scores its tokens by position (the most recent highest)."""
    n_kv, length, _ = keys.shape
    w = queries.shape[1]
    if w >= length:
        return torch.arange(length, device=keys.device, dtype=torch.float32).expand(n_kv, -1)
    attn = _window_attention(queries, keys, scale)[:, :, :length - w].mean(dim=1)  # [Hq, L - w]
    pooled = F.avg_pool1d(attn[:, None], SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2)[:, 0]
    scores = pooled.view(n_kv, -1, length - w).mean(dim=1)
    return F.pad(scores, (0, w), value=float(scores.max()) + 1.0)


def tova_scores(queries, keys, scale: float) -> torch.Tensor:
    """TOVA's scores [Hkv, L] fp32 (the same row for every KV head): the last query of queries
    [Hq, >=1, D] over keys [Hkv, L, D], averaged over all query heads; the last token highest."""
    n_kv, length, _ = keys.shape
    attn = _window_attention(queries[:, -1:], keys, scale)[:, 0, :length - 1].mean(dim=0)  # [L - 1]
    scores = F.pad(attn, (0, 1), value=float(attn.max()) + 1.0 if length > 1 else 1.0)
    return scores[None].expand(n_kv, -1)


def protect(scores: torch.Tensor, protected) -> torch.Tensor:
    """scores [Hkv, L] with the tokens of protected ([L] or [Hkv, L] bool, or None) above every other."""
    if protected is None or not bool(protected.any()):
        return scores
    mask = protected.to(scores.device)
    return scores.masked_fill(mask if mask.dim() == 2 else mask[None], float(scores.max()) + 2.0)


def snapkv_index(queries, keys, k: int, scale: float, protected=None) -> torch.Tensor:
    """SnapKV's kept tokens: queries [Hq, w, D] of the last w positions, keys [Hkv, L, D] -> [Hkv, k];
    protected ([L] bool) tokens first."""
    return top_k_in_order(protect(snapkv_scores(queries, keys, scale), protected), k)


def tova_index(queries, keys, k: int, scale: float, protected=None) -> torch.Tensor:
    """TOVA's kept tokens: queries [Hq, >=1, D] (the last is used), keys [Hkv, L, D] -> [Hkv, k];
    protected ([L] bool) tokens first."""
    return top_k_in_order(protect(tova_scores(queries, keys, scale), protected), k)


def streaming_index(n_kv: int, length: int, k: int, sinks: int, device=None, protected=None) -> torch.Tensor:
    """StreamingLLM's kept tokens: the first min(sinks, k) and the last k - that many -> [Hkv, k];
    protected ([L] bool) tokens replace the oldest of the recent ones."""
    scores = torch.arange(length, dtype=torch.float32, device=device)
    scores[:min(sinks, k)] += length
    return top_k_in_order(protect(scores[None].expand(n_kv, -1), protected), k)
