"""Layer-by-layer access to a stock transformers decoder, without copying model code.

The compressor restarts forwards at any layer, so it drives the model's own modules
(embedding, rotary embedding, decoder layers, final norm, lm_head) one by one. Attention inside
every layer is routed to emloc's registered attention function (see attention.py) for the
duration of a call.

Models split over several devices (`device_map`, accelerate) are driven module by module: each
piece runs on the device of its own weights (or its accelerate hook's execution device), and
hidden states, positions and rotary tables are moved to it before it runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import math

import torch

from emloc.serving.attention import ATTENTION_NAME
from emloc.errors import EMLoCError

# model types (config.model_type) whose equivalence with the model's own forward is tested;
# others may scale embeddings or logits outside the modules emloc drives (Granite, Cohere, ...)
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "qwen2_vl", "qwen2_5_vl")
FINGERPRINT_SAMPLES = 4096  # values hashed per weight tensor


def module_device(module) -> torch.device:
    """The device a module computes on: its accelerate hook's execution device, else the device
    of its first parameter or buffer (CPU for a module with neither)."""
    hook_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if hook_device is not None:
        return torch.device(hook_device)
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _current_device(device: torch.device):
    """Make a CUDA `device` current inside the block (kernels launch there); no-op otherwise."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class DecoderAdapter:
    """The parts of a causal LM that emloc drives, plus its shapes.

    Attributes: n_layers, n_heads, n_kv_heads, head_dim, hidden_size, vocab_size,
    max_positions, dtype, device (the lm_head's: logits and decoding state live there),
    layer_devices (list[torch.device], where each decoder layer runs; its memory lives there).
    """

    def __init__(self, model):
        self.model = model
        config = getattr(model, "config", None)
        if config is None or getattr(config, "is_encoder_decoder", False):
            raise EMLoCError(f"unsupported model {type(model).__name__}: emloc needs a decoder-only "
                             "transformers causal LM (Llama, Qwen2/3, Mistral families) or "
                             "Qwen2-VL / Qwen2.5-VL")
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise EMLoCError(f"unsupported model type {getattr(config, 'model_type', None)!r} "
                             f"({type(model).__name__}): emloc is tested on {', '.join(SUPPORTED_MODEL_TYPES)} "
                             "only; other families may scale embeddings or logits where emloc cannot see")
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
        self.device = module_device(self.lm_head)
        self.layer_devices = [module_device(layer) for layer in self.layers]
        self._embed_device = module_device(self.embed_tokens)
        self._rotary_device = module_device(self.rotary_emb)
        self._norm_device = module_device(self.norm)

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

    # -- positions -------------------------------------------------------------------------
    # emloc keeps positions as [P, B, T] int64: P = 1 for plain RoPE, 3 for M-RoPE (temporal,
    # height, width). A sequence's own positions start at 0; adding the memory's offset places
    # it after the memory, and the offset then advances past the chunk's last token.
    position_dims = 1

    def relative_positions(self, seq) -> torch.Tensor:
        """[P, T] int64 positions of a rendered sequence (RenderedSequence), counted from 0."""
        return torch.arange(len(seq.ids))[None]

    def token_types(self, ids):
        """Token types (0 text, 1 image, 2 video) of ids, for models that take media; None here."""
        return None

    def model_inputs(self, ids: list, media: list) -> dict:
        """Keyword inputs of model(...) for one sequence of token ids (no media for text models)."""
        ids_t = torch.tensor([ids], device=self.device)
        return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}

    def _model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[P, B, T] -> what the model's rotary embedding takes ([B, T] for plain RoPE)."""
        return positions[0] if self.position_dims == 1 else positions

    # -- pieces of the forward -------------------------------------------------------------
    def embed(self, ids: torch.Tensor, seqs=None) -> torch.Tensor:
        """[B, T] int64 -> [B, T, H] hidden states in the model dtype (on the embedding's device).

        seqs: the RenderedSequence of each row (used by models with media inputs).
        """
        return self.embed_tokens(ids.to(self._embed_device))

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) for [P, B, T] absolute positions (on the rotary module's device)."""
        return self.rotary_emb(hidden.to(self._rotary_device),
                               self._model_positions(positions).to(self._rotary_device))

    def run_layers(self, hidden, positions, rotary, start: int, stop: int, plan, on_layer_input=None):
        """Run decoder layers [start, stop) on hidden [B, T, H] with attention plan `plan`;
        positions [P, B, T] and rotary = self.rotary(hidden, positions).

        Each layer runs on its own device (layer_devices), made the current CUDA device while it
        runs; hidden, positions and rotary are moved there. Returns hidden on the last layer's device.
        on_layer_input(l, hidden) is called with the input of each layer (for restarts).
        """
        placed = {}  # device -> (positions, rotary) on that device
        for l in range(start, stop):
            device = self.layer_devices[l]
            if device not in placed:
                placed[device] = (self._model_positions(positions).to(device),
                                  tuple(t.to(device) for t in rotary))
            layer_positions, layer_rotary = placed[device]
            hidden = hidden.to(device)
            if on_layer_input is not None:
                on_layer_input(l, hidden)
            with _current_device(device):  # Triton launches on the current CUDA device
                out = self.layers[l](hidden, attention_mask=None, position_ids=layer_positions,
                                     position_embeddings=layer_rotary, emloc_plan=plan)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm, on its device."""
        return self.norm(hidden.to(self._norm_device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden [..., H] -> fp32 logits [..., V] (the model's own lm_head, on `device`)."""
        return self.lm_head(hidden.to(self.device)).float()

    def fingerprint(self) -> dict:
        """What identifies the model a memory belongs to: architecture, sizes, dtype, and
        weights_sha256, a hash of every parameter and buffer (name, shape, dtype and a strided
        sample of FINGERPRINT_SAMPLES values; the stride is coprime with the last dimension, so
        the sample spans rows and columns). Any retrained tensor changes it; computing it reads
        ~FINGERPRINT_SAMPLES values per tensor, cheap enough for every load."""
        digest = hashlib.sha256()
        tensors = itertools.chain(self.model.named_parameters(), self.model.named_buffers())
        for name, tensor in tensors:
            if tensor.device.type == "meta":
                raise EMLoCError(f"the model's weights are offloaded ({name} is on the 'meta' device); "
                                 "emloc needs every weight resident: use a device_map without offloading "
                                 "(no 'disk' entries, and no 'cpu' entries next to GPUs)")
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
            while tensor.dim() and math.gcd(step, tensor.shape[-1]) != 1:
                step += 1
            sample = flat[::step][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float64)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(sample.numpy().tobytes())
        return {
            "architecture": type(self.model).__name__,
            "model_type": getattr(self.config, "model_type", ""),
            "n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_sha256": digest.hexdigest(),
        }
