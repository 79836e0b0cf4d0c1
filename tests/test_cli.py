"""The `emloc` command line end to end on a tiny model saved in a temporary folder."""
import json
import sys

import pytest

import emloc
import emloc.io.memory
from emloc.cli.commands import main
from emloc.models import load_model
from tiny_models import CHATML_TEMPLATE, chat_tokenizer, tiny_model

DEMOS = [{"input": f"review {i}: the movie was {'great' if i % 2 else 'terrible'}",
          "output": "positive" if i % 2 else "negative"} for i in range(8)]
QUERIES = [{"input": "the plot was boring", "id": 1}, {"input": "wonderful actors", "id": 2},
           {"input": "great movie", "id": 3}]


def save_model(folder, seed=7, template=CHATML_TEMPLATE):
    tiny_model("llama", n_layers=3, std=0.2, seed=seed).save_pretrained(folder)
    tokenizer = chat_tokenizer()
    saved_template = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = saved_template
    return str(folder)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return {"tmp": tmp, "model": save_model(tmp / "model"), "demos": write_jsonl(tmp / "demos.jsonl", DEMOS),
            "queries": write_jsonl(tmp / "queries.jsonl", QUERIES), "memory": str(tmp / "task.emloc")}


@pytest.fixture(scope="module")
def compressed(work):
    code = main(["compress", "--demos", work["demos"], "--out", work["memory"], "--model", work["model"],
                 "--system", "Classify.", "--quiet"])
    assert code == 0
    return work


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_inspect_answer(compressed, capsys):
    w = compressed
    model, tokenizer = load_model(w["model"])
    memory = emloc.TaskMemory.load(w["memory"], model)
    assert memory.context_length > 0 and len(memory.stats) == 2

    png = w["tmp"] / "retention.png"
    code, out, _ = run(capsys, ["inspect", w["memory"], "--plot", str(png)])
    assert code == 0
    assert f"context tokens: {memory.context_length}, chunks: 2" in out
    assert "header and 9 tensors match their SHA-256 checksums" in out
    for l, kept in enumerate(memory.layer_lengths):
        assert f"{l:>5} {kept:>7} " in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    expected = emloc.EMLoC(model, tokenizer, progress=False).generate(
        memory, [q["input"] for q in QUERIES], max_new_tokens=5)
    code, out, _ = run(capsys, ["answer", "--memory", w["memory"], "--queries", w["queries"], "--model",
                                w["model"], "--max-new-tokens", "5", "--batch-size", "2", "--quiet"])
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows == [{**q, "answer": a} for q, a in zip(QUERIES, expected)]

    code, out, _ = run(capsys, ["answer", "--memory", w["memory"], "--query", QUERIES[1]["input"],
                                "--model", w["model"], "--max-new-tokens", "5"])
    assert code == 0 and out == expected[1] + "\n"

    answers = w["tmp"] / "answers.jsonl"
    code, _, err = run(capsys, ["answer", "--memory", w["memory"], "--queries", w["queries"], "--model",
                                w["model"], "--max-new-tokens", "5", "--out", str(answers)])
    assert code == 0 and "answering" in err  # the progress bar
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == expected


