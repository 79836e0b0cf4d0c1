"""Every ```python block of the README runs as written, in order, in one namespace.

The blocks run in a temporary folder (files they write land there) that links the checkout's
tests/ folder (the vision-language example imports its tiny model from "tests"). The bundled
model is loaded once for the session (tests/real_model.py) and handed to load_model() calls.
"""
import re
from pathlib import Path

import pytest

import emloc.models
from real_model import smollm2

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


@pytest.mark.slow
def test_every_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 3  # the Python use, the transformers interop, the vision-language example
    (tmp_path / "tests").symlink_to(README.parent / "tests", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    real_load = emloc.models.load_model
    monkeypatch.setattr(emloc.models, "load_model", lambda path=None: smollm2() if path is None else real_load(path))
    namespace = {"__name__": "readme_example"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "TaskMemory(layers=2" in out and "image tokens kept in layer 0:" in out  # the VL example printed
    assert (tmp_path / "task.emloc").is_file() and (tmp_path / "shapes.emloc").is_file()
