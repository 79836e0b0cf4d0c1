"""Every Triton kernel compiles for sm_80 (A100) and sm_90 (H100/H200) at the production
configs, without spills and within shared memory, on a CPU (emloc_kernels.aot).

CI compiles the Qwen2-VL-7B shapes in bf16 (fp16 picks the same tiles); the full table of
shapes, dtypes and targets is `python -m emloc_kernels.aot --markdown` (bench/RESULTS.md).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emloc_kernels import aot

SRC = Path(__file__).resolve().parents[1] / "src"
TARGETS = ("sm_80", "sm_90")


def _entry_kernels():
    """Names of the package's kernels (JIT functions named *_kernel), read from the source."""
    names = set()
    for path in (SRC / "emloc_kernels").glob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.strip() == "@triton.jit" and lines[i + 1].startswith("def "):
                name = lines[i + 1][4:].split("(")[0]
                if name.endswith("_kernel"):
                    names.add(name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Results of the compile-only check, one process per target, run side by side."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["PYTHONWARNINGS"] = "ignore"
    out = tmp_path_factory.mktemp("aot")
    runs = {target: subprocess.Popen(
        [sys.executable, "-m", "emloc_kernels.aot", "--shapes", "qwen2vl7b", "--dtypes",
         "bfloat16", "--targets", target, "--json", str(out / f"{target}.json")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for target in TARGETS}
    results, stderr = [], {}
    for target, run in runs.items():
        stderr[target] = run.communicate(timeout=300)[1]
        path = out / f"{target}.json"
        assert path.exists(), f"compile check for {target} crashed:\n{stderr[target][-3000:]}"
        results += [aot.Result(**r) for r in json.loads(path.read_text())]
    return results, stderr


def test_every_kernel_compiles_for_every_target(compiled):
    results, stderr = compiled
    errors = [f"{r.target} {r.kernel} [{r.case}]: {r.error}" for r in results if r.error]
    assert not errors, "\n".join(errors)
    expected = _entry_kernels()
    assert len(expected) >= 10  # the source scan found the kernels
    for target in TARGETS:
        assert {r.kernel for r in results if r.target == target} == expected, stderr[target]


def test_no_spills_and_shared_memory_within_limits(compiled):
    results, _ = compiled
    found = [f"{r.target} {r.kernel} [{r.case}; {r.config}]: {p}" for r in results
             for p in aot.problems(r)]
    assert not found, "\n".join(found)
    for r in results:  # the resources were read, not defaulted
        assert r.regs > 0 and r.spill_stores is not None and r.shared is not None


def test_problems_flag_spills_and_shared_overflow():
    """The verdict the CI test relies on, on made-up resource numbers."""
    ok = aot.Result("_prefill_kernel", "qwen2vl7b", "case", "bfloat16", "sm_80", "", 8,
                    regs=186, stack=0, local=0, shared=65536, spill_stores=0)
    assert aot.problems(ok) == []
    spilled = aot.Result(**{**ok.__dict__, "stack": 72, "spill_stores": 68, "regs": 255})
    assert "spills" in aot.problems(spilled)[0]
    too_big = aot.Result(**{**ok.__dict__, "shared": 166912 + 1})
    assert "shared memory" in aot.problems(too_big)[0]
    assert aot.Result(**{**ok.__dict__, "error": "CompilationError: x"}).spills is False
    assert aot.problems(aot.Result(**{**ok.__dict__, "error": "CompilationError: x"}))
