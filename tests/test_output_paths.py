"""Where outputs go: folders get a default name, nothing is created, files replace the old one only
when complete (memory files, answers, plots), and a failed write leaves the old file as it was."""
import hashlib
import json
import resource
import signal

import pytest

import emloc
from emloc.cli.commands import main
from emloc.io.output_files import atomic_write, output_path
from test_cli import save_model, write_jsonl
from tiny_models import chat_tokenizer, tiny_model

DEMOS = [{"input": f"review {i}: {'great' if i % 2 else 'terrible'}", "output": "positive" if i % 2 else "negative"}
         for i in range(4)]
QUERIES = [{"input": "boring plot", "id": 1}, {"input": "great actors", "id": 2}]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    w = {"tmp": tmp, "model": save_model(tmp / "model"), "demos": write_jsonl(tmp / "demos.jsonl", DEMOS),
         "queries": write_jsonl(tmp / "queries.jsonl", QUERIES)}
    (tmp / "out").mkdir()
    assert main(["compress", "--demos", w["demos"], "--out", str(tmp / "out") + "/", "--model", w["model"],
                 "--quiet", "--demos-per-chunk", "2"]) == 0
    w["memory"] = tmp / "out" / "demos.emloc"
    return w


def test_a_trailing_separator_or_an_existing_folder_means_into_that_folder(work, capsys):
    assert work["memory"].is_file()  # `--out out/` wrote out/demos.emloc
    code = main(["answer", "--memory", str(work["memory"]), "--model", work["model"], "--queries", work["queries"],
                 "--max-new-tokens", "2", "--quiet", "--out", str(work["tmp"] / "out")])
    assert code == 0, capsys.readouterr().err
    answers = work["tmp"] / "out" / "queries.answers.jsonl"
    assert [json.loads(line)["id"] for line in answers.read_text().splitlines()] == [1, 2]
    assert main(["inspect", str(work["memory"]), "--plot", str(work["tmp"] / "out") + "/"]) == 0
    assert (work["tmp"] / "out" / "demos.retention.png").read_bytes()[:4] == b"\x89PNG"


def test_a_trailing_separator_on_a_missing_folder_creates_nothing(work, capsys):
    missing = work["tmp"] / "missing"
    code = main(["compress", "--demos", work["demos"], "--out", str(missing) + "/", "--model", work["model"]])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not missing.exists() and not (work["tmp"] / "missing.emloc").exists()


def test_answers_replace_the_old_file_only_when_complete(work, capsys):
    out = work["tmp"] / "answers.jsonl"
    out.write_text("old\n")
    code = main(["answer", "--memory", str(work["memory"]), "--model", work["model"], "--queries", work["queries"],
                 "--max-new-tokens", "2", "--quiet", "--out", str(out)])
    assert code == 0 and len(out.read_text().splitlines()) == 2
    assert sorted(p.name for p in work["tmp"].iterdir() if p.name.startswith(".")) == []


def file_size_limit(limit: int):
    """Context: writes past `limit` bytes fail with EFBIG (as a full disk fails with ENOSPC)."""
    import contextlib

    @contextlib.contextmanager
    def limited():
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
    return limited()


def test_a_full_disk_while_writing_answers_keeps_the_old_file(work, capsys):
    out = work["tmp"] / "kept.jsonl"
    out.write_text('{"old": 1}\n')
    before = digest(out)
    with file_size_limit(20):
        code = main(["answer", "--memory", str(work["memory"]), "--model", work["model"], "--queries",
                     work["queries"], "--max-new-tokens", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "could not write" in err and "unchanged" in err, err
    assert digest(out) == before and not list(work["tmp"].glob(".kept.jsonl.*"))


def test_a_full_disk_while_saving_a_memory_keeps_the_old_file(work):
    model = tiny_model("llama", n_layers=2, std=0.2, seed=1)
    memory = emloc.EMLoC(model, chat_tokenizer(), method="full", progress=False).compress(DEMOS[:2])
    path = work["tmp"] / "full.emloc"
    memory.save(path)
    before = digest(path)
    with file_size_limit(1000), pytest.raises(emloc.EMLoCError, match="could not write.*unchanged"):
        memory.save(path)
    assert digest(path) == before and not list(work["tmp"].glob(".full.emloc.*"))
    emloc.TaskMemory.load(path, model)


def test_atomic_write_leaves_nothing_on_an_error_in_the_block(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_write(target) as out:
            out.write("new")
            raise KeyError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]
    with atomic_write(target) as out:
        out.write("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_output_path_rules(tmp_path):
    assert output_path(tmp_path / "a.emloc") == tmp_path / "a.emloc"
    assert output_path(f"{tmp_path}/sub/", default_name="d.emloc") == tmp_path / "sub" / "d.emloc"
    assert output_path(tmp_path, default_name="d.emloc") == tmp_path / "d.emloc"
    for bad in ("", "  ", tmp_path, f"{tmp_path}/", 3):
        with pytest.raises(emloc.EMLoCError):
            output_path(bad)


def test_a_destination_without_room_for_the_memory_is_refused_before_compressing(work, capsys, monkeypatch):
    """The bound is the uncompressed context's size; free space below it fails before any chunk."""
    import shutil

    from emloc.engine import EMLoC

    def never(*args, **kwargs):
        raise AssertionError("compression started")

    monkeypatch.setattr(EMLoC, "compress", never)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
    out = work["tmp"] / "no-room.emloc"
    code = main(["compress", "--demos", work["demos"], "--out", str(out), "--model", work["model"], "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "MiB free" in err and "may take up to" in err, err
    assert not out.exists()
