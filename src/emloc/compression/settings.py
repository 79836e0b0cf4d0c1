"""Compression settings: validated once, stored with every memory."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from emloc.errors import EMLoCError

from emloc.compression.methods import REGISTRY

METHODS = tuple(REGISTRY)
POOL_SCORES = ("mean", "window")
FIXED_RATIO_METHODS = tuple(name for name, m in REGISTRY.items() if m.needs_keep_ratio)  # need keep_ratio
DEFAULT_DEMOS_PER_CHUNK = 4
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Settings:
    """What `EMLoC.compress` does; defaults reproduce ALGORITHM.md.

    tolerance        δ, the JS bound per chunk (natural log); 0 disables pruning.
    ratios           candidate keep-ratios, tried in increasing order.
    demos_per_chunk  demonstrations rendered and compressed together; None = 4, except all demos
                     in one chunk for the one-prefill baselines (or when chunk_tokens is given).
    chunk_tokens     cut chunks by size instead: consecutive demos while their tokens (each demo
                     rendered alone) fit in chunk_tokens, at least one demo per chunk.
    lookback_chunks  how many previous chunks a chunk's prefill, probe and tests see uncompressed
                     (their full keys/values) instead of their pruned memory rows: 0 = faithful,
                     "all" = the whole uncompressed history (peak memory then grows with it).
                     A diagnostic of drift: measured, it makes fidelity worse
                     (bench/FIDELITY_DIAGNOSIS.md).
    recent_tokens    the last demos whose tokens (each rendered alone) fit in recent_tokens are
                     kept whole in every layer (0 = faithful: every chunk is pruned).
    protect_first    the context's first tokens (the attention sink) are protected like answer
                     tokens: kept in every layer (0 = faithful).
    method           "emloc" (search), "full" (no pruning), "uniform" / "pyramid" (fixed schedules
                     by emloc's scores), "snapkv" / "tova" / "streaming" (one-prefill baselines:
                     SnapKV's observation-window scores, TOVA's last-token scores, StreamingLLM's
                     sinks + recent tokens), "budget" (one budget shared by all chunks: SnapKV's
                     scores over the memory pool, chunk by chunk), "tova-stream" (TOVA with a
                     fixed budget as chunks arrive). One module each in compression/methods/.
    keep_ratio       kept fraction of the context per layer for the fixed-ratio methods.
    pool_factor      method="budget": the pool holds at most pool_factor × the final budget rows
                     per layer between chunks (peak memory: that pool plus one chunk).
    pool_scores      method="budget": rank the pool by the mean of the observation-window scores
                     each row received over the chunks ("mean") or by the current chunk's window
                     only ("window"); measured in bench/FIDELITY.md.
    window           SnapKV's observation window (the last tokens of the context; always kept).
    sinks            StreamingLLM's attention-sink tokens kept at the start.
    pool_width       width of the mean pool that smooths importance scores.
    protect_bonus    added to the scores of answer-span tokens so they are always kept.
    backend          "auto" | "triton" | "torch" for the kernels.
    layer_group      layers searched together top-down, sharing one keep-ratio (1 = faithful).
    batch_candidates test a layer's candidates in one batched forward (same decisions as one
                     by one); None = batch on CUDA, one by one elsewhere (faster on CPU).
    """

    tolerance: float = 0.005
    ratios: tuple = (0.1, 0.2, 0.5)
    demos_per_chunk: int | None = None
    method: str = "emloc"
    keep_ratio: float | None = None
    chunk_tokens: int | None = None
    lookback_chunks: int | str = 0
    recent_tokens: int = 0
    protect_first: int = 0
    pool_factor: float = 2.0
    pool_scores: str = "mean"
    window: int = 64
    sinks: int = 4
    pool_width: int = 5
    protect_bonus: float = 100.0
    backend: str = "auto"
    layer_group: int = 1
    batch_candidates: bool | None = None

    def __post_init__(self):
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
            raise EMLoCError(f"tolerance must be a number >= 0 (the JS bound in nats), got {tol!r}")
        ratios = self.ratios
        if isinstance(ratios, (str, bytes, dict)) or not hasattr(ratios, "__iter__"):
            raise EMLoCError(f"ratios must be a sequence of numbers in (0, 1], got {ratios!r}")
        ratios = tuple(ratios)
        if any(isinstance(r, bool) or not isinstance(r, numbers.Real) for r in ratios):
            raise EMLoCError(f"ratios must be a sequence of numbers in (0, 1], got {self.ratios!r}")
        ratios = tuple(float(r) for r in ratios)
        if not ratios:
            raise EMLoCError("ratios is empty: give at least one candidate keep-ratio in (0, 1]")
        if any(not (0 < r <= 1) for r in ratios):
            raise EMLoCError(f"every ratio must lie in (0, 1], got {ratios}")
        if list(ratios) != sorted(set(ratios)):
            raise EMLoCError(f"ratios must be strictly increasing (they are tried in order), got {ratios}")
        object.__setattr__(self, "ratios", ratios)
        if self.method not in METHODS:
            raise EMLoCError(f"method must be one of {METHODS}, got {self.method!r}")
        self._check_chunking()
        if self.method in FIXED_RATIO_METHODS:
            kr = self.keep_ratio
            if kr is None or isinstance(kr, bool) or not isinstance(kr, (int, float)) or not (0 < kr <= 1):
                raise EMLoCError(f"method={self.method!r} needs keep_ratio in (0, 1], got {kr!r}")
        elif self.keep_ratio is not None:
            raise EMLoCError(f"keep_ratio only applies to {FIXED_RATIO_METHODS}, not {self.method!r}")
        if REGISTRY[self.method].pooled and self.lookback_chunks != 0:
            raise EMLoCError(f"lookback_chunks applies to the methods that append chunk by chunk; "
                             f"method={self.method!r} selects the whole memory again at every chunk")
        pf = self.pool_factor
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or math.isnan(pf) or pf < 1:
            raise EMLoCError(f"pool_factor must be a number >= 1 (the pool in final budgets), got {pf!r}")
        object.__setattr__(self, "pool_factor", float(pf))
        if self.pool_scores not in POOL_SCORES:
            raise EMLoCError(f"pool_scores must be one of {POOL_SCORES}, got {self.pool_scores!r}")
        lg = self.layer_group
        if isinstance(lg, bool) or not isinstance(lg, int) or lg < 1:
            raise EMLoCError(f"layer_group must be an integer >= 1 (1 = the faithful search), got {lg!r}")
        if self.batch_candidates not in (None, True, False):
            raise EMLoCError(f"batch_candidates must be True, False or None (auto), got {self.batch_candidates!r}")
        if self.backend not in BACKENDS:
            raise EMLoCError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.pool_width, int) or self.pool_width < 1 or self.pool_width % 2 == 0:
            raise EMLoCError(f"pool_width must be an odd integer >= 1, got {self.pool_width!r}")

    def _check_chunking(self) -> None:
        """Validate demos_per_chunk / chunk_tokens / lookback_chunks / window / sinks and resolve
        demos_per_chunk=None to its method's default."""
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EMLoCError(f"{name} must be an integer >= 1, got {value!r}")

        dpc, tokens = self.demos_per_chunk, self.chunk_tokens
        if tokens is not None:
            positive_int("chunk_tokens", tokens)
            if dpc is not None:
                raise EMLoCError("give demos_per_chunk or chunk_tokens, not both")
        elif dpc is not None:
            positive_int("demos_per_chunk", dpc)
        elif not REGISTRY[self.method].one_chunk:
            object.__setattr__(self, "demos_per_chunk", DEFAULT_DEMOS_PER_CHUNK)
        lb = self.lookback_chunks
        if lb != "all" and (isinstance(lb, bool) or not isinstance(lb, int) or lb < 0):
            raise EMLoCError(f"lookback_chunks must be an integer >= 0 or 'all', got {lb!r}")
        for name in ("recent_tokens", "protect_first"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EMLoCError(f"{name} must be an integer >= 0, got {value!r}")
        positive_int("window", self.window)
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise EMLoCError(f"sinks must be an integer >= 0, got {self.sinks!r}")

    def check_model(self, adapter) -> None:
        """The checks that need the model (a DecoderAdapter): layer_group at most its layer
        count, and backend="triton" only where Triton can run (CUDA, or TRITON_INTERPRET=1)."""
        if self.layer_group > adapter.n_layers:
            raise EMLoCError(f"layer_group={self.layer_group} is larger than the model's "
                             f"{adapter.n_layers} layers; give at most {adapter.n_layers}")
        from emloc_kernels._backend import triton_interpreted

        devices = [adapter.device, *adapter.layer_devices]
        if self.backend == "triton" and not triton_interpreted() and any(d.type != "cuda" for d in devices):
            raise EMLoCError("backend='triton' needs the model on CUDA, or TRITON_INTERPRET=1 set before "
                             "emloc is imported (the CPU interpreter, slow); use backend='auto' or 'torch'")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = list(self.ratios)
        return d
