"""Compile-only mode: the real launchers drive the Triton compiler for a GPU target; nothing runs.

Inside `compile_only(target)` Triton's active driver is one that reports `target` (sm_80, sm_90,
sm_100) and launches nothing, and a JIT cache hook records each kernel specialisation a launcher
asks for (signature, constexprs, alignment attributes, num_warps / num_stages) instead of
compiling and launching it; the ops treat `backend="triton"` on CPU tensors as allowed and see
the target's SM count. The public ops are called on CPU tensors that are never read (outputs are
garbage), each recorded kernel is compiled with `triton.compile` for the target, and the
`cuobjdump` shipped with Triton (`--dump-resource-usage`) reads the registers, stack and local
(spill) memory of its cubin; shared memory is Triton's dynamic allocation plus the static one.

No GPU, driver or CUDA toolkit is needed, but the kernels must be real JIT functions: run this
with TRITON_INTERPRET unset (the module refuses otherwise).

    python -m emloc_kernels.aot [--shapes qwen2vl7b,test] [--dtypes bfloat16,float16]
                                [--targets sm_80,sm_90] [--markdown] [--json FILE]

prints one row per compiled kernel: registers, spills, shared memory, occupancy estimate.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

from . import _backend


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU architecture and its per-SM / per-block limits (CUDA programming guide tables)."""
    name: str              # "sm_90"
    arch: int              # compute capability x 10
    gpus: str
    sms: int               # multiprocessors of the named GPU (the launchers size grids by it)
    smem_per_block: int    # bytes of shared memory one block may opt into
    smem_per_sm: int       # bytes of shared memory per SM (1 KiB of it reserved per block)
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


