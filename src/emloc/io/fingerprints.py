"""What a memory records of the model and tokenizer it was made with, and how two such
records are compared."""
from __future__ import annotations

import hashlib
import json

TOKENIZER_KEY = "tokenizer"  # the fingerprint's entry that identifies the tokenizer
_TOKENIZER_PROBE = "The capital of France is Paris. 0123456789 naïve café 東京 \t\n <tag> x=y+1;"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer for a memory: vocabulary size, special token ids, a hash of
    the chat template, and a hash of the ids a fixed probe text is split into."""
    template = tokenizer.chat_template
    if not isinstance(template, str):
        template = json.dumps(template, sort_keys=True)
    probe = tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    return {"vocab_size": len(tokenizer),
            "special_ids": {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
                            "pad": tokenizer.pad_token_id},
            "chat_template_sha256": _sha(template or ""),
            "probe_ids_sha256": _sha(json.dumps(list(probe)))}


def fingerprint_diff(stored: dict, expected: dict) -> dict:
    """{key: (stored value, expected value)} for every key where the two fingerprints differ."""
    return {k: (stored.get(k), expected.get(k)) for k in sorted(set(stored) | set(expected))
            if stored.get(k) != expected.get(k)}


def model_part(fingerprint: dict) -> dict:
    """The model's entries of a memory fingerprint (everything but the tokenizer's)."""
    return {k: v for k, v in fingerprint.items() if k != TOKENIZER_KEY}
