"""One command for a lent GPU (H100/H200): everything it measures goes to one folder.

    python bench/gpu_check.py [--out DIR] [--dry-run] [--steps a,b,...]     (or `make gpu-check`)

Needs only the GPU image (Python 3.12, torch, triton 3.6, transformers 5.17, pytest, safetensors,
tqdm, torchvision) and this checkout: `src/` is put on the path, nothing is installed, no network.
Each step runs in its own process with a time limit (all of them: about 6 minutes on an H200) and
writes its files to DIR (default gpu_check/<date>); DIR/summary.md lists the steps, their status,
time and headline numbers:

  environment     env.json: GPU, driver, SMs, versions
  kernel_tests    tests/kernels with every Triton call on the GPU, compiled (no interpreter;
                  bf16 cases included), one process per file: kernel_tests.txt, kernel_tests_*.xml
  bench_kernels   the five kernel benchmarks (`emloc bench kernels --device cuda`), rows in
                  bench_results.csv, and bench_targets.md: each GPU target of bench/RESULTS.md as
                  a measured ratio (probe scores vs plain SDPA time; decode attention, compaction
                  and fused JS vs the measured copy bandwidth)
  compress_e2e    a random-weight model shaped like Qwen2-VL-7B's language model (28 layers,
                  28/4 heads, head_dim 128, vocabulary 152,064, bf16) compresses ~2k-token chunks
                  with backend "triton" and "torch": same decisions?, time ratio, peak memory
                  (compress_e2e.json), and the registers / spills / shared memory of every kernel
                  as compiled on this GPU (kernel_resources.md)
  vl_processor    the README's tiny random Qwen2-VL with the real processor (torchvision) on the GPU

--dry-run runs the same steps on CPU under the Triton interpreter at tiny shapes (CI runs it):
it checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("environment", "kernel_tests", "bench_kernels", "compress_e2e", "vl_processor")
TIME_LIMITS = {"environment": 30, "kernel_tests": 120, "bench_kernels": 120, "compress_e2e": 150,
               "vl_processor": 45}  # seconds: 465 s at most in all, under the 8-minute budget
QWEN2VL7B = dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944,
                 num_attention_heads=28, num_key_value_heads=4, head_dim=128, vocab_size=152064)
TINY = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000)


def _setup_paths():
    for path in (ROOT / "src", ROOT / "tests", ROOT / "bench"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _env(dry_run: bool) -> dict:
    """Environment of a child process: src/ importable; the interpreter only in a dry run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    if dry_run:
        env.update(TRITON_INTERPRET="1", EMLOC_TEST_DEVICE="cpu", CUDA_VISIBLE_DEVICES="")
    return env


# -- steps (each runs in a child process: python bench/gpu_check.py --step NAME) -------------
def step_environment(out: Path, dry_run: bool) -> dict:
    import torch
    import transformers
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "host": platform.node(), "dry_run": dry_run}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1))
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = "unknown (no nvidia-smi)"
    (out / "env.json").write_text(json.dumps(info, indent=1))
    return {"gpu": info.get("gpu", "none (dry run)"), "triton": info["triton"]}


def step_kernel_tests(out: Path, dry_run: bool) -> dict:
    # one pytest per test file, side by side (most of the time is compiling kernels on the
    # host's CPUs); a dry run takes one small file: the interpreter needs ~70 s for all of them
    files = sorted((ROOT / "tests" / "kernels").glob("test_*.py"))
    if dry_run:
        files = [f for f in files if f.name == "test_compaction.py"]
    runs = {f.stem: subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_gpu_test_plugin",
         f"--junitxml={out / f'kernel_tests_{f.stem}.xml'}", str(f.relative_to(ROOT))],
        cwd=ROOT, env=_env(dry_run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for f in files}
    logs, lasts, failed = [], {}, []
    for name, run in runs.items():
        text = run.communicate()[0]
        logs.append(f"== {name}\n{text}")
        lasts[name] = (text.strip().splitlines() or ["(no output)"])[-1]
        if run.returncode != 0:
            failed.append(name)
    (out / "kernel_tests.txt").write_text("\n".join(logs))
    if failed:
        raise RuntimeError(f"kernel tests failed in {failed}: "
                           f"{[lasts[n] for n in failed]} (see kernel_tests.txt)")
    return lasts


