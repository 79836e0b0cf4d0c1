"""method="full": the memory reproduces the uncompressed context exactly (API.md contract)."""
import pytest
import torch

import emloc
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [
    {"input": "the movie was great", "output": "positive"},
    {"input": "terrible plot, I left early", "output": "negative"},
    {"input": "wonderful actors", "output": "positive"},
    {"input": "boring scenes", "output": "negative"},
    {"input": "what a great house", "output": "positive"},
]
QUERY = "the plot was boring"


CASES = [(family, kv, dpc) for family in ("llama", "qwen2") for kv in (4, 2) for dpc in (1, 2, 3)]
CASES += [("qwen3", 2, 2), ("qwen3", 4, 3), ("mistral", 2, 2), ("mistral", 4, 1)]


@pytest.mark.parametrize("family,n_kv_heads,demos_per_chunk", CASES)  # 4 query heads: GQA groups 1, 2
def test_full_memory_logits_equal_model_on_full_inputs(family, n_kv_heads, demos_per_chunk):
    model = tiny_model(family, n_heads=4, n_kv_heads=n_kv_heads, std=0.2, seed=1)
    comp = emloc.EMLoC(model, chat_tokenizer(), method="full", demos_per_chunk=demos_per_chunk,
                       progress=False)
    memory = comp.compress(DEMOS, system="Classify the sentiment.")
    ours = comp.logits(memory, QUERY)
    with torch.no_grad():
        reference = model(**comp.full_inputs(DEMOS, QUERY, system="Classify the sentiment.")).logits[0, -1]
    assert ours.dtype == torch.float32 and ours.shape == (1, model.config.vocab_size)
    assert (ours[0] - reference).abs().max().item() <= 1e-4
    assert memory.layer_lengths == [memory.context_length] * model.config.num_hidden_layers
    assert memory.compression_ratio == 1.0


def test_continuation_rows_equal_model_logits():
    model = tiny_model("llama", std=0.2, seed=2)
    tok = chat_tokenizer()
    comp = emloc.EMLoC(model, tok, method="full", demos_per_chunk=2, progress=False)
    memory = comp.compress(DEMOS)
    ours = comp.logits(memory, QUERY, continuation="negative")
    n_cont = len(tok("negative", add_special_tokens=False)["input_ids"])
    inputs = comp.full_inputs(DEMOS, QUERY)
    cont = torch.tensor([tok("negative", add_special_tokens=False)["input_ids"]])
    ids = torch.cat([inputs["input_ids"], cont], dim=1)
    with torch.no_grad():
        reference = model(input_ids=ids).logits[0, -(n_cont + 1):]
    assert ours.shape == reference.shape == (n_cont + 1, model.config.vocab_size)
    assert (ours - reference).abs().max().item() <= 1e-4


def test_default_system_prompt_and_no_system_in_later_chunks():
    """The first chunk carries the template's default system message; later chunks and queries none."""
    tok = chat_tokenizer()
    comp = emloc.EMLoC(tiny_model("llama"), tok, demos_per_chunk=2, progress=False)
    ids = comp.full_inputs(DEMOS, QUERY)["input_ids"][0].tolist()
    text = tok.decode(ids)
    assert text.count("<|im_start|>system") == 1 and text.startswith("<|im_start|>system\nYou are a tiny")
    assert text.count("<|im_start|>user") == len(DEMOS) + 1
    assert text.endswith("<|im_start|>user\nthe plot was boring<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_works_with_the_users_attention_implementation_and_restores_it(attn_implementation):
    model = tiny_model("qwen2", n_kv_heads=2, std=0.2, seed=5)
    model.set_attn_implementation(attn_implementation)
    comp = emloc.EMLoC(model, chat_tokenizer(), method="full", demos_per_chunk=2, progress=False)
    memory = comp.compress(DEMOS)
    ours = comp.logits(memory, QUERY)
    comp.generate(memory, QUERY, max_new_tokens=2)
    assert model.config._attn_implementation == attn_implementation
    with torch.no_grad():
        reference = model(**comp.full_inputs(DEMOS, QUERY)).logits[0, -1]
    assert (ours[0] - reference).abs().max().item() <= 1e-4
