"""Fidelity on a real model: how much of the full context's behaviour each compression keeps.

For each many-shot task of bench/data/tasks.json (real data, see bench/data/SOURCES.md), every
held-out query is answered from the full context and from each compressed memory, and the
distribution of the first answer token is compared with the full context's:

  zero-shot    no demonstrations at all (how much the demonstrations change the answers)
  full         method="full", the uncompressed context (the reference)
  fixed kept fraction, at each of --ratios (--methods picks among them):
    budget                    method="budget": one budget shared over 4-demo chunks (emloc's own)
    snapkv, tova, streaming   one prefill of the whole context (baselines, see emloc.compression.baseline_scores)
    snapkv per chunk          SnapKV on each 4-demo chunk alone (kvpress's ChunkPress, with true chunked prefill)
    tova-stream               TOVA with a fixed budget as the 4-demo chunks arrive (bounded memory)
    uniform                   emloc's importance scores, chunked as the faithful method
    fewer demos               no compression: the last demos whose context fits in the same memory
  searches, at each δ of --deltas, for each preset of --presets (default: every preset;
    "faithful" is labelled emloc)

Metrics: mean JS divergence (nats) and top-1 agreement of the first answer token against the full
context, the kept fraction (mean kept tokens per layer / context tokens), accuracy (the label
whose first token is most likely), compression seconds.

The chunk sweep (--chunk-task) compresses one task with uniform at --chunk-ratio, the context cut
into 1, 2, 4, 8, 16 chunks (--chunks), and each preset's search at its default δ, each in a fresh
process that also records the peak memory while compressing (RSS above the loaded model). The
scaling sweep (--scale-demos) compresses the same task's demos, repeated to each count, with
budget and one-prefill SnapKV at --chunk-ratio, also in fresh processes: peak memory and seconds
as the context grows.

    emloc bench fidelity                 # 3 tasks + chunk sweep: about 1.5 h on 2 shared cores
    emloc bench fidelity --quick         # a smoke run (~3 min); writes nothing unless --out-dir
Outputs: bench/FIDELITY.md, bench/fidelity.csv, bench/fidelity_kept.png, bench/fidelity_chunks.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # for _rss when loaded from elsewhere (tests)
    sys.path.insert(0, str(BENCH_DIR))
DATA_DIR = BENCH_DIR / "data"
DEFAULT_RATIOS = (0.5, 0.25, 0.1)
DEFAULT_DELTAS = (0.005, 0.02)
DEFAULT_QUERIES = 50
DEFAULT_CHUNKS = (1, 2, 4, 8, 16)
DEFAULT_SCALE_DEMOS = (27, 54, 108, 216)
FEWER = "fewer demos"
# label -> EMLoC settings at kept fraction r, of the fixed-ratio runs, in report order
FIXED_RUNS = {
    "budget": lambda r: {"method": "budget", "keep_ratio": r},
    "snapkv": lambda r: {"method": "snapkv", "keep_ratio": r},
    "snapkv per chunk": lambda r: {"method": "snapkv", "keep_ratio": r, "demos_per_chunk": 4},
    "tova": lambda r: {"method": "tova", "keep_ratio": r},
    "tova-stream": lambda r: {"method": "tova-stream", "keep_ratio": r},
    "streaming": lambda r: {"method": "streaming", "keep_ratio": r},
    "uniform": lambda r: {"method": "uniform", "keep_ratio": r},
}
FIXED_METHODS = (*FIXED_RUNS, FEWER)
SCALE_METHODS = ("budget", "snapkv")
COLUMNS = ["task", "method", "setting", "kept", "compression", "js", "top1", "accuracy", "seconds",
           "chunks", "peak_mb", "memory_mb", "sweep", "demos"]


@dataclass
class Task:
    """A many-shot task: demos and held-out queries are lists of {'input', 'output'}."""

    name: str
    system: str
    labels: list
    demos: list
    queries: list


def load_tasks(names=None, data_dir=DATA_DIR) -> list:
    """The tasks of data_dir/tasks.json (all, or those named), in the order given."""
    from emloc import EMLoCError

    index = json.loads((Path(data_dir) / "tasks.json").read_text(encoding="utf-8"))
    names = list(index) if names is None else list(names)
    tasks = []
    for name in names:
        if name not in index:
            raise EMLoCError(f"no task {name!r}; the tasks are {', '.join(index)}")
        spec = index[name]
        rows = [json.loads(line) for line in (Path(data_dir) / spec["file"]).read_text(encoding="utf-8").splitlines()
                if line.strip()]
        split = {s: [{"input": r["input"], "output": r["output"]} for r in rows if r["split"] == s]
                 for s in ("demo", "query")}
        tasks.append(Task(name, spec["system"], list(spec["labels"]), split["demo"], split["query"]))
    return tasks


# -- answers and metrics ----------------------------------------------------------------------
def first_token_logprobs(comp, memory, task: Task) -> torch.Tensor:
    """fp32 [N, V] log-probabilities of the first answer token of each query, read from memory."""
    return torch.stack([torch.log_softmax(comp.logits(memory, q["input"])[0].float(), dim=-1)
                        for q in task.queries])


def zero_shot_logprobs(model, tokenizer, task: Task) -> torch.Tensor:
    """The same without demonstrations: the model run on the system message and the query."""
    rows = []
    with torch.no_grad():
        for q in task.queries:
            messages = [{"role": "system", "content": task.system}, {"role": "user", "content": q["input"]}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            rows.append(torch.log_softmax(model(input_ids=ids, logits_to_keep=1).logits[0, -1].float(), dim=-1))
    return torch.stack(rows)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JS divergence in nats per row between log-prob rows [N, V] (fp64, >= 0; at most ln 2)."""
    lp, lq = logp.double(), logq.double()
    logm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_p = torch.where(lp > -math.inf, lp.exp() * (lp - logm), 0.0).sum(-1)
    kl_q = torch.where(lq > -math.inf, lq.exp() * (lq - logm), 0.0).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0)