def step_bench_kernels(out: Path, dry_run: bool) -> dict:
    csv_path = out / "bench_results.csv"
    env = dict(_env(dry_run), EMLOC_BENCH_CSV=str(csv_path))
    names = ["bench_compaction"] if dry_run else [
        "bench_compaction", "bench_lm_head_js", "bench_prefix_attention", "bench_probe_scores",
        "bench_ranking"]
    args = ["--device", "cpu", "--quick"] if dry_run else ["--device", "cuda"]
    log = []
    for name in names:
        run = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        log.append(f"$ {name} {' '.join(args)}\n{run.stdout}{run.stderr}")
        if run.returncode != 0:
            (out / "bench_kernels.txt").write_text("\n".join(log))
            raise RuntimeError(f"{name} failed (see bench_kernels.txt)")
    (out / "bench_kernels.txt").write_text("\n".join(log))
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    targets = bench_targets(rows)
    (out / "bench_targets.md").write_text(targets_markdown(targets))
    met = sum(t["met"] for t in targets)
    return {"targets": f"{met} of {len(targets)} met" if targets else "no triton rows (CPU)"}


def bench_targets(rows: list[dict]) -> list[dict]:
    """The GPU targets of bench/RESULTS.md as ratios, from one run's rows of bench_results.csv."""
    def value(row):
        return float(row["value"])

    copy = {r["bench"]: value(r) for r in rows if r["impl"] == "copy_"}
    medians = {(r["bench"], r["case"], r["impl"]): float(r["median_ms"])
               for r in rows if r["median_ms"]}
    found = []
    for r in rows:
        if r["impl"] != "triton" or not r["median_ms"]:
            continue
        bench, case = r["bench"], r["case"]
        if bench == "probe_scores" and (bench, case, "sdpa_plain") in medians:
            ratio, goal, what = (medians[(bench, case, "triton")]
                                 / medians[(bench, case, "sdpa_plain")], 1.3,
                                 "time / sdpa_plain time")
            found.append({"bench": bench, "case": case, "measure": what, "ratio": ratio,
                          "goal": f"<= {goal}", "met": ratio <= goal})
            continue
        share_goal = {"prefix_attn": 0.8, "compaction": 0.8, "lm_head_js": 0.7}.get(bench)
        if share_goal is None or bench not in copy:
            continue
        if bench == "prefix_attn" and not case.startswith("decode"):
            continue
        if bench == "lm_head_js" and not case.startswith("js"):
            continue
        ratio = value(r) / copy[bench]
        found.append({"bench": bench, "case": case, "measure": f"{r['metric']} / copy GB/s",
                      "ratio": ratio, "goal": f">= {share_goal}", "met": ratio >= share_goal})
    return found


def targets_markdown(targets: list[dict]) -> str:
    if not targets:
        return "No Triton rows: the benchmarks ran on CPU (PyTorch paths only).\n"
    lines = ["| bench | case | measure | ratio | goal | met |", "|---|---|---|---:|---|---|"]
    lines += [f"| {t['bench']} | {t['case']} | {t['measure']} | {t['ratio']:.2f} | {t['goal']} "
              f"| {'yes' if t['met'] else 'NO'} |" for t in targets]
    return "\n".join(lines) + "\n"


def _demos(tokenizer, n_demos: int, tokens_per_demo: int, seed: int = 0) -> list[dict]:
    """Demos of about tokens_per_demo tokens: random words of the tiny tokenizer's corpus."""
    import random
    from tiny_models import CORPUS
    words = " ".join(CORPUS).split()
    rng = random.Random(seed)
    per_word = len(tokenizer(" ".join(words))["input_ids"]) / len(words)
    n_words = max(2, int(tokens_per_demo / per_word))
    return [{"input": " ".join(rng.choice(words) for _ in range(n_words)),
             "output": " ".join(rng.choice(words) for _ in range(3))} for _ in range(n_demos)]


