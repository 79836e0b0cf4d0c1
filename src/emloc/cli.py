"""The `emloc` command line: demo, compress, answer, inspect, bench."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EMLoCError

EXIT_USER_ERROR = 2


def _read_jsonl(path, what: str) -> list:
    path = Path(path)
    if not path.is_file():
        raise EMLoCError(f"no {what} file at {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EMLoCError(f"{path}:{n} is not valid JSON ({exc.msg})") from None
    return rows


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.model, n_demos=args.demos, n_queries=args.queries, backend=args.backend)
    return 0


def cmd_compress(args) -> int:
    from .compressor import EMLoC
    from .models import load_model
    demos = _read_jsonl(args.demos, "demos")
    model, tokenizer = load_model(args.model)
    comp = EMLoC(model, tokenizer, tolerance=args.tolerance, ratios=tuple(args.ratios),
                 demos_per_chunk=args.demos_per_chunk, method=args.method, keep_ratio=args.keep_ratio,
                 backend=args.backend, progress=not args.quiet)
    memory = comp.compress(demos, system=args.system)
    memory.save(args.out)
    print(f"wrote {args.out}: {memory}")
    return 0


def cmd_answer(args) -> int:
    from .compressor import EMLoC
    from .memory import TaskMemory
    from .models import load_model
    if (args.query is None) == (args.queries is None):
        raise EMLoCError("give exactly one of --query TEXT or --queries FILE.jsonl")
    model, tokenizer = load_model(args.model)
    memory = TaskMemory.load(args.memory, model)
    comp = EMLoC(model, tokenizer, backend=args.backend, progress=False)
    if args.query is not None:
        print(comp.generate(memory, args.query, max_new_tokens=args.max_new_tokens))
        return 0
    rows = _read_jsonl(args.queries, "queries")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "input" not in row:
            raise EMLoCError(f"{args.queries}: line {i + 1} needs an 'input' field")
    answers = []
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        answers += comp.generate(memory, [r["input"] for r in batch], max_new_tokens=args.max_new_tokens)
    for row, answer in zip(rows, answers):
        print(json.dumps({**row, "answer": answer}, ensure_ascii=False))
    return 0


def cmd_inspect(args) -> int:
    from safetensors import safe_open
    path = Path(args.memory)
    if not path.is_file():
        raise EMLoCError(f"no memory file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["header"])
    except Exception:
        raise EMLoCError(f"{path} is not a readable emloc memory") from None
    stats, fp = header["stats"], header["fingerprint"]
    print(f"model: {fp['architecture']} ({fp['n_layers']} layers, {fp['n_kv_heads']} KV heads, {fp['dtype']})")
    print(f"settings: {json.dumps(header['settings'])}")
    print(f"context tokens: {header['context_length']}, chunks: {len(stats)}")
    kept = [sum(c["layers"][l]["kept"] for c in stats) for l in range(fp["n_layers"])]
    print(f"{'layer':>5} {'kept':>7} {'fraction':>9}")
    for l, k in enumerate(kept):
        print(f"{l:>5} {k:>7} {k / max(1, header['context_length']):>9.3f}")
    print(f"{'chunk':>5} {'tokens':>7} {'max JS':>9} {'seconds':>8}")
    for c in stats:
        js = [d["js"] for d in c["layers"] if d["js"] is not None]
        print(f"{c['chunk']:>5} {c['tokens']:>7} {max(js) if js else 0:>9.5f} {c['seconds']:>8.2f}")
    return 0


def cmd_bench(args) -> int:
    import runpy
    bench_dir = Path(__file__).resolve().parents[2] / "bench"
    if not bench_dir.is_dir():
        raise EMLoCError("benchmarks live in the source tree's bench/ folder; run from a checkout")
    scripts = sorted(bench_dir.glob("bench_*.py")) if args.what == "kernels" else [bench_dir / f"{args.what}.py"]
    for script in scripts:
        if not script.is_file():
            raise EMLoCError(f"no benchmark {script.name} in {bench_dir}")
        sys.argv = [str(script), *args.rest]
        runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emloc", description="Compress many-shot demonstrations into a "
                                "reusable KV task memory (EMLoC) and answer queries from it.")
    sub = p.add_subparsers(dest="command", required=True)
    model_help = "a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M)"

    d = sub.add_parser("demo", help="compress the shipped capitals task on the bundled model")
    d.add_argument("--model", default=None, help=model_help)
    d.add_argument("--demos", type=int, default=72, help="demonstrations to compress (default 72)")
    d.add_argument("--queries", type=int, default=10, help="held-out queries to answer (default 10)")
    d.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compress", help="compress a JSONL of {input, output} demos into a memory file")
    c.add_argument("--demos", required=True, help="JSONL, one {\"input\": ..., \"output\": ...} per line")
    c.add_argument("--out", required=True, help="memory file to write (safetensors)")
    c.add_argument("--model", default=None, help=model_help)
    c.add_argument("--system", default=None, help="system message opening the first chunk")
    c.add_argument("--tolerance", type=float, default=0.005, help="JS bound per chunk (default 0.005)")
    c.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.5], help="candidate keep-ratios")
    c.add_argument("--demos-per-chunk", type=int, default=4)
    c.add_argument("--method", default="emloc", choices=["emloc", "full", "uniform", "pyramid"])
    c.add_argument("--keep-ratio", type=float, default=None, help="for uniform / pyramid")
    c.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)

    a = sub.add_parser("answer", help="answer queries from a memory file")
    a.add_argument("--memory", required=True)
    a.add_argument("--query", default=None, help="one query; the answer is printed")
    a.add_argument("--queries", default=None, help="JSONL with an 'input' per line; prints JSONL with 'answer'")
    a.add_argument("--model", default=None, help=model_help)
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    a.set_defaults(func=cmd_answer)

    i = sub.add_parser("inspect", help="per-layer kept tokens and per-chunk JS of a memory file")
    i.add_argument("memory")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="run benchmarks from the source tree's bench/ folder")
    b.add_argument("what", choices=["kernels", "compress", "query", "fidelity"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EMLoCError as exc:
        print(f"emloc: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
