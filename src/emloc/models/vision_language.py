"""Qwen2-VL / Qwen2.5-VL: vision features in the embeddings, 3-D M-RoPE positions.

The language model is driven exactly as a text decoder (DecoderAdapter); what differs:
- embeddings: the rows' image/video placeholder tokens take the vision tower's features
  (encoded once per MediaItem, in micro-batches, and cached on it);
- positions: [3, B, T] from the model's own `get_rope_index` (temporal, height, width), so that
  each chunk, probe row and query gets the ids the full uncompressed sequence would give it.
"""
from __future__ import annotations

import torch

from emloc.errors import EMLoCError
from emloc.models.adapter import DecoderAdapter, module_device

TEXT = 0
TOKEN_TYPES = {"image": 1, "video": 2}  # mm_token_type_ids values of media placeholders


def is_vision_language(model) -> bool:
    """True for models whose inner model has a vision tower and M-RoPE index (Qwen2-VL style)."""
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("visual", "get_rope_index", "get_image_features"))


def adapter_for(model) -> DecoderAdapter:
    """The adapter that drives `model`: VisionLanguageAdapter for Qwen2-VL-style models, else
    DecoderAdapter."""
    return VisionLanguageAdapter(model) if is_vision_language(model) else DecoderAdapter(model)


class VisionLanguageAdapter(DecoderAdapter):
    """DecoderAdapter for Qwen2-VL-style models (see module doc).

    vision_batch: MediaItems encoded per vision-tower call (bounds the tower's activations).
    """

    position_dims = 3

    def __init__(self, model, vision_batch: int = 8):
        super().__init__(model)
        self.inner = model.model
        config = model.config
        self.token_ids = {"image": config.image_token_id, "video": config.video_token_id}
        self.vision_batch = vision_batch
        self._vision_device = module_device(self.inner.visual)

    # -- positions ----------------------------------------------------------------------------
    def token_types(self, ids) -> torch.Tensor:
        """[..., T] token ids -> mm_token_type_ids (0 text, 1 image, 2 video), int64."""
        ids = torch.as_tensor(ids)
        types = torch.zeros_like(ids)
        for kind, code in TOKEN_TYPES.items():
            types[ids == self.token_ids[kind]] = code
        return types

    def relative_positions(self, seq) -> torch.Tensor:
        """[3, T] M-RoPE positions of a rendered sequence from 0, by the model's get_rope_index."""
        if not seq.media:
            return torch.arange(len(seq.ids))[None].expand(3, -1)
        ids = torch.tensor([seq.ids])
        images = [m.grid_thw for m in seq.media if m.kind == "image"]
        videos = [m for m in seq.media if m.kind == "video"]
        kwargs = {}
        if videos and videos[0].second_per_grid is not None:
            kwargs["second_per_grid_ts"] = torch.tensor([m.second_per_grid for m in videos])
        positions, _ = self.inner.get_rope_index(
            ids, self.token_types(ids),
            image_grid_thw=torch.stack(images) if images else None,
            video_grid_thw=torch.stack([m.grid_thw for m in videos]) if videos else None,
            attention_mask=torch.ones_like(ids), **kwargs)
        return positions[:, 0]

    # -- embeddings ---------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, seqs=None) -> torch.Tensor:
        """[B, T] ids -> [B, T, H]; row b's placeholders take the features of seqs[b].media."""
        hidden = super().embed(ids)
        for b, seq in enumerate(seqs or []):
            if not seq.media:
                continue
            self.encode(seq.media)
            placeholder = self.token_types(ids[b]).to(hidden.device) != TEXT
            features = torch.cat([m.features for m in seq.media]).to(hidden.device, hidden.dtype)
            if int(placeholder.sum()) != features.shape[0]:
                raise EMLoCError(f"a sequence has {int(placeholder.sum())} image/video tokens but its "
                                 f"images/videos give {features.shape[0]} features")
            hidden[b, placeholder] = features
        return hidden

    def encode(self, items: list) -> None:
        """Compute the features of every item that has none, vision_batch items per tower call."""
        for kind in ("image", "video"):
            todo = [m for m in items if m.kind == kind and m.features is None]
            for start in range(0, len(todo), self.vision_batch):
                batch = todo[start:start + self.vision_batch]
                pixels = torch.cat([m.pixel_values for m in batch]).to(self._vision_device, self.dtype)
                grids = torch.stack([m.grid_thw for m in batch]).to(self._vision_device)
                with torch.inference_mode():
                    if kind == "image":
                        out = self.inner.get_image_features(pixel_values=pixels, image_grid_thw=grids)
                    else:
                        out = self.inner.get_video_features(pixel_values_videos=pixels, video_grid_thw=grids)
                features = getattr(out, "pooler_output", out)
                if isinstance(features, torch.Tensor):
                    features = features.split([m.n_tokens for m in batch])
                for m, f in zip(batch, features):
                    if f.shape[0] != m.n_tokens:
                        raise EMLoCError(f"the vision tower gave {f.shape[0]} features for an {kind} "
                                         f"of {m.n_tokens} tokens: processor and model do not match")
                    m.features = f

    # -- the uncompressed sequence ----------------------------------------------------------------
    def model_inputs(self, ids: list, media: list) -> dict:
        """Keyword inputs of model(...) for one sequence of ids with its media, as a processor
        would give them (input_ids, attention_mask, mm_token_type_ids, pixel values and grids)."""
        inputs = super().model_inputs(ids, media)
        inputs["mm_token_type_ids"] = self.token_types(inputs["input_ids"])
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        if images:
            inputs["pixel_values"] = torch.cat([m.pixel_values for m in images]).to(self.device)
            inputs["image_grid_thw"] = torch.stack([m.grid_thw for m in images]).to(self.device)
        if videos:
            inputs["pixel_values_videos"] = torch.cat([m.pixel_values for m in videos]).to(self.device)
            inputs["video_grid_thw"] = torch.stack([m.grid_thw for m in videos]).to(self.device)
            if videos[0].second_per_grid is not None:
                inputs["second_per_grid_ts"] = torch.tensor([m.second_per_grid for m in videos])
        return inputs

    def fingerprint(self) -> dict:
        patch = self.inner.visual.patch_embed.proj.weight if hasattr(self.inner.visual, "patch_embed") else None
        vision = {} if patch is None else {
            "vision_checksum": round(float(patch.detach().float().flatten()[:4096].double().abs().sum().cpu()), 6)}
        return {**super().fingerprint(), **vision}