def one_line_error(capsys, argv, message):
    code, out, err = run(capsys, argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("emloc: error: ") and message in err, err
    return err


def test_user_errors_exit_2_with_one_line(compressed, capsys):
    w, tmp = compressed, compressed["tmp"]
    bad_jsonl = tmp / "bad.jsonl"
    bad_jsonl.write_text('{"input": "ok"}\n{"input": oops}\n', encoding="utf-8")
    damaged = tmp / "damaged.emloc"
    damaged.write_bytes(open(w["memory"], "rb").read()[:500])
    answer = ["answer", "--memory", w["memory"], "--model", w["model"]]
    one_line_error(capsys, ["answer", "--memory", str(tmp / "missing.emloc"), "--query", "q"], "no memory file")
    one_line_error(capsys, ["answer", "--memory", str(damaged), "--query", "q"], "damaged or truncated")
    one_line_error(capsys, answer + ["--queries", str(bad_jsonl)], "bad.jsonl:2 is not valid JSON")
    one_line_error(capsys, answer + ["--queries", str(tmp / "none.jsonl")], "no queries file")
    one_line_error(capsys, ["answer", "--memory", w["memory"], "--model", str(tmp / "no-model"), "--query", "q"],
                   "no model at")
    one_line_error(capsys, answer, "exactly one of --query")
    one_line_error(capsys, answer + ["--query", "q", "--top-p", "0.5"], "--temperature > 0")
    one_line_error(capsys, ["compress", "--demos", str(bad_jsonl), "--out", str(tmp / "x.emloc"),
                            "--model", w["model"]], 'bad.jsonl:1 needs a non-empty string "output"')
    one_line_error(capsys, ["inspect", str(tmp / "missing.emloc")], "no memory file")
    assert run(capsys, ["frobnicate"])[0] == 2
    assert run(capsys, ["answer", "--query", "q"])[0] == 2  # --memory is required


def test_memory_with_another_model_or_tokenizer_exits_2(compressed, capsys):
    w, tmp = compressed, compressed["tmp"]
    other_weights = save_model(tmp / "other-weights", seed=8)
    other_template = save_model(tmp / "other-template", template=CHATML_TEMPLATE.replace("tiny", "small"))
    for folder, message in ((other_weights, "another model"), (other_template, "another tokenizer")):
        one_line_error(capsys, ["answer", "--memory", w["memory"], "--model", folder, "--query", "q"], message)


def test_plot_without_matplotlib_tells_how_to_install(compressed, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    png = compressed["tmp"] / "never.png"
    one_line_error(capsys, ["inspect", compressed["memory"], "--plot", str(png)], "pip install matplotlib")
    assert not png.exists()


def test_unexpected_error_exits_1_with_one_line(compressed, capsys, monkeypatch):
    def boom(path):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(emloc.io.memory, "read_header", boom)
    monkeypatch.delenv("EMLOC_DEBUG", raising=False)
    code, _, err = run(capsys, ["inspect", compressed["memory"]])
    assert code == 1 and err.count("\n") == 1 and "RuntimeError: disk on fire" in err


def test_help_documents_exit_codes(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0 and "exit codes:" in out and "emloc compress --demos" in out
    for command in ("compress", "answer", "inspect"):
        code, out, _ = run(capsys, [command, "--help"])
        assert code == 0 and "exit codes:" in out and "example" in out


# -- a vision-language model: images referenced by paths relative to the JSONL ----------------
def test_vision_language_compress_inspect_answer(tmp_path, capsys, monkeypatch):
    """compress -> inspect -> answer with image demos and queries on a tiny Qwen2-VL (the
    processor is built in code: the loader is replaced, everything else is the real CLI)."""
    import emloc.models
    from tiny_vl_models import tiny_images, tiny_vl_model, tiny_vl_processor

    model, processor = tiny_vl_model("qwen2_vl", std=0.2), tiny_vl_processor("qwen2_vl")
    monkeypatch.setattr(emloc.models, "load_model", lambda path=None, before_weights=None: (model, processor))
    (tmp_path / "img").mkdir()
    images = tiny_images(((56, 56), (84, 56), (56, 84), (112, 56), (56, 56)), seed=3)
    for i, image in enumerate(images):
        image.save(tmp_path / "img" / f"{i}.png")
    demos = [{"input": [{"type": "image", "image": f"img/{i}.png"}, {"type": "text", "text": f"shape {i}?"}],
              "output": ["round", "square"][i % 2]} for i in range(4)]
    queries = [{"input": [{"type": "image", "image": "img/4.png"}, {"type": "text", "text": "shape?"}], "id": 7}]
    memory_path = str(tmp_path / "task.emloc")
    assert main(["compress", "--demos", write_jsonl(tmp_path / "demos.jsonl", demos), "--out", memory_path,
                 "--demos-per-chunk", "2", "--quiet"]) == 0
    memory = emloc.TaskMemory.load(memory_path, model)
    image_tokens = sum(chunk["image_tokens"] for chunk in memory.stats)
    assert image_tokens == sum(w * h // 784 for w, h in ((56, 56), (84, 56), (56, 84), (112, 56)))

    code, out, _ = run(capsys, ["inspect", memory_path])
    assert code == 0 and f"context image tokens: {image_tokens}" in out and "kept image" in out

    comp = emloc.EMLoC(model, processor, progress=False)
    query = [{"type": "image", "image": images[4]}, {"type": "text", "text": "shape?"}]
    expected = comp.generate(memory, query, max_new_tokens=4)
    code, out, _ = run(capsys, ["answer", "--memory", memory_path, "--queries",
                                write_jsonl(tmp_path / "queries.jsonl", queries), "--max-new-tokens", "4", "--quiet"])
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == [{**queries[0], "answer": expected}]
    code, out, _ = run(capsys, ["answer", "--memory", memory_path, "--query", "shape?", "--image",
                                str(tmp_path / "img" / "4.png"), "--max-new-tokens", "4"])
    assert code == 0 and out == expected + "\n"
    one_line_error(capsys, ["answer", "--memory", memory_path, "--query", "shape?", "--image",
                            str(tmp_path / "img" / "missing.png")], "no image file")
