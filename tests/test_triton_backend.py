"""backend="triton" (the kernels under the CPU interpreter) against backend="torch", end to end.

A tiny GQA model (4 query heads, 2 KV heads) whose search makes several different decisions
compresses three short demos in two chunks (the second over a non-empty memory) with each
backend; then both answer from their memory. The Triton run must make the same decisions, keep
the same memory within a tight tolerance, give close logits and generate the same tokens, and
must really run every Triton launcher (a silent fallback to PyTorch would make it vacuous).
"""
import importlib

import pytest
import torch

import emloc
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [
    {"input": "great movie", "output": "positive"},
    {"input": "boring plot", "output": "negative"},
    {"input": "capital of france", "output": "paris"},
]
SYSTEM = "Answer."
QUERIES = ["good movie", "capital of italy"]
NEW_TOKENS = 3

# (module, launcher): the Triton entry point behind each public op
LAUNCHERS = [("prefix_attention", "prefix_attention_triton"),
             ("probe_scores", "_probe_scores_triton"),
             ("ranking", "rank_tokens_triton"),
             ("compaction", "gather_append_triton"),
             ("lm_head_js", "teacher_logsumexp_triton"),
             ("lm_head_js", "lm_head_js_triton")]


def _run(backend):
    """Compress, score a continuation and generate with one backend, recording which Triton
    launchers ran and the query lengths seen by prefix attention."""
    calls = {name: 0 for _, name in LAUNCHERS}
    prefix_lq = []
    with pytest.MonkeyPatch.context() as mp:
        for module_name, name in LAUNCHERS:
            module = importlib.import_module(f"emloc_kernels.{module_name}")
            original = getattr(module, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                if _name == "prefix_attention_triton":
                    prefix_lq.append(args[0].shape[2])
                return _original(*args, **kwargs)

            mp.setattr(module, name, spy)
        model = tiny_model("llama", n_heads=4, n_kv_heads=2, hidden=64, n_layers=2, std=0.2,
                           seed=1)
        comp = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=2, progress=False,
                           backend=backend)
        memory = comp.compress(DEMOS, system=SYSTEM)
        logits = comp.logits(memory, QUERIES[0], continuation="positive")
        texts = comp.generate(memory, QUERIES, max_new_tokens=NEW_TOKENS)
    return dict(memory=memory, logits=logits, texts=texts, calls=calls, prefix_lq=prefix_lq)


@pytest.fixture(scope="module")
def runs():
    return {backend: _run(backend) for backend in ("torch", "triton")}


def _decisions(memory):
    return [[(d["ratio"], d["kept"]) for d in chunk["layers"]] for chunk in memory.stats]


def test_every_triton_launcher_ran_only_with_the_triton_backend(runs):
    assert all(n == 0 for n in runs["torch"]["calls"].values()), runs["torch"]["calls"]
    assert all(n > 0 for n in runs["triton"]["calls"].values()), runs["triton"]["calls"]
    lq = runs["triton"]["prefix_lq"]
    assert min(lq) == 1 and max(lq) > 4  # decode form (generation) and prefill form


def test_setup_is_not_degenerate(runs):
    """Two chunks, the second appended to a non-empty memory, and at least two outcomes."""
    stats = runs["torch"]["memory"].stats
    assert len(stats) == 2 and all(d["kept"] >= 1 for d in stats[0]["layers"])
    assert len({ratio for chunk in _decisions(runs["torch"]["memory"]) for ratio, _ in chunk}) >= 2


def test_same_decisions_and_memory(runs):
    ours, theirs = runs["triton"]["memory"], runs["torch"]["memory"]
    assert _decisions(ours) == _decisions(theirs)
    for chunk_ours, chunk_theirs in zip(ours.stats, theirs.stats):
        for a, b in zip(chunk_ours["layers"], chunk_theirs["layers"]):
            assert a["tests"] == b["tests"]
            assert (a["js"] is None) == (b["js"] is None)
            if a["js"] is not None:
                assert abs(a["js"] - b["js"]) <= 1e-7 + 1e-4 * b["js"]
    assert ours.layer_lengths == theirs.layer_lengths and ours.offset == theirs.offset
    for a, b in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=5e-5)


def test_same_answers(runs):
    ours, theirs = runs["triton"], runs["torch"]
    assert ours["logits"].shape == theirs["logits"].shape and ours["logits"].shape[0] > 1
    torch.testing.assert_close(ours["logits"], theirs["logits"], rtol=1e-5, atol=5e-5)
    assert ours["texts"] == theirs["texts"]
    assert len(ours["texts"]) == len(QUERIES) and all(ours["texts"])
