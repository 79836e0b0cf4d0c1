"""The user's docs stay true: links resolve, nothing points outside the repository, and every
name docs/API.md uses on emloc, EMLoC and TaskMemory exists."""
import re
from pathlib import Path

import emloc

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "API.md"


def test_readme_links_resolve_and_nothing_points_outside_the_repository():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#:]+)\)", readme)
    assert "docs/API.md" in links and "docs/ALGORITHM.md" in links
    for link in links:
        assert (ROOT / link).exists(), link
    files = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("src/**/*.py")]
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/shared" not in text, path


def test_every_name_the_api_uses_exists():
    text = API.read_text(encoding="utf-8")
    memory = emloc.TaskMemory([], offset=0, context_length=0, fingerprint={}, settings={}, stats=[])
    owners = {"emloc": emloc, "comp": emloc.EMLoC, "memory": memory, "emloc.TaskMemory": emloc.TaskMemory}
    used = set(re.findall(r"\b(emloc\.TaskMemory|emloc|comp|memory)\.([a-z_][A-Za-z_]*)", text))
    assert len(used) > 15
    missing = [f"{owner}.{name}" for owner, name in used
               if not hasattr(owners[owner], name) and not (owner == "emloc" and name in ("cache", "models"))]
    assert not missing
    assert {"as_cache", "query_inputs", "routed"} <= {name for _, name in used}
