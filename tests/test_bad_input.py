"""User mistakes raise emloc.EMLoCError (a ValueError) with a message that says what to fix."""
import pytest
import torch

import emloc
from tiny_models import chat_tokenizer, tiny_model

DEMO = {"input": "great movie", "output": "positive"}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, max_positions=256)


@pytest.mark.parametrize("kwargs,message", [
    ({"tolerance": -0.1}, "tolerance"),
    ({"tolerance": "0.1"}, "tolerance"),
    ({"tolerance": float("nan")}, "tolerance"),
    ({"ratios": ()}, "ratios is empty"),
    ({"ratios": (0.5, 0.2)}, "increasing"),
    ({"ratios": (0.0, 0.5)}, r"\(0, 1\]"),
    ({"ratios": (0.5, 1.5)}, r"\(0, 1\]"),
    ({"ratios": "abc"}, "ratio"),
    ({"demos_per_chunk": 0}, "demos_per_chunk"),
    ({"demos_per_chunk": 2.5}, "demos_per_chunk"),
    ({"method": "magic"}, "method"),
    ({"method": "uniform"}, "keep_ratio"),
    ({"method": "pyramid", "keep_ratio": 1.5}, "keep_ratio"),
    ({"keep_ratio": 0.3}, "keep_ratio only applies"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_settings(model, kwargs, message):
    with pytest.raises(emloc.EMLoCError, match=message):
        emloc.EMLoC(model, chat_tokenizer(), **kwargs)


@pytest.mark.parametrize("demos,message", [
    ([], "no demos"),
    (None, "list"),
    ("great movie", "list"),
    ([{"input": "x"}], "no 'output'"),
    ([{"output": "x"}], "no 'input'"),
    ([{"input": "  ", "output": "x"}], "no 'input'"),
    ([DEMO, "not a dict"], "demo 1"),
    ([{"input": "x", "output": 3}], "must be a string"),
    ([{"input": [{"type": "image", "image": None}], "output": "x"}], "vision-language"),
])
def test_bad_demos(model, demos, message):
    comp = emloc.EMLoC(model, chat_tokenizer(), progress=False)
    with pytest.raises(emloc.EMLoCError, match=message):
        comp.compress(demos)


def test_error_is_a_value_error():
    assert issubclass(emloc.EMLoCError, ValueError)


def test_context_longer_than_the_model_can_position(model):
    comp = emloc.EMLoC(model, chat_tokenizer(), progress=False)
    with pytest.raises(emloc.EMLoCError, match="positions"):
        comp.compress([DEMO] * 40)


def test_query_past_the_positions(model):
    comp = emloc.EMLoC(model, chat_tokenizer(), method="full", progress=False)
    memory = comp.compress([DEMO] * 8)
    with pytest.raises(emloc.EMLoCError, match="positions"):
        comp.generate(memory, "q", max_new_tokens=200)


def test_tokenizer_without_chat_template(model):
    tok = chat_tokenizer()
    bare = type(tok)(tokenizer_object=tok.backend_tokenizer)
    with pytest.raises(emloc.EMLoCError, match="chat template"):
        emloc.EMLoC(model, bare)


def test_unsupported_models():
    from transformers import BertConfig, BertModel, T5Config, T5ForConditionalGeneration
    tok = chat_tokenizer()
    encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, vocab_size=100))
    with pytest.raises(emloc.EMLoCError, match="unsupported model"):
        emloc.EMLoC(encoder, tok)
    seq2seq = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=32, num_layers=1, num_heads=2, vocab_size=100))
    with pytest.raises(emloc.EMLoCError, match="unsupported model"):
        emloc.EMLoC(seq2seq, tok)
    with pytest.raises(emloc.EMLoCError, match="unsupported model"):
        emloc.EMLoC(torch.nn.Linear(2, 2), tok)


def test_single_demo_chunks_and_uneven_division(model):
    demos = [DEMO, {"input": "bad", "output": "negative"}, {"input": "ok", "output": "neutral"}]
    for dpc in (1, 2, 5):
        memory = emloc.EMLoC(model, chat_tokenizer(), demos_per_chunk=dpc, progress=False).compress(demos)
        assert len(memory.stats) == -(-3 // dpc)
        assert sum(c["demos"] for c in memory.stats) == 3


def test_bad_answer_arguments(model):
    comp = emloc.EMLoC(model, chat_tokenizer(), progress=False)
    memory = comp.compress([DEMO])
    with pytest.raises(emloc.EMLoCError, match="max_new_tokens"):
        comp.generate(memory, "q", max_new_tokens=0)
    with pytest.raises(emloc.EMLoCError, match="TaskMemory"):
        comp.generate("not a memory", "q")
    with pytest.raises(emloc.EMLoCError, match="no queries"):
        comp.generate(memory, [])
    with pytest.raises(emloc.EMLoCError, match="continuation"):
        comp.logits(memory, "q", continuation=3)
