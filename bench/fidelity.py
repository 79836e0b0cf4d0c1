"""Fidelity on a real model: EMLoC against the full context and fixed-budget pruning (issue 7).

For each many-shot task of bench/data/tasks.json (real data, see bench/data/SOURCES.md) the
demo set is compressed once per method and every held-out query is answered from the memory:

  zero-shot   no demos: the model run directly on the system message and the query
  full        method="full", the uncompressed context (the reference)
  emloc       method="emloc" at each δ of the sweep (the headline δ included)
  uniform     method="uniform", keep_ratio = emloc's achieved kept fraction at the headline δ
  pyramid     method="pyramid", the same keep_ratio

Per method: accuracy by label log-likelihood (sum of the label's token log-probs, via
comp.logits(..., continuation=label); argmax over the task's label set) and by greedy generation
(exact match after strip/lower); the compression ratio; the mean JS divergence (natural log)
and the top-1 agreement of the first answer token's distribution against the full context; and
how often the predicted label equals the full context's.

    emloc bench fidelity                      # 3 tasks, δ sweep on one: under an hour on 2 shared cores
    emloc bench fidelity --sweep-tasks all    # the δ sweep on every task (~1.5-2 h)
    emloc bench fidelity --quick              # a smoke run (~2 min); writes nothing unless --out-dir
Outputs (full runs): bench/fidelity_results.md, bench/fidelity.csv, bench/fidelity_sweep.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
DATA_DIR = BENCH_DIR / "data"
DEFAULT_DELTA = 0.005
DEFAULT_SWEEP = (0.0025, 0.005, 0.01, 0.02, 0.05)
DEFAULT_SWEEP_TASK = "sentiment"
DEFAULT_QUERIES = 120
ACCURACIES = {"acc_ll": "LL", "acc_cal": "LL calibrated", "acc_gen": "generation"}
COLUMNS = ["task", "method", "delta", "keep_ratio", "context_tokens", "kept_tokens", "compression",
           "acc_ll", "acc_cal", "acc_gen", "label_agree", "js", "top1", "compress_s", "queries"]


@dataclass
class Task:
    """A many-shot task: demos and held-out queries are lists of {'input', 'output'}."""

    name: str
    system: str
    labels: list
    demos: list
    queries: list


@dataclass
class Answers:
    """What one method answered for the queries of a task.

    first      fp32 [N, V] log-probs of the first answer token
    label_ll   fp32 [N, n_labels] log-likelihood of each label (sum over its tokens)
    generated  list[str] greedy answers
    """

    first: torch.Tensor
    label_ll: torch.Tensor
    generated: list


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


# -- answering ------------------------------------------------------------------------------
def _label_ids(tokenizer, labels) -> list:
    return [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]


def _sequence_ll(logits: torch.Tensor, ids: list) -> float:
    """Sum of log p(ids[i]) under rows logits[i] (rows [len(ids) (+1), V])."""
    logp = torch.log_softmax(logits[:len(ids)].float(), dim=-1)
    return float(logp[torch.arange(len(ids)), torch.tensor(ids)].sum())


def _scores_from_memory(comp, memory, text: str, labels, label_ids):
    """(log-probs [V] of the first answer token, label log-likelihoods) of one query read from memory.

    Single-token labels are read from row 0 of comp.logits(memory, text) (identical to their
    continuation score); longer labels are scored with comp.logits(..., continuation=label).
    """
    logp0 = torch.log_softmax(comp.logits(memory, text)[0].float(), dim=-1)
    ll = [float(logp0[ids[0]]) if len(ids) == 1
          else _sequence_ll(comp.logits(memory, text, continuation=label), ids)
          for label, ids in zip(labels, label_ids)]
    return logp0, ll


def answer_from_memory(comp, memory, task: Task, max_new_tokens: int, batch_size: int = 32) -> Answers:
    """Score every label and generate greedily for each query, reading `memory` through `comp`."""
    label_ids = _label_ids(comp.tokenizer, task.labels)
    scores = [_scores_from_memory(comp, memory, q["input"], task.labels, label_ids) for q in task.queries]
    generated = []
    inputs = [q["input"] for q in task.queries]
    for start in range(0, len(inputs), batch_size):
        generated += comp.generate(memory, inputs[start:start + batch_size], max_new_tokens=max_new_tokens)
    return Answers(torch.stack([f for f, _ in scores]), torch.tensor([ll for _, ll in scores]), generated)


def _scores_direct(model, ids: list, label_ids):
    """The same as _scores_from_memory for the plain model on token ids (no memory)."""
    logp0 = torch.log_softmax(model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float(), dim=-1)
    ll = [float(logp0[t[0]]) if len(t) == 1
          else _sequence_ll(model(input_ids=torch.tensor([ids + t]), logits_to_keep=len(t) + 1).logits[0], t)
          for t in label_ids]
    return logp0, ll


def answer_zero_shot(model, tokenizer, task: Task, max_new_tokens: int) -> Answers:
    """The same scores with no demonstrations: the model run directly on system + query.

    (emloc has no empty memory: compress needs at least one demo.)
    """
    label_ids = _label_ids(tokenizer, task.labels)
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop

    def prompt(text):
        messages = [{"role": "system", "content": task.system}, {"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    scores, generated = [], []
    with torch.no_grad():
        for q in task.queries:
            ids = prompt(q["input"])
            scores.append(_scores_direct(model, ids, label_ids))
            ids_t = torch.tensor([ids])
            out = model.generate(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad)
            new = out[0, len(ids):].tolist()
            new = new[:new.index(stop)] if stop in new else new
            generated.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return Answers(torch.stack([f for f, _ in scores]), torch.tensor([ll for _, ll in scores]), generated)


# -- metrics --------------------------------------------------------------------------------
def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """JS divergence in nats per row between log-prob rows [N, V] (fp64, >= 0; at most ln 2)."""
    lp, lq = logp.double(), logq.double()
    logm = torch.logaddexp(lp, lq) - math.log(2.0)
    kl_p = torch.where(lp > -math.inf, lp.exp() * (lp - logm), 0.0).sum(-1)
    kl_q = torch.where(lq > -math.inf, lq.exp() * (lq - logm), 0.0).sum(-1)
    return (0.5 * (kl_p + kl_q)).clamp_min(0.0)


def metrics(answers: Answers, reference: Answers, task: Task) -> dict:
    """Accuracies (log-likelihood, calibrated, generation), label agreement, JS and top-1 vs `reference`.

    Calibrated: batch calibration (Zhou et al., ICLR 2024): argmax of each query's label
    log-likelihoods minus their mean over all the queries; it removes the label bias a long context
    gives a small model (SmolLM2-135M answers nearly every query with one label).
    """
    gold = torch.tensor([task.labels.index(q["output"]) for q in task.queries])
    pred = answers.label_ll.argmax(-1)
    calibrated = (answers.label_ll - answers.label_ll.mean(0)).argmax(-1)
    gen_ok = [a.strip().lower() == q["output"].strip().lower() for a, q in zip(answers.generated, task.queries)]
    return {
        "acc_ll": float((pred == gold).double().mean()),
        "acc_cal": float((calibrated == gold).double().mean()),
        "acc_gen": sum(gen_ok) / len(gen_ok),
        "label_agree": float((pred == reference.label_ll.argmax(-1)).double().mean()),
        "js": float(js_divergence(reference.first, answers.first).mean()),
        "top1": float((answers.first.argmax(-1) == reference.first.argmax(-1)).double().mean()),
    }


# -- one task -------------------------------------------------------------------------------
def _memory_row(task, method, memory, seconds, delta=None, keep_ratio=None) -> dict:
    kept = sum(memory.layer_lengths) / len(memory.layer_lengths)
    return {"task": task.name, "method": method, "delta": delta, "keep_ratio": keep_ratio,
            "context_tokens": memory.context_length, "kept_tokens": kept,
            "compression": memory.compression_ratio, "compress_s": seconds, "queries": len(task.queries)}


def run_task(model, tokenizer, task: Task, delta=DEFAULT_DELTA, sweep=DEFAULT_SWEEP, backend="auto",
             log=print) -> list:
    """All rows (dicts with COLUMNS) of one task: zero-shot, full, emloc per δ, uniform, pyramid."""
    from emloc import EMLoC

    max_new = max(len(ids) for ids in _label_ids(tokenizer, task.labels)) + 2

    def timed_compress(**kwargs):
        comp = EMLoC(model, tokenizer, backend=backend, progress=False, **kwargs)
        t0 = time.perf_counter()
        memory = comp.compress(task.demos, system=task.system)
        return comp, memory, time.perf_counter() - t0

    def evaluate(row, answers):
        row.update(metrics(answers, reference, task))
        log(f"  {row['method']:<9} δ={_fmt(row['delta'], 'g'):<7} "
            f"compression {_fmt(row['compression'], '5.2f')}x  acc LL {row['acc_ll']:.3f} cal {row['acc_cal']:.3f} "
            f"gen {row['acc_gen']:.3f}  "
            f"JS {row['js']:.5f}  top-1 {row['top1']:.3f}  ({row['compress_s']:.0f} s to compress)")
        return row

    comp, full_memory, seconds = timed_compress(method="full")
    log(f"{task.name}: {len(task.demos)} demos, {full_memory.context_length} context tokens, "
        f"{len(task.queries)} queries")
    reference = answer_from_memory(comp, full_memory, task, max_new)
    rows = [evaluate(_memory_row(task, "full", full_memory, seconds), reference)]
    zero = answer_zero_shot(model, tokenizer, task, max_new)
    rows.insert(0, evaluate({"task": task.name, "method": "zero-shot", "delta": None, "keep_ratio": None,
                             "context_tokens": 0, "kept_tokens": 0, "compression": None, "compress_s": 0.0,
                             "queries": len(task.queries)}, zero))
    keep = None
    for d in sorted(set(sweep) | {delta}):
        comp, memory, seconds = timed_compress(tolerance=d)
        rows.append(evaluate(_memory_row(task, "emloc", memory, seconds, delta=d),
                             answer_from_memory(comp, memory, task, max_new)))
        if d == delta:
            keep = min(1.0, 1.0 / memory.compression_ratio)
    for method in ("uniform", "pyramid"):
        comp, memory, seconds = timed_compress(method=method, keep_ratio=keep)
        rows.append(evaluate(_memory_row(task, method, memory, seconds, keep_ratio=keep),
                             answer_from_memory(comp, memory, task, max_new)))
    return rows


# -- reporting ------------------------------------------------------------------------------
def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def headline_rows(rows, delta=DEFAULT_DELTA) -> list:
    """Per task: zero-shot, full, emloc at `delta`, uniform, pyramid (in that order)."""
    keep = [r for r in rows if r["method"] != "emloc" or r["delta"] == delta]
    order = {"zero-shot": 0, "full": 1, "emloc": 2, "uniform": 3, "pyramid": 4}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return sorted(keep, key=lambda r: (tasks.index(r["task"]), order[r["method"]]))


def target_lines(rows, delta=DEFAULT_DELTA) -> list:
    """One line per task: emloc at `delta` vs the targets of issue 7."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        by = {r["method"]: r for r in headline_rows(rows, delta) if r["task"] == task}
        e, f = by["emloc"], by["full"]
        change = {k: 100 * (e[k] - f[k]) for k in ACCURACIES}
        checks = {**{f"{ACCURACIES[k]} within 1 pt of full": change[k] >= -1.0 for k in ACCURACIES},
            "compression >= 3x": e["compression"] >= 3.0,
            "JS below uniform": e["js"] < by["uniform"]["js"],
            "JS below pyramid": e["js"] < by["pyramid"]["js"],
        }
        verdict = ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items())
        changes = " / ".join(f"{change[k]:+.1f} pt ({ACCURACIES[k]})" for k in ACCURACIES)
        lines.append(f"- **{task}**: emloc {e['compression']:.2f}x, accuracy change vs full "
                     f"{changes}, JS {e['js']:.5f} vs uniform "
                     f"{by['uniform']['js']:.5f} / pyramid {by['pyramid']['js']:.5f}. {verdict}")
    return lines