TARGETS = {
    "sm_80": Target("sm_80", 80, "A100", 108, 166912, 167936),
    "sm_90": Target("sm_90", 90, "H100/H200", 132, 232448, 233472),
    "sm_100": Target("sm_100", 100, "B200", 148, 232448, 233472),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class Launch:
    """One kernel specialisation a launcher asked for (what triton.compile needs)."""
    kernel: Callable  # the JITFunction
    signature: dict
    constexprs: dict   # {(arg index,): value}
    attrs: dict
    options: dict
    case: str

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def config(self) -> str:
        """BLOCK_*/G/HEAD_DIM-like constexprs by name, then num_warps and num_stages."""
        names = list(self.signature)
        parts = [f"{names[path[0]]}={value}" for path, value in self.constexprs.items()
                 if len(path) == 1 and isinstance(value, (int, bool, str))
                 and names[path[0]] != names[path[0]].lower()]
        parts += [f"warps={self.options['num_warps']}", f"stages={self.options['num_stages']}"]
        return " ".join(parts)


@dataclasses.dataclass
class Result:
    """Resources of one compiled kernel on one target (error set when it did not compile)."""
    kernel: str
    shapes: str  # the shape set (a key of SHAPES)
    case: str
    dtype: str
    target: str
    config: str
    num_warps: int
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    shared: int | None = None
    spill_stores: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local or self.spill_stores)

    def occupancy(self) -> tuple[int, str]:
        """Estimated resident blocks per SM and the resource that limits them."""
        target = TARGETS[self.target]
        limits = {"blocks": target.max_blocks_per_sm,
                  "warps": target.max_warps_per_sm // self.num_warps}
        if self.regs:
            regs_per_warp = math.ceil(self.regs * 32 / 256) * 256  # allocated per warp in 256s
            limits["regs"] = (target.regs_per_sm // regs_per_warp) // self.num_warps
        if self.shared:
            limits["smem"] = target.smem_per_sm // (self.shared + 1024)
        limiter = min(limits, key=limits.get)
        return limits[limiter], limiter


class _NoLaunchDriver(DriverBase):
    """A Triton driver that reports a GPU target and owns no device: kernels are never launched
    (the cache hook stops every run before it would compile or launch)."""

    def __init__(self, target: Target):
        self.target = target

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return GPUTarget("cuda", self.target.arch, 32)

    def get_current_device(self):
        return f"compile-only:{self.target.name}"  # keys Triton's per-device caches

    def get_current_stream(self, device):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        raise RuntimeError("compile-only driver: no device")

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: no device")


@contextlib.contextmanager
def compile_only(target: Target, case: str = ""):
    """Within the block, kernel launches are recorded (list of Launch, yielded), not run.

    Call the ops with backend="triton" on CPU tensors; they pick the configs they would pick
    on `target` (SM count included)."""
    if _backend.triton_interpreted():
        raise RuntimeError("compile-only mode needs real JIT kernels: unset TRITON_INTERPRET "
                           "before emloc_kernels is imported")
    from triton.runtime import driver
    launches: list[Launch] = []

    def record(*, key, repr, fn, compile, is_manual_warmup, already_compiled=False):
        options = json.loads(compile["specialization_data"])["options"]
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        launches.append(Launch(fn.jit_function, compile["signature"], compile["constants"],
                               compile["configs"][0], options, case))
        return True  # handled: Triton neither compiles nor launches

    previous_driver = driver._active  # may be None (no GPU): restore exactly that
    previous_hook = triton.knobs.runtime.jit_cache_hook
    driver.set_active(_NoLaunchDriver(target))
    triton.knobs.runtime.jit_cache_hook = record
    _backend.set_compile_only(target.sms, target.arch)
    try:
        yield launches
    finally:
        _backend.set_compile_only()
        triton.knobs.runtime.jit_cache_hook = previous_hook
        driver._active = previous_driver


_CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_launch(launch: Launch, target: Target, dtype: str, shapes: str) -> Result:
    """Compile one recorded launch for target and read its resources from the cubin."""
    from triton.compiler import ASTSource
    result = Result(launch.name, shapes, launch.case, dtype, target.name, launch.config(),
                    launch.options["num_warps"])
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs),
            target=GPUTarget("cuda", target.arch, 32), options=launch.options)
    except Exception as exc:  # a compile error is a result, reported per kernel
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        result.error = f"{type(exc).__name__}: {str(cause).strip().splitlines()[-1][:300]}"
        result.seconds = time.perf_counter() - start
        return result
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{launch.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        dump = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    match = _RESOURCE.search(dump)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump output for {launch.name}:\n{dump}")
    result.regs, result.stack, static_shared, result.local = map(int, match.groups())
    result.shared = static_shared + compiled.metadata.shared
    result.spill_stores = _spill_stores(compiled.asm["ptx"], target) if result.stack else 0
    result.seconds = time.perf_counter() - start
    return result


def _spill_stores(ptx: str, target: Target) -> int:
    """Bytes of register spill stores ptxas reports for the PTX (a stack frame may also hold
    local arrays; only spill stores count as spills)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        log = subprocess.run([get_ptxas(target.arch).path, "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(target.arch)}", str(source),
                              "-o", str(source.with_suffix(".o"))],
                             capture_output=True, text=True, check=True).stderr
    match = re.search(r"(\d+) bytes spill stores", log)
    if match is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(match.group(1))


# -- the calls: every public op at the shapes it meets ----------------------------------------
def _empty(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)


def _padding(B, L):
    """[B, L] bool, row b valid up to L - b (right padding)."""
    return torch.arange(L)[None, :] < (L - torch.arange(B))[:, None]


def _probe(dtype, B, Hkv, G, L, M, Lc, D, scored):
    from .probe_scores import probe_scores
    valid = _padding(B, L)
    observer = valid & (torch.arange(L)[None, :] >= L // 2) if scored else None
    e = lambda *s: _empty(*s, dtype=dtype)  # noqa: E731
    probe_scores(e(B, Hkv * G, L, D), e(Hkv, M, D), e(Hkv, M, D), e(Hkv, Lc, D), e(Hkv, Lc, D),
                 e(B, Hkv, L, D), e(B, Hkv, L, D), valid, observer, backend="triton")


def _prefix(dtype, B, Hkv, G, Lq, Lk, M, D, padded):
    from .prefix_attention import prefix_attention
    e = lambda *s: _empty(*s, dtype=dtype)  # noqa: E731
    prefix_attention(e(B, Hkv * G, Lq, D), e(Hkv, M, D), e(Hkv, M, D), e(B, Hkv, Lk, D),
                     e(B, Hkv, Lk, D), _padding(B, Lk) if padded else None, backend="triton")


def _lm_head(dtype, N, replicas, V, H):
    from .lm_head_js import TeacherJS
    weight = _empty(V, H, dtype=dtype)  # never touched: no memory is committed
    TeacherJS(_empty(N, H, dtype=dtype), weight, backend="triton")(
        _empty(replicas * N, H, dtype=dtype), replicas=replicas)


def _rank(dtype, Hkv, Lc, ratios):
    from .ranking import rank_tokens
    rank_tokens(_empty(Hkv, Lc, dtype=torch.float32), torch.zeros(Lc, dtype=torch.bool),
                [max(1, int(r * Lc)) for r in ratios], backend="triton")


def _compaction(dtype, Hkv, Lc, D, k, capacity):
    from .compaction import gather_append
    e = lambda *s: _empty(*s, dtype=dtype)  # noqa: E731
    index = torch.arange(k).expand(Hkv, k).contiguous()
    gather_append(e(Hkv, capacity, D), e(Hkv, capacity, D), capacity - k, e(Hkv, Lc, D),
                  e(Hkv, Lc, D), index, backend="triton")


# Qwen2-VL-7B's language model: 28 query heads, 4 KV heads, head_dim 128, vocabulary 152,064,
# hidden 3,584; chunks of ~2k tokens, a memory of 4k tokens, probes of 4 demos x 90 tokens.
SHAPES = {
    "qwen2vl7b": [
        ("probe_scores scored B4 L90 M4096 Lc2048", lambda dt: _probe(dt, 4, 4, 7, 90, 4096, 2048, 128, True)),
        ("probe_scores unscored B12 L90 M4096 Lc1024", lambda dt: _probe(dt, 12, 4, 7, 90, 4096, 1024, 128, False)),
        ("prefix prefill chunk B1 L2048 M4096", lambda dt: _prefix(dt, 1, 4, 7, 2048, 2048, 4096, 128, False)),
        ("prefix prefill queries B8 L40 M4096 padded", lambda dt: _prefix(dt, 8, 4, 7, 40, 40, 4096, 128, True)),
        ("prefix decode B1 Lk41 M4096", lambda dt: _prefix(dt, 1, 4, 7, 1, 41, 4096, 128, False)),
        ("prefix decode B8 Lk41 M4096 padded", lambda dt: _prefix(dt, 8, 4, 7, 1, 41, 4096, 128, True)),
        ("lm_head_js N12 x3 V152064 H3584", lambda dt: _lm_head(dt, 12, 3, 152064, 3584)),
        ("rank_tokens Lc2048 ks 10/20/50%", lambda dt: _rank(dt, 4, 2048, (0.1, 0.2, 0.5))),
        ("gather_append Lc2048 k1024", lambda dt: _compaction(dt, 4, 2048, 128, 1024, 8192)),
    ],
    # the bundled SmolLM2-135M: 9 query heads, 3 KV heads (G = 3), head_dim 64, vocabulary 49,152
    "smollm2": [
        ("probe_scores scored B4 L40 M1024 Lc400", lambda dt: _probe(dt, 4, 3, 3, 40, 1024, 400, 64, True)),
        ("prefix prefill chunk B1 L400 M1024", lambda dt: _prefix(dt, 1, 3, 3, 400, 400, 1024, 64, False)),
        ("prefix decode B8 Lk41 M1024 padded", lambda dt: _prefix(dt, 8, 3, 3, 1, 41, 1024, 64, True)),
        ("lm_head_js N12 x3 V49152 H576", lambda dt: _lm_head(dt, 12, 3, 49152, 576)),
    ],
    # the kernel tests' kinds of shapes: head dims that pad, GQA group 3, one row, few keys
    "test": [
        ("probe_scores B2 G3 L37 M45 Lc70 D40", lambda dt: _probe(dt, 2, 2, 3, 37, 45, 70, 40, True)),
        ("probe_scores B2 G2 L9 M17 Lc35 D200", lambda dt: _probe(dt, 2, 2, 2, 9, 17, 35, 200, True)),
        ("prefix prefill B2 G3 L19 M37 D48", lambda dt: _prefix(dt, 2, 2, 3, 19, 19, 37, 48, True)),
        ("prefix prefill B1 G2 L6 Lk40 M70 D200", lambda dt: _prefix(dt, 1, 1, 2, 6, 40, 70, 200, False)),
        ("prefix decode B3 G3 Lk17 M45 D64", lambda dt: _prefix(dt, 3, 2, 3, 1, 17, 45, 64, True)),
        ("lm_head_js N5 x1 V300 H48", lambda dt: _lm_head(dt, 5, 1, 300, 48)),
        ("rank_tokens Lc257", lambda dt: _rank(dt, 2, 257, (0.1, 0.2, 0.5))),
        ("gather_append Lc19 D300", lambda dt: _compaction(dt, 2, 19, 300, 19, 40)),
    ],
}


def record_launches(shapes: str, dtype: str, target: Target) -> list[Launch]:
    """Every distinct kernel specialisation the ops ask for at one shape set and dtype."""
    launches, seen = [], set()
    for case, call in SHAPES[shapes]:
        with compile_only(target, case) as recorded:
            call(DTYPES[dtype])
        for launch in recorded:
            key = (launch.name, repr(launch.signature), repr(launch.constexprs),
                   repr(launch.attrs), repr(sorted(launch.options.items())))
            if key not in seen:
                seen.add(key)
                launches.append(launch)
    return launches


def check(shapes=("qwen2vl7b",), dtypes=("bfloat16", "float16"), targets=("sm_80", "sm_90"),
          progress=None) -> list[Result]:
    """Compile every kernel of the shape sets, dtypes and targets; one Result per compile."""
    results = []
    for target_name in targets:
        target = TARGETS[target_name]
        for shape_set in shapes:
            for dtype in dtypes:
                for launch in record_launches(shape_set, dtype, target):
                    results.append(compile_launch(launch, target, dtype, shape_set))
                    if progress:
                        progress(results[-1])
    return results


PRODUCTION = ("qwen2vl7b", ("bfloat16", "float16"))  # the shape set and dtypes that must not spill

# (kernel, target) -> why a production config may spill there. Keep it short and measured.
SPILL_EXCEPTIONS = {
    ("_js_partial_kernel", "sm_100"): "20 B of spill stores; Blackwell is compiled for "
                                      "information only (no B200 measured, tiles not tuned)",
}


def is_production(result: Result) -> bool:
    return result.shapes == PRODUCTION[0] and result.dtype in PRODUCTION[1]


def problems(result: Result) -> list[str]:
    """What is wrong with one compile: an error, shared memory over the per-block limit, or
    spills at a production config that SPILL_EXCEPTIONS does not list."""
    if result.error:
        return [f"does not compile: {result.error}"]
    found = []
    if result.spills and is_production(result) \
            and (result.kernel, result.target) not in SPILL_EXCEPTIONS:
        found.append(f"spills ({result.spill_stores} B spill stores, LOCAL {result.local} B, "
                     f"STACK {result.stack} B, {result.regs} regs)")
    limit = TARGETS[result.target].smem_per_block
    if result.shared > limit:
        found.append(f"shared memory {result.shared} B > {limit} B per block")
    return found


def status(result: Result) -> str:
    """Short verdict for tables: the problems, else whether (and why) it spills, else ok."""
    if problems(result):
        return "; ".join(problems(result))
    if result.spills:
        reason = SPILL_EXCEPTIONS.get((result.kernel, result.target)) \
            if is_production(result) else "not a production config"
        return f"spills {result.spill_stores} B ({reason})"
    return "ok"


def markdown_table(results: list[Result]) -> str:
    """One row per compile: registers, stack/local bytes, shared KiB, estimated occupancy."""
    lines = ["| target | dtype | kernel | case | config | regs | spill / stack / local B "
             "| shared KiB | blocks/SM (limit) | warps/SM | status |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.error:
            lines.append(f"| {r.target} | {r.dtype} | {r.kernel} | {r.case} | {r.config} | | | "
                         f"| | | **fails**: {r.error.replace('|', '/')} |")
            continue
        blocks, limiter = r.occupancy()
        lines.append(f"| {r.target} | {r.dtype} | {r.kernel} | {r.case} | {r.config} | {r.regs} "
                     f"| {r.spill_stores} / {r.stack} / {r.local} | {r.shared / 1024:.1f} | {blocks} ({limiter}) "
                     f"| {100 * blocks * r.num_warps / TARGETS[r.target].max_warps_per_sm:.0f}% "
                     f"| {status(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2vl7b,test", help=f"of {list(SHAPES)}")
    parser.add_argument("--dtypes", default="bfloat16,float16", help=f"of {list(DTYPES)}")
    parser.add_argument("--targets", default="sm_80,sm_90", help=f"of {list(TARGETS)}")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    if _backend.triton_interpreted():
        parser.error("unset TRITON_INTERPRET: compile-only mode compiles the real kernels")

    def names(text, known):
        chosen = [n for n in text.split(",") if n]
        unknown = [n for n in chosen if n not in known]
        if unknown:
            parser.error(f"unknown {unknown}; known: {list(known)}")
        return chosen

    shapes, dtypes = names(args.shapes, SHAPES), names(args.dtypes, DTYPES)
    targets = names(args.targets, TARGETS)
    start = time.perf_counter()

    def progress(r):
        if not args.markdown:
            print(f"{r.target:6} {r.dtype:8} {r.kernel:24} regs {r.regs} spill {r.spill_stores} "
                  f"stack {r.stack} local {r.local} shared {r.shared} ({r.seconds:.1f} s) {status(r)}  [{r.case}; "
                  f"{r.config}]", flush=True)

    results = check(shapes, dtypes, targets, progress)
    if args.markdown:
        print(markdown_table(results))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    bad = [(r, p) for r in results for p in problems(r)]
    print(f"{len(results)} compiles in {time.perf_counter() - start:.0f} s; "
          f"{len(bad)} problems", file=sys.stderr)
    for r, p in bad:
        print(f"  {r.target} {r.dtype} {r.kernel} [{r.case}]: {p}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
