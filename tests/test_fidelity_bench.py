"""bench/fidelity.py: metrics on known answers, and smoke runs on a tiny random model."""
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
    label_ids = [2, 0]  # "neg" starts with token 2, "pos" with token 0
    reference = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0], [2.0, 1.0, 0.0],
                                                [0.0, 2.0, 0.0]]), -1)
    answers = torch.log_softmax(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 2.0],
                                              [1.0, 2.0, 0.0]]), -1)
    m = fidelity.metrics(answers, reference, task, label_ids)
    assert m["top1"] == 0.5         # rows 0 and 3 agree; 1 and 2 differ
    assert m["accuracy"] == 0.5     # token 0 vs token 2: pos, neg, neg, pos against pos, neg, pos, neg
    assert m["js"] == pytest.approx(float(fidelity.js_divergence(reference, answers).mean())) and m["js"] > 0
    assert fidelity.metrics(reference, reference, task, label_ids) == {"js": 0.0, "top1": 1.0, "accuracy": 1.0}


@pytest.fixture
def one_thread():
    """The benchmark's own setting (--threads 1): many tiny ops, on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_of_one_task_on_a_tiny_model(tmp_path, one_thread):
    model, tokenizer = tiny_model(std=0.2, seed=3), chat_tokenizer()
    (task,) = fidelity.load_tasks(["sentiment"])
    assert len(task.queries) >= 100 and set(task.labels) == {q["output"] for q in task.queries}
    task.demos, task.queries = task.demos[:8], task.queries[:3]
    rows, reference = fidelity.run_task(model, tokenizer, task, ratios=(0.5,), deltas=(0.05,),
                                        presets=("faithful", "sink-recent"), log=lambda *a: None)
    assert [r["method"] for r in rows] == ["zero-shot", "full", *fidelity.FIXED_METHODS, "emloc", "preset sink-recent"]
    assert reference.shape == (3, model.config.vocab_size)
    by = {r["method"]: r for r in rows}
    assert (by["full"]["js"], by["full"]["top1"], by["full"]["kept"]) == (0.0, 1.0, 1.0)
    assert by["zero-shot"]["js"] > 0
    for method in ("snapkv", "tova", "streaming", "uniform"):
        assert by[method]["kept"] == pytest.approx(0.5, abs=0.05)
    assert by["snapkv"]["chunks"] == 1 and by["uniform"]["chunks"] == 2
    assert by["emloc"]["setting"] == by["preset sink-recent"]["setting"] == "tolerance=0.05"
    for r in rows:
        assert 0.0 <= r["js"] <= math.log(2.0) + 1e-12 and 0.0 <= r["accuracy"] <= 1.0
    page = fidelity.markdown(rows, [], "test")
    assert "## sentiment" in page and page.count("| snapkv |") == 1
    fidelity.write_csv(rows, tmp_path / "fidelity.csv")
    with (tmp_path / "fidelity.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    again, sweep = fidelity.read_csv([tmp_path / "fidelity.csv", tmp_path / "fidelity.csv"])  # repeats dropped
    assert sweep == [] and [(r["method"], r["js"], r["chunks"]) for r in again] == [
        (r["method"], pytest.approx(r["js"]), r["chunks"]) for r in rows]


def test_child_measures_peak_memory_and_metrics(monkeypatch, one_thread, tmp_path):
    import emloc.models

    model, tokenizer = tiny_model(std=0.2, seed=3), chat_tokenizer()
    monkeypatch.setattr(emloc.models, "load_model", lambda path=None: (model, tokenizer))
    (task,) = fidelity.load_tasks(["region"])
    task.demos, task.queries = task.demos[:8], task.queries[:2]
    from emloc import EMLoC
    comp = EMLoC(model, tokenizer, method="full", progress=False)
    reference = fidelity.first_token_logprobs(comp, comp.compress(task.demos, system=task.system), task)
    torch.save(reference, tmp_path / "ref.pt")
    spec = {"task": "region", "demos": 8, "queries": 2, "backend": "torch", "threads": 1, "reference": str(tmp_path / "ref.pt"),
            "settings": {"method": "full", "demos_per_chunk": 4}}
    result = fidelity.child_main(spec)
    assert (result["js"], result["top1"], result["kept"], result["chunks"]) == (0.0, 1.0, 1.0, 2)
    assert result["peak_mb"] >= 0 and result["memory_mb"] > 0