def markdown(rows, delta=DEFAULT_DELTA, command="emloc bench fidelity", seconds=None,
             model_name="SmolLM2-135M-Instruct (bundled, Q4_1 GGUF de-quantised to fp32)") -> str:
    """The results page: headline table, δ sweep table, target check."""
    header = ("| task | method | δ | keep ratio | context | kept/layer | compression | acc LL | acc LL cal "
              "| acc gen | label agree | JS vs full | top-1 vs full | compress s |\n" + "|---" * 14 + "|")

    def line(r):
        return (f"| {r['task']} | {r['method']} | {_fmt(r['delta'], 'g')} | {_fmt(r['keep_ratio'], '.3f')} "
                f"| {r['context_tokens']} | {r['kept_tokens']:.1f} | {_fmt(r['compression'], '.2f')} "
                f"| {r['acc_ll']:.3f} | {r['acc_cal']:.3f} | {r['acc_gen']:.3f} | {r['label_agree']:.3f} "
                f"| {r['js']:.5f} "
                f"| {r['top1']:.3f} | {r['compress_s']:.1f} |")

    import transformers

    sweep = sorted((r for r in rows if r["method"] == "emloc"), key=lambda r: (r["task"], r["delta"]))
    n = sorted({r["queries"] for r in rows})
    parts = [
        f"# Fidelity on {model_name}",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}, CPU {platform.machine()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
        + (f", {seconds / 60:.1f} min in total." if seconds is not None else "."),
        f"Tasks and their sources: bench/data/SOURCES.md. Queries per task: {', '.join(map(str, n))} "
        f"(one query is {100 / max(n):.2f} accuracy points or more). JS: first answer token, natural log.",
        "Accuracies: acc LL = the label of highest log-likelihood; acc LL cal = the same after batch "
        "calibration (each label's mean log-likelihood over the queries subtracted: the long context makes "
        "this 135M model answer nearly every query with one label); acc gen = greedy generation, exact match. "
        "Label agree: fraction of queries whose (uncalibrated) log-likelihood label equals the full context's.",
        "",
        f"## Headline (emloc at δ = {delta}; uniform and pyramid at emloc's kept fraction)",
        "",
        header, *map(line, headline_rows(rows, delta)),
        "",
        "## Targets (issue 7)",
        "",
        *target_lines(rows, delta),
        "",
        "## δ sweep (emloc): compression vs accuracy",
        "",
        header, *map(line, sweep),
        "",
    ]
    return "\n".join(parts)


