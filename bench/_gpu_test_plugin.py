"""pytest plugin (`-p _gpu_test_plugin`, bench/ on sys.path): the kernel tests, written for CPU
tensors on the Triton interpreter, run every Triton call on EMLOC_TEST_DEVICE (default cuda).

Each Triton entry point of emloc_kernels (the public ops called with backend="triton", and the
*_triton launchers) is wrapped before the test modules import it: CPU tensor arguments are moved
to the device (strided views that are not dense become contiguous), the call runs there, and the
results come back to the CPU, so that the tests' references and tolerances apply unchanged. The
destination buffers of gather_append, written in place, are copied back. Used by
bench/gpu_check.py; with EMLOC_TEST_DEVICE=cpu (its --dry-run) the wrappers change nothing.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

DEVICE = torch.device(os.environ.get("EMLOC_TEST_DEVICE", "cuda"))
IN_PLACE = {"gather_append": (0, 1), "gather_append_triton": (0, 1)}  # positional dst args


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _has_cpu_tensor(values):
    return any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in values)


def _on_device(fn, name):
    """fn with CPU tensors run on DEVICE (backend="torch" calls are left alone)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if kwargs.get("backend") == "torch" or not _has_cpu_tensor([*args, *kwargs.values()]):
            return fn(*args, **kwargs)
        moved = _move(list(args), DEVICE)
        result = fn(*moved, **_move(kwargs, DEVICE))
        for i in IN_PLACE.get(name, ()):
            if moved[i] is not args[i]:
                args[i].copy_(moved[i])
        return _move(result, torch.device("cpu"))
    return wrapper


class _DeviceTeacherJS:
    """TeacherJS with CPU tensors held and evaluated on DEVICE."""

    def __init__(self, cls):
        self.cls = cls

    def __call__(self, teacher_hidden, weight, backend="auto"):
        if backend == "torch":
            return self.cls(teacher_hidden, weight, backend=backend)
        inner = self.cls(teacher_hidden.to(DEVICE), weight.to(DEVICE), backend=backend)
        return lambda student, replicas=1: inner(student.to(DEVICE), replicas).cpu()


def _patch():
    names = {"emloc_kernels.probe_scores": ["probe_scores", "_probe_scores_triton"],
             "emloc_kernels.prefix_attention": ["prefix_attention", "prefix_attention_triton"],
             "emloc_kernels.ranking": ["rank_tokens", "rank_tokens_triton"],
             "emloc_kernels.compaction": ["gather_append", "gather_append_triton"],
             "emloc_kernels.lm_head_js": ["lm_head_js", "teacher_logsumexp", "lm_head_js_triton",
                                          "teacher_logsumexp_triton"]}
    package = importlib.import_module("emloc_kernels")
    for module_name, functions in names.items():
        module = importlib.import_module(module_name)
        for name in functions:
            wrapped = _on_device(getattr(module, name), name)
            setattr(module, name, wrapped)
            if hasattr(package, name) and not isinstance(getattr(package, name), type(module)):
                setattr(package, name, wrapped)
    lm_head_js = importlib.import_module("emloc_kernels.lm_head_js")
    lm_head_js.TeacherJS = package.TeacherJS = _DeviceTeacherJS(lm_head_js.TeacherJS)


_patch()
