"""bench/fidelity.py: metrics on known answers, and a smoke run of one task on a tiny random model."""
import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import chat_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("fidelity_bench", ROOT / "bench" / "fidelity.py")
fidelity = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fidelity  # dataclasses look their module up
_spec.loader.exec_module(fidelity)


def test_js_divergence_known_values():
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]]).log()
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]).log()
    js = fidelity.js_divergence(p, q)
    # row 0 by hand: m = (0.75, 0.25); JS = 0.5 KL(p || m) + 0.5 KL(q || m)
    by_hand = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert js[0].item() == pytest.approx(by_hand, rel=1e-9)
    assert js[1].item() == pytest.approx(math.log(2.0), rel=1e-9)  # disjoint supports: the maximum
    assert js[2].item() == 0.0
    assert torch.equal(js, fidelity.js_divergence(q, p))


def test_metrics_on_known_answers():
    task = fidelity.Task("t", "system", ["neg", "pos"], [], [{"input": f"q{i}", "output": o}
                                                               for i, o in enumerate(["pos", "neg", "pos", "neg"])])
    first = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]]), -1)
    reference = fidelity.Answers(first, torch.tensor([[-2.0, -1.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -3.0]]),
                                 ["pos", "neg", "pos", "neg"])
    answers = fidelity.Answers(first.flip(0), torch.tensor([[-2.0, -1.0], [-3.0, -1.0], [-3.0, -1.0], [-1.0, -3.0]]),
                               [" POS ", "pos", "Pos", "neg."])
    m = fidelity.metrics(answers, reference, task)
    assert m["acc_ll"] == 0.75          # predicts pos, pos, pos, neg against pos, neg, pos, neg
    assert m["acc_gen"] == 0.5          # " POS " and "Pos" match after strip/lower; "neg." does not
    assert m["label_agree"] == 0.5      # the reference predicts pos, neg, neg, neg
    assert m["top1"] == 0.5             # rows 0 and 3 are swapped: same argmax; rows 1 and 2 differ
    assert m["js"] == pytest.approx(float(fidelity.js_divergence(first, first.flip(0)).mean()))
    assert m["js"] > 0
    same = fidelity.metrics(reference, reference, task)
    assert (same["js"], same["top1"], same["label_agree"]) == (0.0, 1.0, 1.0)

    # every query prefers "pos" (a biased context); the margins still order them: calibration helps
    biased = fidelity.Answers(first, torch.tensor([[-3.0, -1.0], [-2.0, -1.5], [-2.5, -1.2], [-1.6, -1.4]]),
                              ["pos"] * 4)
    m = fidelity.metrics(biased, reference, task)
    assert (m["acc_ll"], m["acc_cal"]) == (0.5, 1.0)


@pytest.fixture
def one_thread():
    """The benchmark's own setting (--threads 1): many tiny ops, on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_on_a_tiny_model(tmp_path, one_thread):
    model, tokenizer = tiny_model(), chat_tokenizer()
    (task,) = fidelity.load_tasks(["sentiment"])
    assert len(task.queries) >= 100 and set(task.labels) == {q["output"] for q in task.queries}
    task.demos, task.queries = task.demos[:8], task.queries[:3]
    rows = fidelity.run_task(model, tokenizer, task, delta=0.005, sweep=(0.005, 0.05), log=lambda *a: None)

    assert [(r["method"], r["delta"]) for r in rows] == [
        ("zero-shot", None), ("full", None), ("emloc", 0.005), ("emloc", 0.05), ("uniform", None), ("pyramid", None)]
    assert all(set(fidelity.COLUMNS) <= set(r) for r in rows)
    by = {(r["method"], r["delta"]): r for r in rows}
    full, emloc = by[("full", None)], by[("emloc", 0.005)]
    assert (full["js"], full["top1"], full["label_agree"], full["compression"]) == (0.0, 1.0, 1.0, 1.0)
    assert emloc["compression"] > 1.0
    assert by[("uniform", None)]["keep_ratio"] == pytest.approx(1 / emloc["compression"])
    for r in rows:
        assert 0.0 <= r["acc_ll"] <= 1.0 and 0.0 <= r["js"] <= math.log(2.0) + 1e-12

    # label log-likelihoods from the full memory (a one-token label read from row 0, a longer one
    # scored as a continuation) equal the plain model run on the uncompressed sequence
    from emloc import EMLoC
    comp = EMLoC(model, tokenizer, method="full", progress=False)
    memory = comp.compress(task.demos, system=task.system)
    mixed = fidelity.Task("mixed", task.system, ["1", "positive"], task.demos, task.queries[:1])
    answers = fidelity.answer_from_memory(comp, memory, mixed, max_new_tokens=2)
    ids = comp.full_inputs(task.demos, mixed.queries[0]["input"], system=task.system)["input_ids"][0].tolist()
    for j, label in enumerate(mixed.labels):
        label_ids = tokenizer(label, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + label_ids])).logits[0, len(ids) - 1:-1]
        direct = torch.log_softmax(logits, -1)[torch.arange(len(label_ids)), label_ids].sum()
        assert answers.label_ll[0, j].item() == pytest.approx(direct.item(), abs=1e-4)
    assert [len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in mixed.labels][0] == 1

    page = fidelity.markdown(rows)
    assert "## Headline" in page and "## δ sweep" in page and "## Targets" in page
    fidelity.write_csv(rows, tmp_path / "fidelity.csv")
    with (tmp_path / "fidelity.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == fidelity.COLUMNS
        assert len(list(reader)) == len(rows)