def write_csv(rows, path) -> None:
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})


def plot_sweep(rows, path, metric="acc_cal") -> bool:
    """compression vs accuracy (`metric`) and vs JS per task; False (with a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)", file=sys.stderr)
        return False
    fig, (ax_acc, ax_js) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, task in enumerate(dict.fromkeys(r["task"] for r in rows)):
        color = f"C{i}"
        sweep = sorted((r for r in rows if r["task"] == task and r["method"] == "emloc"), key=lambda r: r["delta"])
        x = [r["compression"] for r in sweep]
        ax_acc.plot(x, [r[metric] for r in sweep], "o-", color=color, label=f"{task} emloc")
        ax_js.plot(x, [r["js"] for r in sweep], "o-", color=color, label=f"{task} emloc")
        for r in sweep:
            ax_acc.annotate(f"{r['delta']:g}", (r["compression"], r[metric]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        by = {r["method"]: r for r in rows if r["task"] == task}
        ax_acc.axhline(by["full"][metric], color=color, ls="--", lw=1)
        ax_acc.axhline(by["zero-shot"][metric], color=color, ls=":", lw=1)
        for method, marker in (("uniform", "s"), ("pyramid", "^")):
            r = by[method]
            ax_acc.plot(r["compression"], r[metric], marker, color=color, mfc="none", ms=8)
            ax_js.plot(r["compression"], r["js"], marker, color=color, mfc="none", ms=8)
    ax_acc.set(xlabel="compression ratio (context / mean kept tokens per layer)",
               ylabel=f"accuracy ({ACCURACIES[metric]})",
               title="emloc δ sweep (labels: δ); -- full context, : zero-shot; □ uniform, △ pyramid")
    ax_js.set(xlabel="compression ratio", ylabel="mean JS vs full context (nats)", yscale="log",
              title="first-answer-token JS divergence vs full context")
    ax_acc.title.set_fontsize(9)
    ax_js.title.set_fontsize(9)
    ax_acc.legend(fontsize=8)
    ax_js.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="emloc bench fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=None, help="task names (default: all of bench/data/tasks.json)")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES,
                   help=f"held-out queries per task, at most 150 (default {DEFAULT_QUERIES})")
    p.add_argument("--demos", type=int, default=None, help="use only the first N demos (default: all)")
    p.add_argument("--delta", type=float, default=DEFAULT_DELTA, help=f"headline δ (default {DEFAULT_DELTA})")
    p.add_argument("--sweep", type=float, nargs="+", default=list(DEFAULT_SWEEP), help="δ values of the sweep")
    p.add_argument("--sweep-tasks", nargs="+", default=[DEFAULT_SWEEP_TASK],
                   help=f"tasks that get the δ sweep, or 'all' (default {DEFAULT_SWEEP_TASK}: each δ is one "
                        "more compression, ~3-7 min per task on 2 shared cores)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a shared 2-core machine two threads spin "
                        "against other processes and run several times slower)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (~2 min): the first task, 4 demos, 5 queries, sweep 0.005 0.05; "
                        "writes files only with --out-dir")
    p.add_argument("--out-dir", type=Path, default=None, help="where the table, CSV and plot go (default bench/)")
    p.add_argument("--model", default=None, help="model folder or .gguf (default: the bundled SmolLM2-135M)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    args = p.parse_args(argv)
    from emloc import EMLoCError
    from emloc.models import load_model

    if args.quick:
        args.tasks = args.tasks or [next(iter(json.loads((DATA_DIR / "tasks.json").read_text())))]
        args.demos, args.queries, args.sweep, args.sweep_tasks = args.demos or 4, 5, [0.005, 0.05], ["all"]
    for name, value in (("--queries", args.queries), ("--demos", args.demos), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise EMLoCError(f"{name} must be >= 1, got {value}")
    out_dir = args.out_dir if (args.out_dir or args.quick) else BENCH_DIR
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tasks = load_tasks(args.tasks)
    swept = {t.name for t in tasks} if "all" in args.sweep_tasks else {t.name for t in load_tasks(args.sweep_tasks)}
    print(f"tasks: {', '.join(t.name for t in tasks)}; δ sweep {args.sweep} on: {', '.join(sorted(swept)) or 'none'}; "
          f"{args.threads} thread(s)")
    model, tokenizer = load_model(args.model)
    rows = []
    for task in tasks:
        task.demos = task.demos[:args.demos] if args.demos else task.demos
        task.queries = task.queries[:args.queries]
        rows += run_task(model, tokenizer, task, args.delta, args.sweep if task.name in swept else (), args.backend)
    seconds = time.perf_counter() - t0
    command = " ".join(["emloc bench fidelity", *(sys.argv[1:] if argv is None else argv)])
    page = markdown(rows, args.delta, command, seconds, **({"model_name": args.model} if args.model else {}))
    print("\n" + page)
    if out_dir is None:
        print("(quick run: nothing written; give --out-dir to keep the table, CSV and plot)")
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fidelity_results.md").write_text(page, encoding="utf-8")
    write_csv(rows, out_dir / "fidelity.csv")
    plotted = plot_sweep(rows, out_dir / "fidelity_sweep.png")
    print(f"wrote {out_dir / 'fidelity_results.md'}, {out_dir / 'fidelity.csv'}"
          + (f", {out_dir / 'fidelity_sweep.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
