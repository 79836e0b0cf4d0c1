"""Answer spans are found by rendering the chat template."""
from emloc.models.rendering import ChatRenderer
from tiny_models import chat_tokenizer


def test_answer_spans_cover_opener_answer_and_end_of_turn():
    tok = chat_tokenizer()
    demos = [{"input": "great movie", "output": "positive"}, {"input": "bad", "output": "negative words"}]
    seq = ChatRenderer(tok).demos(demos, system=False)
    assert len(seq.spans) == 2
    for (start, end), demo in zip(seq.spans, demos):
        pieces = tok.convert_ids_to_tokens(seq.ids[start:end])
        assert pieces[0] == "Ċ"  # the newline that closes "<|im_start|>assistant"
        assert tok.decode(seq.ids[:start]).endswith("<|im_start|>assistant")
        assert pieces[-1] == "<|im_end|>"
        assert tok.decode(seq.ids[start + 1:end - 1]) == demo["output"]
    assert not tok.decode(seq.ids).startswith("<|im_start|>system")


def test_explicit_system_message_opens_the_sequence():
    tok = chat_tokenizer()
    seq = ChatRenderer(tok).demos([{"input": "a", "output": "b"}], system="Be brief.")
    assert tok.decode(seq.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