def label_first_ids(tokenizer, labels) -> list:
    """The first token id of each label as the answer would start it."""
    return [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]


def metrics(logprobs: torch.Tensor, reference: torch.Tensor, task: Task, label_ids) -> dict:
    """JS and top-1 agreement against `reference` ([N, V] each), and accuracy: the label whose
    first token is most likely equals the query's answer."""
    gold = torch.tensor([task.labels.index(q["output"]) for q in task.queries])
    predicted = logprobs[:, label_ids].argmax(dim=-1)
    return {"js": float(js_divergence(reference, logprobs).mean()),
            "top1": float((logprobs.argmax(-1) == reference.argmax(-1)).double().mean()),
            "accuracy": float((predicted == gold).double().mean())}


# -- one task ---------------------------------------------------------------------------------
def compress_timed(model, tokenizer, task: Task, settings: dict, backend="auto"):
    """(EMLoC, TaskMemory, seconds) for `settings` (EMLoC keyword arguments)."""
    from emloc import EMLoC

    comp = EMLoC(model, tokenizer, backend=backend, progress=False, **settings)
    t0 = time.perf_counter()
    memory = comp.compress(task.demos, system=task.system)
    return comp, memory, time.perf_counter() - t0


def _describe(settings: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("method", "preset")) or "-"


def search_label(preset: str) -> str:
    return "emloc" if preset == "faithful" else f"preset {preset}"


def method_runs(ratios, deltas, presets, methods=FIXED_METHODS) -> list:
    """(method label, EMLoC settings) of every compressed run of one task, in report order; the
    searches run each preset ("faithful" is labelled emloc) at each δ. The fewer-demos rows have
    settings {"keep_ratio": r} (see fewer_demos)."""
    runs = [(m, FIXED_RUNS[m](r) if m in FIXED_RUNS else {"keep_ratio": r})
            for r in ratios for m in FIXED_METHODS if m in methods]
    return runs + [(search_label(p), {"preset": p, "tolerance": d}) for p in presets for d in deltas]


def fewer_demos(model, tokenizer, task: Task, ratio: float, context: int, backend="auto"):
    """(EMLoC, memory, seconds, k): the last k demos uncompressed (method="full"), k the most whose
    tokens (each demo rendered alone, plus the system message's share of the full context) fit in
    ratio × `context`, the all-demos context's tokens; at least one demo."""
    from emloc import EMLoC

    probe = EMLoC(model, tokenizer, method="full", progress=False)
    lengths = [len(probe.renderer.demos([probe.renderer.prepared(d, "demo")], system=False).ids) for d in task.demos]
    overhead = max(0, context - sum(lengths))  # the system message and the template's opening
    k, used = 0, overhead
    while k < len(lengths) and used + lengths[-1 - k] <= ratio * context:
        used += lengths[-1 - k]
        k += 1
    k = max(1, k)
    fewer = Task(task.name, task.system, task.labels, task.demos[-k:], task.queries)
    comp, memory, seconds = compress_timed(model, tokenizer, fewer, {"method": "full"}, backend)
    return comp, memory, seconds, k


