"""`emloc demo`: what many-shot demonstrations change in the bundled SmolLM2-135M's answers, and
how much of that change a task memory keeps, at what size and cost.

The task (shipped, see data/SOURCES.md): "Is the word "<word>" positive or negative?". Without
demonstrations the model answers in free sentences; with them it answers with the label. Each
held-out question is answered three ways: without demonstrations, from the full context (as a
cached prefix) and from the compressed memory.
"""
from __future__ import annotations

import json
import time
from importlib import resources

from emloc.engine import EMLoC
from emloc.models import load_model
from emloc.compression.presets import PRESETS, RECOMMENDED_PRESET

N_DEMOS = 64
N_QUERIES = 12
SENTIMENT_SYSTEM = "Classify the sentiment of an English word. Answer positive or negative."
SYSTEM = "Answer with the name of the capital city only."  # of the capitals task


def _rows(name: str) -> list:
    text = resources.files("emloc").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_task() -> list:
    """The shipped capitals task (see data/SOURCES.md): a list of {'input', 'output'} (the
    benchmarks' serving workload)."""
    return _rows("capitals.jsonl")


def load_word_sentiment() -> tuple:
    """The demo's task: (demonstrations, held-out queries), lists of {'input', 'output'}."""
    rows = _rows("word_sentiment.jsonl")
    split = {s: [{"input": r["input"], "output": r["output"]} for r in rows if r["split"] == s]
             for s in ("demo", "query")}
    return split["demo"], split["query"]


def zero_shot_answers(model, tokenizer, questions, system: str, max_new_tokens: int) -> list:
    """Greedy answers of the plain model to each question with only the system message."""
    import torch

    answers = []
    with torch.no_grad():
        for q in questions:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": q}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def run_demo(model_path=None, n_demos=N_DEMOS, n_queries=N_QUERIES, backend="auto", preset=RECOMMENDED_PRESET,
             out=print) -> dict:
    """Compress n_demos demonstrations with `preset` and with no pruning; answer n_queries held-out
    questions without demonstrations, from the full context and from the memory; print a table."""
    demos, queries = load_word_sentiment()
    demos, queries = demos[:n_demos], queries[:n_queries]
    out(f"loading the model ({'bundled SmolLM2-135M-Instruct' if model_path is None else model_path}) ...")
    model, tokenizer = load_model(model_path)
    emloc = EMLoC(model, tokenizer, backend=backend, preset=preset)
    full = EMLoC(model, tokenizer, method="full", backend=backend, progress=False)
    options = ", ".join(f"{k}={v}" for k, v in PRESETS[preset].items()) or "the published method"
    out(f"compressing {len(demos)} demonstrations with preset {preset!r} ({options}; tolerance "
        f"{emloc.settings.tolerance}) ...")
    t0 = time.perf_counter()
    memory = emloc.compress(demos, system=SENTIMENT_SYSTEM)
    seconds = time.perf_counter() - t0
    full_memory = full.compress(demos, system=SENTIMENT_SYSTEM)
    questions = [q["input"] for q in queries]
    alone = zero_shot_answers(model, tokenizer, questions, SENTIMENT_SYSTEM, max_new_tokens=8)
    uncompressed = full.generate(full_memory, questions, max_new_tokens=8)
    compressed = emloc.generate(memory, questions, max_new_tokens=8)

    lengths = memory.layer_lengths
    out("")
    out(f"{'context tokens':<36}{memory.context_length}")
    out(f"{'kept tokens per layer min/mean/max':<36}{min(lengths)} / {sum(lengths) / len(lengths):.1f} / {max(lengths)}")
    out(f"{'compression ratio':<36}{memory.compression_ratio:.2f}x")
    out(f"{'memory size':<36}{memory.nbytes / 2**20:.1f} MiB (full context {full_memory.nbytes / 2**20:.1f} MiB)")
    out(f"{'time to compress':<36}{seconds:.1f} s")
    out("")
    out(f"{'word':<18}{'expected':<10}{'no demos':<26}{'full context':<14}{'memory':<14}agree")
    agree = 0
    for q, a_zero, a_full, a_mem in zip(queries, alone, uncompressed, compressed):
        same = a_full == a_mem
        agree += same
        word = q["input"].split('"')[1] if q["input"].count('"') == 2 else q["input"]
        out(f"{word[:17]:<18}{q['output']:<10}{a_zero[:25]:<26}{a_full[:13]:<14}{a_mem[:13]:<14}{'yes' if same else 'no'}")

    def correct(answers):
        return sum(a.strip().lower() == q["output"] for q, a in zip(queries, answers))

    n = len(queries)
    out("")
    out(f"exact answers: no demos {correct(alone)}/{n}, full context {correct(uncompressed)}/{n}, "
        f"memory {correct(compressed)}/{n}; the memory answers as the full context on {agree}/{n}")
    return {"memory": memory, "seconds": seconds, "agree": agree, "answers": compressed,
            "full_answers": uncompressed, "zero_shot_answers": alone}
