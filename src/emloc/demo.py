"""`emloc demo`: compress a many-shot task on the bundled SmolLM2-135M and compare answers."""
from __future__ import annotations

import json
import time
from importlib import resources

from .compressor import EMLoC
from .models import load_model

N_DEMOS = 72
N_QUERIES = 10
SYSTEM = "Answer with the name of the capital city only."


def load_task() -> list:
    """The shipped capitals task (see data/SOURCES.md): a list of {'input', 'output'}."""
    text = resources.files("emloc").joinpath("data/capitals.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_demo(model_path=None, n_demos=N_DEMOS, n_queries=N_QUERIES, backend="auto", out=print) -> dict:
    """Compress n_demos demos with EMLoC and with the full context; answer n_queries held-out ones."""
    rows = load_task()
    demos, queries = rows[:n_demos], rows[n_demos:n_demos + n_queries]
    out(f"loading the model ({'bundled SmolLM2-135M-Instruct' if model_path is None else model_path}) ...")
    model, tokenizer = load_model(model_path)
    emloc = EMLoC(model, tokenizer, backend=backend)
    full = EMLoC(model, tokenizer, method="full", backend=backend, progress=False)
    out(f"compressing {len(demos)} demonstrations (chunks of {emloc.settings.demos_per_chunk}, "
        f"tolerance {emloc.settings.tolerance}) ...")
    t0 = time.perf_counter()
    memory = emloc.compress(demos, system=SYSTEM)
    seconds = time.perf_counter() - t0
    full_memory = full.compress(demos, system=SYSTEM)
    questions = [q["input"] for q in queries]
    compressed = emloc.generate(memory, questions, max_new_tokens=12)
    uncompressed = full.generate(full_memory, questions, max_new_tokens=12)

    lengths = memory.layer_lengths
    out("")
    out(f"{'context tokens':<36}{memory.context_length}")
    out(f"{'kept tokens per layer min/mean/max':<36}{min(lengths)} / {sum(lengths) / len(lengths):.1f} / {max(lengths)}")
    out(f"{'compression ratio':<36}{memory.compression_ratio:.2f}x")
    out(f"{'time to compress':<36}{seconds:.1f} s")
    out("")
    out(f"{'question':<44}{'expected':<16}{'full context':<18}{'emloc memory':<18}agree")
    agree = 0
    for q, a_full, a_mem in zip(queries, uncompressed, compressed):
        same = a_full == a_mem
        agree += same
        out(f"{q['input'][:43]:<44}{q['output'][:15]:<16}{a_full[:17]:<18}{a_mem[:17]:<18}{'yes' if same else 'no'}")
    correct_full = sum(a.strip() == q["output"] for q, a in zip(queries, uncompressed))
    correct_mem = sum(a.strip() == q["output"] for q, a in zip(queries, compressed))
    out("")
    out(f"answers agree on {agree}/{len(queries)}; exact-match correct: full context "
        f"{correct_full}/{len(queries)}, emloc memory {correct_mem}/{len(queries)}")
    return {"memory": memory, "seconds": seconds, "agree": agree, "answers": compressed,
            "full_answers": uncompressed}