def run_task(model, tokenizer, task: Task, ratios=DEFAULT_RATIOS, deltas=DEFAULT_DELTAS, presets=(),
             backend="auto", log=print, checkpoint=None, methods=FIXED_METHODS) -> tuple:
    """(rows of COLUMNS for zero-shot, full and every run, the full context's log-probs [N, V]);
    checkpoint(rows so far) is called after each run (to keep partial results)."""
    label_ids = label_first_ids(tokenizer, task.labels)
    comp, full_memory, seconds = compress_timed(model, tokenizer, task, {"method": "full"}, backend)
    reference = first_token_logprobs(comp, full_memory, task)
    context = full_memory.context_length
    log(f"{task.name}: {len(task.demos)} demos, {context} context tokens, {len(task.queries)} queries")

    def row(method, setting, logprobs, memory=None, seconds=0.0, kept=None):
        if kept is None:
            kept = 0.0 if memory is None else 1.0 / memory.compression_ratio
        r = {"task": task.name, "method": method, "setting": setting, "kept": kept,
             "compression": None if memory is None else 1.0 / kept, "seconds": seconds,
             "chunks": None if memory is None else len(memory.stats), "peak_mb": None, "memory_mb": None,
             **metrics(logprobs, reference, task, label_ids)}
        log(f"  {method:<18} {setting:<34} kept {kept:.3f}  JS {r['js']:.5f}  top-1 {r['top1']:.2f}  "
            f"acc {r['accuracy']:.2f}  ({seconds:.0f} s)")
        return r

    rows = [row("zero-shot", "-", zero_shot_logprobs(model, tokenizer, task)),
            row("full", "-", reference, full_memory, seconds)]
    for method, settings in method_runs(ratios, deltas, presets, methods):
        if method == FEWER:
            comp, memory, seconds, k = fewer_demos(model, tokenizer, task, settings["keep_ratio"], context, backend)
            rows.append(row(method, f"keep_ratio={settings['keep_ratio']}, last {k} demos",
                            first_token_logprobs(comp, memory, task), memory, seconds,
                            kept=memory.context_length / context))
        else:
            comp, memory, seconds = compress_timed(model, tokenizer, task, settings, backend)
            rows.append(row(method, _describe(settings), first_token_logprobs(comp, memory, task), memory, seconds))
        if checkpoint is not None:
            checkpoint(rows)
    return rows, reference


# -- the chunk sweep: one fresh process per point, with its peak memory ----------------------
def repeated(demos: list, n: int) -> list:
    """The first n of demos, repeated from the start as often as needed."""
    return [demos[i % len(demos)] for i in range(n)]


def child_main(spec: dict) -> dict:
    """In a fresh process: compress spec["task"] (its first spec["demos"] demos, repeated if there
    are fewer) with spec["settings"], sampling the RSS every 5 ms; then the metrics against the
    reference log-probs saved at spec["reference"] (none without one)."""
    from _rss import peak_rss_growth

    from emloc.models import load_model

    torch.set_num_threads(spec["threads"])
    (task,) = load_tasks([spec["task"]])
    task.demos, task.queries = repeated(task.demos, spec.get("demos") or len(task.demos)), task.queries[:spec["queries"]]
    model, tokenizer = load_model(spec.get("model"))
    (comp, memory, seconds), growth = peak_rss_growth(
        lambda: compress_timed(model, tokenizer, task, spec["settings"], spec["backend"]))
    result = {"js": None, "top1": None, "accuracy": None}
    if spec.get("reference"):
        result = metrics(first_token_logprobs(comp, memory, task), torch.load(spec["reference"]), task,
                         label_first_ids(tokenizer, task.labels))
    return {**result, "kept": 1.0 / memory.compression_ratio, "compression": memory.compression_ratio,
            "seconds": seconds, "chunks": len(memory.stats), "demos": len(task.demos),
            "context": memory.context_length, "peak_mb": growth / 2**20, "memory_mb": memory.nbytes / 2**20}


