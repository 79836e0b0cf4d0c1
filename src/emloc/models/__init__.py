"""The model side: loading (the bundled SmolLM2, folders, GGUF files), layer-by-layer access to a
stock transformers decoder (adapter, vision-language), and chat rendering of demos and queries."""
from emloc.models.loading import bundled_model_path, config_fingerprint, load_model, model_path

__all__ = ["bundled_model_path", "config_fingerprint", "load_model", "model_path"]
