"""Layer-by-layer access to a stock transformers decoder, without copying model code.

The compressor restarts forwards at any layer, so it drives the model's own modules
(embedding, rotary embedding, decoder layers, final norm, lm_head) one by one. Attention inside
every layer is routed to emloc's registered attention function (see attention.py) for the
duration of a call.
"""
from __future__ import annotations

import contextlib

import torch

from .attention import ATTENTION_NAME
from .errors import EMLoCError


class DecoderAdapter:
    """The parts of a causal LM that emloc drives, plus its shapes.

    Attributes: n_layers, n_heads, n_kv_heads, head_dim, hidden_size, vocab_size,
    max_positions, dtype, device.
    """

    def __init__(self, model):
        self.model = model
        config = getattr(model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            raise EMLoCError(f"unsupported model {type(model).__name__}: emloc needs a decoder-only "
                             "transformers causal LM (Llama, Qwen2/3, Mistral families)")
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            decoder = model.get_decoder()
            self.embed_tokens = decoder.embed_tokens
            self.layers = decoder.layers
            self.norm = decoder.norm
            self.rotary_emb = decoder.rotary_emb
            self.lm_head = model.get_output_embeddings()
            attn0 = self.layers[0].self_attn
        except (AttributeError, IndexError, TypeError, NotImplementedError):
            raise EMLoCError(
                f"unsupported model {type(model).__name__}: emloc needs a decoder with embed_tokens, "
                "layers[i].self_attn, norm, rotary_emb and an lm_head (Llama-style models)") from None
        if self.lm_head is None or getattr(self.lm_head, "bias", None) is not None:
            raise EMLoCError(f"unsupported model {type(model).__name__}: the lm_head must be a linear "
                             "layer without bias")
        if getattr(self.config, "final_logit_softcapping", None):
            raise EMLoCError(f"unsupported model {type(model).__name__}: logit soft-capping is not supported")
        c = self.config
        self.n_layers = len(self.layers)
        self.n_heads = c.num_attention_heads
        self.n_kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.hidden_size = c.hidden_size
        self.vocab_size = self.lm_head.weight.shape[0]
        self.max_positions = getattr(c, "max_position_embeddings", None) or 2**31
        self.scaling = getattr(attn0, "scaling", self.head_dim ** -0.5)
        self.dtype = self.lm_head.weight.dtype
        self.device = self.lm_head.weight.device

    # -- routing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def emloc_attention(self):
        """Route every attention call of the model to emloc's function while inside."""
        configs = {id(c): c for c in (self.model.config, self.config)}.values()
        saved = [(c, c._attn_implementation) for c in configs]
        try:
            for c, _ in saved:
                c._attn_implementation = ATTENTION_NAME
            with torch.inference_mode():
                yield
        finally:
            for c, impl in saved:
                c._attn_implementation = impl

    # -- pieces of the forward -------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] int64 -> [B, T, H] hidden states in the model dtype."""
        return self.embed_tokens(ids.to(self.embed_tokens.weight.device))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) for [B, T] absolute positions."""
        return self.rotary_emb(hidden, positions)

    def run_layers(self, hidden, positions, rotary, start: int, stop: int, plan, on_layer_input=None):
        """Run decoder layers [start, stop) on hidden [B, T, H] with attention plan `plan`.

        on_layer_input(l, hidden) is called with the input of each layer (for restarts).
        """
        for l in range(start, stop):
            if on_layer_input is not None:
                on_layer_input(l, hidden)
            out = self.layers[l](hidden, attention_mask=None, position_ids=positions,
                                 position_embeddings=rotary, emloc_plan=plan)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden [..., H] -> fp32 logits [..., V] (the model's own lm_head)."""
        return self.lm_head(hidden).float()

    def fingerprint(self) -> dict:
        """What identifies the model a memory belongs to (architecture, sizes, dtype, weights)."""
        w = self.embed_tokens.weight
        probe = w[:: max(1, w.shape[0] // 64), :8].detach().float().cpu()
        return {
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", ""),
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_checksum": round(float(probe.double().abs().sum()), 6),
        }