def run_children(task: Task, runs, args, reference=None, log=print) -> list:
    """One fresh child process per (method, settings, demos, sweep) of runs (a fixed glibc mmap
    threshold, so that the RSS tracks live memory); rows of COLUMNS."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = None
        if reference is not None:
            ref_path = Path(tmp) / "reference.pt"
            torch.save(reference, ref_path)
        for method, settings, demos, sweep in runs:
            spec = {"task": task.name, "demos": demos, "queries": len(task.queries), "settings": settings,
                    "backend": args.backend, "threads": args.threads,
                    "reference": None if ref_path is None else str(ref_path), "model": args.model}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, env=env)
            if out.returncode != 0:
                raise RuntimeError(f"sweep child failed: {out.stderr[-2000:]}")
            r = {"task": task.name, "method": method, "setting": _describe(settings), "sweep": sweep,
                 **json.loads(out.stdout.strip().splitlines()[-1])}
            log(f"  {sweep} sweep {method:<14} {r['setting']:<34} demos {r['demos']:>4} chunks {r['chunks']:>3}  "
                f"kept {r['kept']:.3f}  JS {_fmt(r['js'], '.5f')}  peak +{r['peak_mb']:.0f} MiB  ({r['seconds']:.0f} s)")
            rows.append(r)
    return rows


def chunk_sweep(task: Task, reference, chunks, ratio, presets, args, log=print) -> list:
    """Rows of the chunk sweep: uniform at `ratio` with the demos cut into each count of `chunks`,
    then each preset's search at its default δ, each in a fresh child process."""
    runs = [("uniform", {"method": "uniform", "keep_ratio": ratio,
                         "demos_per_chunk": -(-len(task.demos) // n)}, len(task.demos), "chunks") for n in chunks]
    runs += [(search_label(p), {"preset": p}, len(task.demos), "chunks") for p in presets]
    return run_children(task, runs, args, reference, log)


def scale_sweep(task: Task, counts, ratio, args, log=print) -> list:
    """Rows of the scaling sweep: budget and one-prefill SnapKV at `ratio` on the task's demos
    repeated to each of `counts` demonstrations (no metrics: peak memory and seconds)."""
    runs = [(m, FIXED_RUNS[m](ratio), n, "scale") for n in counts for m in SCALE_METHODS]
    return run_children(task, runs, args, None, log)


# -- reporting ------------------------------------------------------------------------------
def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


TABLE_HEADER = ("| method | setting | kept | compression | JS vs full | top-1 vs full | accuracy | chunks "
                "| compress s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")


def _line(r) -> str:
    return (f"| {r['method']} | {r['setting']} | {r['kept']:.3f} | {_fmt(r['compression'], '.2f')} "
            f"| {r['js']:.5f} | {r['top1']:.2f} | {r['accuracy']:.2f} | {_fmt(r['chunks'], 'd')} "
            f"| {r['seconds']:.0f} |")


def markdown(rows, sweep_rows, command, seconds=None, model_name="SmolLM2-135M-Instruct (bundled)") -> str:
    """The results page: per task every run, then the chunk sweep."""
    import transformers

    parts = [f"# Fidelity on {model_name}", "",
             f"Generated by `{command}` on {datetime.date.today().isoformat()}, CPU {platform.machine()}, "
             f"torch {torch.__version__}, transformers {transformers.__version__}"
             + (f", {seconds / 60:.1f} min in total." if seconds is not None else "."),
             "JS (natural log) and top-1 agreement: the first answer token's distribution against the full "
             "context's, mean over the held-out queries. Kept: mean kept tokens per layer / context tokens. "
             "Accuracy: the label whose first token is most likely. Tasks and sources: bench/data/SOURCES.md.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        n = next(r["chunks"] for r in task_rows if r["method"] == "full")
        parts += [f"## {task} ({n} chunks of 4 demos in the faithful method)", "", TABLE_HEADER,
                  *map(_line, task_rows), ""]
    chunk_rows = [r for r in sweep_rows if r.get("sweep") != "scale"]
    scale_rows = [r for r in sweep_rows if r.get("sweep") == "scale"]
    if chunk_rows:
        parts += [f"## Chunk sweep ({chunk_rows[0]['task']}): fixed budget, 1 to 16 chunks, peak memory", "",
                  "Each row in a fresh process; peak = the highest RSS while compressing above the RSS with "
                  "the model loaded (sampled every 5 ms, glibc mmap threshold fixed at 128 KiB).", "",
                  "| method | setting | chunks | kept | JS vs full | top-1 vs full | peak MiB | memory MiB | compress s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        parts += [f"| {r['method']} | {r['setting']} | {r['chunks']} | {r['kept']:.3f} | {_fmt(r['js'], '.5f')} "
                  f"| {_fmt(r['top1'], '.2f')} | {r['peak_mb']:.1f} | {r['memory_mb']:.1f} | {r['seconds']:.0f} |"
                  for r in chunk_rows]
        parts.append("")
    if scale_rows:
        parts += [f"## Scaling ({scale_rows[0]['task']}, its demos repeated): peak memory and time as the context grows", "",
                  "Each row in a fresh process, peak measured as in the chunk sweep; budget in 4-demo chunks, "
                  "SnapKV in one prefill.", "",
                  "| method | setting | demos | chunks | peak MiB | memory MiB | peak / memory | compress s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        parts += [f"| {r['method']} | {r['setting']} | {r['demos']} | {r['chunks']} | {r['peak_mb']:.1f} "
                  f"| {r['memory_mb']:.1f} | {r['peak_mb'] / r['memory_mb']:.1f} | {r['seconds']:.0f} |"
                  for r in scale_rows]
        parts.append("")
    return "\n".join(parts)


def read_csv(paths) -> tuple:
    """(rows, sweep rows) from CSVs written by earlier runs (sweep rows have a peak memory); a
    (task, method, setting) row seen in an earlier file is not repeated."""
    numbers = {"kept", "compression", "js", "top1", "accuracy", "seconds", "peak_mb", "memory_mb"}
    rows, sweep, seen = [], [], set()
    for path in paths:
        with Path(path).open(newline="") as f:
            for r in csv.DictReader(f):
                r = {k: (None if v in ("", None) else int(v) if k in ("chunks", "demos") else float(v)
                         if k in numbers else v) for k, v in r.items()}
                r.setdefault("demos", None)
                if r["peak_mb"] is not None and not r.get("sweep"):
                    r["sweep"] = "chunks"  # files of before the scaling sweep
                key = (r["task"], r["method"], r["setting"], r.get("sweep"), r["demos"])
                if key not in seen:
                    seen.add(key)
                    (sweep if r["peak_mb"] is not None else rows).append(r)
    return rows, sweep


def write_csv(rows, path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in COLUMNS})


def plot(rows, sweep_rows, kept_path, chunks_path) -> bool:
    """JS and top-1 vs kept fraction per task and method; JS vs chunk count. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return False
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] not in ("full", "zero-shot")))
    for col, task in enumerate(tasks):
        ax_js, ax_top = axes[0][col], axes[1][col]
        for i, method in enumerate(methods):
            points = sorted((r["kept"], r["js"], r["top1"]) for r in rows if r["task"] == task and r["method"] == method)
            style = "o-" if method in FIXED_METHODS else "s--"
            if not points:
                continue
            ax_js.plot([p[0] for p in points], [max(p[1], 1e-6) for p in points], style, color=f"C{i}", label=method)
            ax_top.plot([p[0] for p in points], [p[2] for p in points], style, color=f"C{i}", label=method)
        zero = next(r for r in rows if r["task"] == task and r["method"] == "zero-shot")
        ax_js.axhline(zero["js"], color="grey", ls=":", lw=1, label="zero-shot")
        ax_top.axhline(zero["top1"], color="grey", ls=":", lw=1)
        ax_js.set(title=f"{task}: JS to the full context", xlabel="kept fraction", ylabel="mean JS (nats)", yscale="log")
        ax_top.set(title=f"{task}: top-1 agreement with the full context", xlabel="kept fraction",
                   ylabel="top-1 agreement", ylim=(0, 1.02))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(kept_path, dpi=110)
    plt.close(fig)
    uniform = [r for r in sweep_rows if r["method"] == "uniform" and r.get("sweep") != "scale"]
    if uniform:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["chunks"] for r in uniform], [r["js"] for r in uniform], "o-", label=uniform[0]["setting"].split(",")[0])
        ax.set(xscale="log", yscale="log", xlabel="chunks", ylabel="mean JS to the full context",
               title=f"{uniform[0]['task']}: same kept fraction, more chunks")
        ax.set_xticks([r["chunks"] for r in uniform], [str(r["chunks"]) for r in uniform])
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(chunks_path, dpi=110)
        plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="emloc bench fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: all of bench/data/tasks.json)")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help=f"held-out queries per task (default {DEFAULT_QUERIES})")
    p.add_argument("--demos", type=int, default=None, help="use only the first N demos (default: all)")
    p.add_argument("--ratios", type=float, nargs="*", default=list(DEFAULT_RATIOS), help="kept fractions of the fixed methods")
    p.add_argument("--deltas", type=float, nargs="*", default=list(DEFAULT_DELTAS), help="δ values of the searches")
    p.add_argument("--presets", nargs="*", default=None,
                   help="presets whose searches run at each δ (default: every preset of emloc.PRESETS)")
    p.add_argument("--chunk-task", default="sentiment", help="task of the chunk sweep ('none' to skip)")
    p.add_argument("--chunks", type=int, nargs="*", default=list(DEFAULT_CHUNKS),
                   help="chunk counts of the chunk sweep (none: no chunk sweep)")
    p.add_argument("--scale-demos", type=int, nargs="*", default=list(DEFAULT_SCALE_DEMOS),
                   help="demo counts of the scaling sweep (none: no scaling sweep)")
    p.add_argument("--methods", nargs="+", default=list(FIXED_METHODS), choices=list(FIXED_METHODS), metavar="METHOD",
                   help=f"the fixed-ratio runs (default all: {', '.join(FIXED_METHODS)})")
    p.add_argument("--chunk-ratio", type=float, default=0.25, help="kept fraction of the chunk sweep (uniform)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: the first task, 8 demos, 4 queries; writes only with --out-dir")
    p.add_argument("--out-dir", type=Path, default=None, help="where the page, CSV and plots go (default bench/)")
    p.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    p.add_argument("--from-csv", nargs="+", type=Path, default=None, metavar="CSV",
                   help="no runs: write the page, CSV and plots from the CSVs of earlier runs (e.g. one per task)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0
    command = " ".join(["emloc bench fidelity", *(sys.argv[1:] if argv is None else argv)])
    if args.from_csv:
        rows, sweep_rows = read_csv(args.from_csv)
        return write_outputs(rows, sweep_rows, markdown(rows, sweep_rows, command), args.out_dir or BENCH_DIR)
    import emloc
    from emloc import EMLoCError
    from emloc.models import load_model

    presets = args.presets if args.presets is not None else list(emloc.PRESETS)
    for name in presets:
        if name not in emloc.PRESETS:
            raise EMLoCError(f"unknown preset {name!r}; the presets are {', '.join(emloc.PRESETS)}")
    if args.quick:
        args.tasks = args.tasks or [next(iter(json.loads((DATA_DIR / "tasks.json").read_text())))]
        args.demos, args.queries, args.ratios, args.deltas = args.demos or 8, 4, [0.25], [0.05]
        args.chunks, args.scale_demos = [1, 2], [4, 8]
    for name, value in (("--queries", args.queries), ("--demos", args.demos), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise EMLoCError(f"{name} must be >= 1, got {value}")
    out_dir = args.out_dir if (args.out_dir or args.quick) else BENCH_DIR
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tasks = load_tasks(args.tasks)
    model, tokenizer = load_model(args.model)
    rows, sweep_rows = [], []
    for task in tasks:
        task.demos = task.demos[:args.demos] if args.demos else task.demos
        task.queries = task.queries[:args.queries]
        done = list(rows)
        keep = None if out_dir is None else (lambda so_far: write_csv(done + so_far, out_dir / "fidelity.partial.csv"))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        task_rows, reference = run_task(model, tokenizer, task, args.ratios, args.deltas, presets, args.backend,
                                        checkpoint=keep, methods=args.methods)
        rows += task_rows
        if task.name == args.chunk_task:
            if args.chunks or presets:
                sweep_rows += chunk_sweep(task, reference, args.chunks, args.chunk_ratio, presets, args)
            sweep_rows += scale_sweep(task, args.scale_demos, args.chunk_ratio, args)
    seconds = time.perf_counter() - t0
    page = markdown(rows, sweep_rows, command, seconds, **({"model_name": args.model} if args.model else {}))
    if out_dir is None:
        print("\n" + page + "\n(quick run: nothing written; give --out-dir to keep the page, CSV and plots)")
        return 0
    return write_outputs(rows, sweep_rows, page, out_dir)


def write_outputs(rows, sweep_rows, page, out_dir) -> int:
    """Print the page; write it, the CSV and the plots into out_dir."""
    print("\n" + page)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "FIDELITY.md").write_text(page, encoding="utf-8")
    write_csv(rows + sweep_rows, out_dir / "fidelity.csv")
    plotted = plot(rows, sweep_rows, out_dir / "fidelity_kept.png", out_dir / "fidelity_chunks.png")
    print(f"wrote {out_dir / 'FIDELITY.md'}, {out_dir / 'fidelity.csv'}" + (", plots" if plotted else ""))
    return 0


if __name__ == "__main__":
    if str(BENCH_DIR.parent / "src") not in sys.path:
        sys.path.insert(0, str(BENCH_DIR.parent / "src"))
    sys.exit(main())
