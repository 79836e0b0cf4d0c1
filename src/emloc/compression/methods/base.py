"""The interface every token-selection method implements (one module per method, see REGISTRY).

A method decides, for one chunk and every layer, which rows the memory keeps. The chunk loop
(compression/chunk_loop.py) prefills the chunk over the memory, builds what the method asks for
(the last queries of the chunk, the probe pass with importance scores) into a ChunkStep, and
applies the decisions: a sequential method's index picks rows of the chunk, appended after the
memory's; a pooled method's index picks rows of memory ⊕ chunk, which replace the memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ChunkStep:
    """What a method sees of one chunk.

    adapter, settings, backend   the model's DecoderAdapter, Settings, kernel backend
    memory                       the TaskMemory before this chunk (its rows per layer: memory.kv())
    chunk_kv                     per layer (keys, values) [Hkv, Lc, D] of the chunk, prefilled over
                                 the memory
    tail_queries                 per layer (queries [Hq, w, D] of the chunk's last w = query_tail
                                 positions, scale), or None when the method asks for none
    protected                    [Lc] bool: tokens every layer keeps (answer spans for the probe
                                 methods; protect_first tokens of the context's start)
    tokens_seen                  context tokens so far, this chunk's included
    tokens_total                 the whole context's tokens, or None where it is not known up
                                 front (images and videos are rendered chunk by chunk)
    last                         True for the context's last chunk
    probe                        for methods with needs_probe: the context, the ProbeBatch,
                                 layer inputs, scores per layer, the teacher and rotary tables
    state                        the method's own state across the chunks of one compression
    """

    adapter: object
    settings: object
    backend: str
    memory: object
    chunk_kv: list
    tail_queries: list | None
    protected: object
    tokens_seen: int
    tokens_total: int | None
    last: bool
    probe: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)

    @property
    def chunk_len(self) -> int:
        return self.chunk_kv[0][0].shape[1]


class SelectionMethod:
    """A token-selection method.

    name             the `method=` setting that selects it
    needs_keep_ratio it prunes to settings.keep_ratio (else keep_ratio is refused)
    one_chunk        without demos_per_chunk / chunk_tokens, the whole context is one chunk
    needs_probe      the chunk loop runs the probe pass (each demo alone after the chunk,
                     ALGORITHM.md step 2) and gives its importance scores
    pooled           decisions index memory ⊕ chunk (the whole memory is selected again)
    sequential       first_chunks(n) of its memory equals compressing those chunks' demos alone
    """

    name = ""
    needs_keep_ratio = False
    one_chunk = False
    needs_probe = False
    pooled = False
    sequential = True

    def probes(self, settings) -> bool:
        """Whether the probe pass runs for these settings (needs_probe, unless nothing is pruned)."""
        return self.needs_probe

    def query_tail(self, settings) -> int:
        """How many of the chunk's last queries per layer the prefill records (0 = none)."""
        return 0

    def decide(self, step: ChunkStep) -> list:
        """Per layer (index [Hkv, k] int64 in row order, or None = keep every row; ratio; JS of the
        accepted test or None; tests run)."""
        raise NotImplementedError


def gather_rows(keys, values, index):
    """keys/values [Hkv, L, D], index [Hkv, k] -> the chosen rows per head, [Hkv, k, D] each."""
    import torch

    idx = index[:, :, None].expand(-1, -1, keys.shape[-1])
    return torch.gather(keys, 1, idx), torch.gather(values, 1, idx)


def candidate_sizes(ratios, chunk_len: int, n_protected: int) -> list:
    """k = int(r * Lc), at least the protected count and 1, at most Lc (one per ratio)."""
    return [min(chunk_len, max(int(r * chunk_len), n_protected, 1)) for r in ratios]


KEEP_ALL = (None, 1.0, None, 0)  # a layer's decision that keeps every row of the chunk
