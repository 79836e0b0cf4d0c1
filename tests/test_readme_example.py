"""The README's runnable vision-language example runs as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_vision_language_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("### Vision-language models", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(README.parent)  # the example puts tests/ on sys.path relative to the checkout
    code = code.replace('"shapes.emloc"', repr(str(tmp_path / "shapes.emloc")))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("TaskMemory(layers=2") and "image tokens kept in layer 0:" in out[0]
    assert len(out) == 2 and (tmp_path / "shapes.emloc").is_file()