def step_compress_e2e(out: Path, dry_run: bool, std: float | None = None) -> dict:
    import torch
    import emloc
    from tiny_models import chat_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM
    device = "cpu" if dry_run else "cuda"
    dtype = torch.float32 if dry_run else torch.bfloat16
    shape = TINY if dry_run else QWEN2VL7B
    # weights large enough that the search makes every kind of decision (0.02 accepts all)
    std = std or (0.2 if dry_run else 2.3 / shape["hidden_size"] ** 0.5)
    config = Qwen2Config(**shape, initializer_range=std, max_position_embeddings=32768,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: no 30 GB fp32 copy first
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    build_s = time.perf_counter() - t0
    tokenizer = chat_tokenizer()
    # on the GPU 2 chunks of 4 demos of ~500 tokens (~2k-token chunks); a dry run: 1 tiny chunk
    per_chunk, n_chunks, demo_tokens = (2, 1, 8) if dry_run else (4, 2, 500)
    demos = _demos(tokenizer, per_chunk * n_chunks, demo_tokens)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def compress(backend, which):
        comp = emloc.EMLoC(model, tokenizer, demos_per_chunk=per_chunk, backend=backend,
                           progress=False)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device == "cuda" else 0
        sync()
        start = time.perf_counter()
        memory = comp.compress(which, system="Continue the words.")
        sync()
        seconds = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else None
        decisions = [[layer["ratio"] for layer in chunk["layers"]] for chunk in memory.stats]
        return {"seconds": seconds, "peak_extra_bytes": peak, "decisions": decisions,
                "layer_lengths": memory.layer_lengths,
                "chunk_tokens": [chunk["tokens"] for chunk in memory.stats]}

    if not dry_run:
        for backend in ("triton", "torch"):  # warm-up: Triton compiles, allocator settles
            compress(backend, demos[:per_chunk])
    runs = {backend: compress(backend, demos) for backend in ("triton", "torch")}
    same = runs["triton"]["decisions"] == runs["torch"]["decisions"]
    kinds = sorted({r for chunk in runs["torch"]["decisions"] for r in chunk})
    flips = sum(a != b for ct, cp in zip(runs["triton"]["decisions"], runs["torch"]["decisions"])
                for a, b in zip(ct, cp))
    report = {"model": shape, "dtype": str(dtype), "init_std": std, "build_seconds": build_s,
              "demos": len(demos), "same_decisions": same, "decision_flips": flips,
              "decision_kinds": kinds,
              "time_ratio_torch_over_triton": runs["torch"]["seconds"] / runs["triton"]["seconds"],
              "runs": runs}
    (out / "compress_e2e.json").write_text(json.dumps(report, indent=1))
    (out / "kernel_resources.md").write_text(kernel_resources_markdown())
    peak = runs["triton"]["peak_extra_bytes"]
    return {"same decisions": same, "flips": flips, "kinds": kinds,
            "torch/triton time": round(report["time_ratio_torch_over_triton"], 2),
            "chunk tokens": runs["torch"]["chunk_tokens"],
            "peak GiB triton/torch": None if peak is None else
            [round(runs[b]["peak_extra_bytes"] / 2**30, 2) for b in ("triton", "torch")]}


def kernel_resources_markdown() -> str:
    """Registers, spills, shared memory of every kernel this process compiled (from the JIT
    caches: the numbers the driver reported when it loaded each cubin)."""
    import importlib
    import triton
    lines = ["| kernel | num_warps | num_stages | regs | spills | shared B |",
             "|---|---:|---:|---:|---:|---:|"]
    for module_name in ("probe_scores", "prefix_attention", "ranking", "compaction", "lm_head_js"):
        module = importlib.import_module(f"emloc_kernels.{module_name}")
        for name, fn in sorted(vars(module).items()):
            if not isinstance(fn, triton.runtime.JITFunction) or not name.endswith("_kernel"):
                continue
            for caches in getattr(fn, "device_caches", {}).values():
                for kernel in caches[0].values():
                    if not hasattr(kernel, "n_regs"):
                        continue
                    meta = kernel.metadata
                    lines.append(f"| {name} | {meta.num_warps} | {meta.num_stages} | "
                                 f"{kernel.n_regs} | {kernel.n_spills} | {meta.shared} |")
    if len(lines) == 2:
        lines.append("| (none: the interpreter compiles nothing) | | | | | |")
    return "\n".join(lines) + "\n"


def step_vl_processor(out: Path, dry_run: bool) -> dict:
    import emloc
    from tiny_vl_models import _has_torchvision, tiny_images, tiny_vl_model, tiny_vl_processor
    device = "cpu" if dry_run else "cuda"
    model = tiny_vl_model("qwen2_vl").to(device)
    processor = tiny_vl_processor("qwen2_vl")
    images = tiny_images(((56, 56), (84, 56), (56, 84), (112, 56), (56, 56)))
    demos = [{"input": [{"type": "image", "image": image}, {"type": "text", "text": "Which shape?"}],
              "output": shape} for image, shape in zip(images, ["round", "square", "round", "square"])]
    backends = {}
    for backend in ("torch",) if dry_run else ("triton", "torch"):  # interpreter: too slow here
        comp = emloc.EMLoC(model, processor, demos_per_chunk=2, backend=backend, progress=False)
        memory = comp.compress(demos, system="Name the shape.")
        answer = comp.generate(memory, [{"type": "image", "image": images[4]},
                                        {"type": "text", "text": "Which shape?"}], max_new_tokens=4)
        backends[backend] = {"layer_lengths": memory.layer_lengths, "answer": answer,
                             "kept_image_layer0": sum(c["layers"][0]["kept_image"]
                                                      for c in memory.stats)}
    same = (backends["triton"]["layer_lengths"] == backends["torch"]["layer_lengths"]
            if "triton" in backends else None)
    report = {"torchvision": _has_torchvision(), "device": device, "same_layer_lengths": same,
              "backends": backends}
    (out / "vl_processor.json").write_text(json.dumps(report, indent=1))
    return {"torchvision": report["torchvision"], "same layer lengths": same,
            "answers": [backends[b]["answer"] for b in backends]}


# -- the orchestration --------------------------------------------------------------------
def run_step(name: str, out: Path, dry_run: bool) -> dict:
    """Run one step in a child process with its time limit; its status, seconds, headline."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out)]
    if dry_run:
        cmd.append("--dry-run")
    start = time.perf_counter()
    log = (out / f"{name}.log").open("w")
    # its own process group: on timeout the step's children (pytest runs) are stopped too
    run = subprocess.Popen(cmd, cwd=ROOT, env=_env(dry_run), stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        run.wait(timeout=TIME_LIMITS[name])
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        return {"step": name, "status": f"timeout after {TIME_LIMITS[name]} s",
                "seconds": time.perf_counter() - start}
    finally:
        log.close()
    seconds = time.perf_counter() - start
    result_file = out / f"{name}.result.json"
    if run.returncode != 0 or not result_file.exists():
        tail = ((out / f"{name}.log").read_text().strip().splitlines() or ["(no output)"])[-1]
        return {"step": name, "status": f"failed: {tail}", "seconds": seconds}
    return {"step": name, "status": "ok", "seconds": seconds,
            "headline": json.loads(result_file.read_text())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default gpu_check/<date>, or a temporary-looking "
                             "gpu_check/dry-run-<date> for --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: checks the script in < 1 min")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {STEPS}")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out or ROOT / "gpu_check" / (f"dry-run-{stamp}" if args.dry_run else stamp)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; known: {list(STEPS)}")

    if args.step:  # child: run one step, write its headline
        _setup_paths()
        headline = globals()[f"step_{args.step}"](out, args.dry_run)
        (out / f"{args.step}.result.json").write_text(json.dumps(headline, default=str))
        return 0

    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU machine, or use --dry-run on CPU")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    for name in steps:
        results.append(run_step(name, out, args.dry_run))
        r = results[-1]
        print(f"{r['step']:14} {r['status']:10} {r['seconds']:6.1f} s  {r.get('headline', '')}",
              flush=True)
    total = time.perf_counter() - start
    lines = [f"# GPU check {'(dry run, CPU) ' if args.dry_run else ''}{stamp}", "",
             f"`python bench/gpu_check.py{' --dry-run' if args.dry_run else ''}`: "
             f"{total:.0f} s in all.", "", "| step | status | seconds | headline |",
             "|---|---|---:|---|"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | "
              f"{json.dumps(r.get('headline', ''), default=str)} |" for r in results]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"total_seconds": total, "steps": results},
                                                 indent=1, default=str))
    print(f"{total:.0f} s; results in {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
