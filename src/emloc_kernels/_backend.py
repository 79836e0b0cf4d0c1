"""Backend selection shared by every op ("auto" | "triton" | "torch"); the SM count and
architecture launchers size their grids and tiles by."""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_compile_only = None  # (SM count, arch) of the target while aot.compile_only is active


def set_compile_only(sms=None, arch=None):
    """Enter (the target's SM count and arch, e.g. 90) or leave (no arguments) compile-only
    mode; used by emloc_kernels.aot."""
    global _compile_only
    _compile_only = None if sms is None else (sms, arch)


def multiprocessors(device: torch.device):
    """SMs the launchers size their grids by: the CUDA device's, the compile-only target's, or
    None on CPU (the interpreter)."""
    if _compile_only is not None:
        return _compile_only[0]
    if device.type == "cuda":
        return _cuda_properties(_index(device))[0]
    return None


def cuda_arch(device: torch.device):
    """Compute capability x 10 (80 for A100, 90 for H100) of the device or compile-only target,
    None on CPU: launchers pick per-architecture tiles by it."""
    if _compile_only is not None:
        return _compile_only[1]
    if device.type == "cuda":
        return _cuda_properties(_index(device))[1]
    return None


def _index(device):
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.major * 10 + props.minor


def triton_interpreted() -> bool:
    """True when Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for the given tensors.

    "auto" picks Triton when every tensor is on CUDA, the PyTorch reference otherwise.
    "triton" on CPU tensors is only possible under the interpreter (or in compile-only mode,
    where nothing runs).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not triton_interpreted() \
            and _compile_only is None:
        raise ValueError(
            "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before Triton is "
            "imported to run the kernels on the CPU interpreter"
        )
    return backend
