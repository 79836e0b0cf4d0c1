"""End to end on the real pretrained SmolLM2-135M (bundled GGUF, offline)."""
import pytest

import emloc
from emloc.cli.demo import load_task
from emloc.models import load_model


@pytest.fixture(scope="module")
def smollm2():
    return load_model()


def test_compress_and_answer_a_real_task(smollm2):
    model, tokenizer = smollm2
    rows = load_task()
    comp = emloc.EMLoC(model, tokenizer, demos_per_chunk=3, progress=False)
    memory = comp.compress(rows[:6], system="Answer with the name of the capital city only.")
    assert len(memory.stats) == 2
    assert memory.compression_ratio > 1.0
    assert all(0 < n <= memory.context_length for n in memory.layer_lengths)
    answers = comp.generate(memory, [r["input"] for r in rows[6:9]], max_new_tokens=8)
    assert len(answers) == 3 and all(isinstance(a, str) and a for a in answers)
    # the end-of-turn token ends the answer: short capital names, not rambling text
    assert all(len(a.split()) <= 4 for a in answers)
