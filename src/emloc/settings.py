"""Compression settings: validated once, stored with every memory."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from .errors import EMLoCError

METHODS = ("emloc", "full", "uniform", "pyramid")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class Settings:
    """What `EMLoC.compress` does; defaults reproduce ALGORITHM.md.

    tolerance        δ, the JS bound per chunk (natural log); 0 disables pruning.
    ratios           candidate keep-ratios, tried in increasing order.
    demos_per_chunk  demonstrations rendered and compressed together.
    method           "emloc" (search), "full" (no pruning), "uniform" / "pyramid" (fixed schedules).
    keep_ratio       mean kept fraction per layer for "uniform" and "pyramid".
    pool_width       width of the mean pool that smooths importance scores.
    protect_bonus    added to the scores of answer-span tokens so they are always kept.
    backend          "auto" | "triton" | "torch" for the kernels.
    layer_group      layers searched together top-down, sharing one keep-ratio (1 = faithful).
    batch_candidates test a layer's candidates in one batched forward (same decisions as one
                     by one); None = batch on CUDA, one by one elsewhere (faster on CPU).
    """

    tolerance: float = 0.005
    ratios: tuple = (0.1, 0.2, 0.5)
    demos_per_chunk: int = 4
    method: str = "emloc"
    keep_ratio: float | None = None
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
        dpc = self.demos_per_chunk
        if isinstance(dpc, bool) or not isinstance(dpc, int) or dpc < 1:
            raise EMLoCError(f"demos_per_chunk must be an integer >= 1, got {dpc!r}")
        if self.method not in METHODS:
            raise EMLoCError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method in ("uniform", "pyramid"):
            kr = self.keep_ratio
            if kr is None or isinstance(kr, bool) or not isinstance(kr, (int, float)) or not (0 < kr <= 1):
                raise EMLoCError(f"method={self.method!r} needs keep_ratio in (0, 1], got {kr!r}")
        elif self.keep_ratio is not None:
            raise EMLoCError(f"keep_ratio only applies to 'uniform' and 'pyramid', not {self.method!r}")
        lg = self.layer_group
        if isinstance(lg, bool) or not isinstance(lg, int) or lg < 1:
            raise EMLoCError(f"layer_group must be an integer >= 1 (1 = the faithful search), got {lg!r}")
        if self.batch_candidates not in (None, True, False):
            raise EMLoCError(f"batch_candidates must be True, False or None (auto), got {self.batch_candidates!r}")
        if self.backend not in BACKENDS:
            raise EMLoCError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.pool_width, int) or self.pool_width < 1 or self.pool_width % 2 == 0:
            raise EMLoCError(f"pool_width must be an odd integer >= 1, got {self.pool_width!r}")

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
