"""Images and videos of demos and queries, prepared by a vision-language model's processor.

A content part {"type": "image", "image": ...} or {"type": "video", "video": [frames]} becomes a
MediaItem: the processor's pixel values and grid, and the number of placeholder tokens it takes
in the rendered chat. The same MediaItem is shared by a chunk and the probe row of its demo, so
its vision features (cached on it by the model adapter) are computed once per demo image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from emloc.errors import EMLoCError

KINDS = ("image", "video")


@dataclass(eq=False)
class MediaItem:
    """One image or video, processed.

    kind            "image" or "video"
    pixel_values    [n_patches, C * temporal_patch * patch * patch] as the processor returns them
    grid_thw        [3] int64: temporal, height, width patches
    n_tokens        placeholder tokens in the chat (grid product / merge_size**2)
    second_per_grid (videos on Qwen2.5-VL) seconds per temporal grid step, else None
    features        [n_tokens, H] vision features, set by the adapter when first needed
    """

    kind: str
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    n_tokens: int
    second_per_grid: float | None = None
    features: torch.Tensor | None = field(default=None, repr=False)


class MediaPreparer:
    """Turns image/video content parts into MediaItems with the model's processor.

    processor  a Qwen2-VL / Qwen2.5-VL processor (image processor, tokenizer, optional video
               processor); its image_token / video_token strings are the chat placeholders.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokens = {"image": getattr(processor, "image_token", "<|image_pad|>"),
                       "video": getattr(processor, "video_token", "<|video_pad|>")}
        self.can_video = getattr(processor, "video_processor", None) is not None

    def check(self, part: dict, where: str, load: bool = True):
        """The part's image (opened if a path; load=False: only checked to exist) or video frames,
        checked without processing them: an entry is present, files exist, videos are non-empty
        lists and the processor takes videos."""
        kind = part["type"]
        value = part.get(kind)
        if isinstance(value, MediaItem):
            return value
        if value is None:
            raise EMLoCError(f"{where}: a part of type {kind!r} has no {kind!r} entry; give "
                             f"{{'type': {kind!r}, {kind!r}: ...}}")
        if kind == "video" and not self.can_video:
            raise EMLoCError(f"{where}: this processor has no video processor; the model cannot take videos")
        if kind == "image":
            return _open_image(value, where, load)
        if not isinstance(value, (list, tuple)) or not value:
            raise EMLoCError(f"{where}: a video must be a non-empty list of frames (images)")
        return [_open_image(frame, f"{where}, video frame {i}", load) for i, frame in enumerate(value)]

    def prepare(self, part: dict, where: str) -> MediaItem:
        """A content part of type "image" or "video" -> MediaItem (raises EMLoCError if unusable)."""
        value = self.check(part, where)
        if isinstance(value, MediaItem):
            return value
        kind = part["type"]
        token = self.tokens[kind]
        try:
            out = self.processor(text=[token], **{f"{kind}s": [value]}, return_tensors="pt")
        except Exception as exc:  # the processor's own errors for inputs it cannot take
            raise EMLoCError(f"{where}: the processor cannot take this {kind}: {exc}") from exc
        suffix = "" if kind == "image" else "_videos"
        grid = out[f"{kind}_grid_thw"][0]
        n_tokens = int((out["input_ids"][0] == self.processor.tokenizer.convert_tokens_to_ids(token)).sum())
        seconds = out.get("second_per_grid_ts")
        return MediaItem(kind, out[f"pixel_values{suffix}"], grid, n_tokens,
                         None if seconds is None else float(seconds[0]))


def _open_image(value, where: str, load: bool = True):
    """A PIL image, array or tensor as given; a path (str or Path) is opened with PIL (load=False:
    only checked to be a file)."""
    if isinstance(value, (str, Path)):
        from PIL import Image

        path = Path(value)
        if not path.is_file():
            raise EMLoCError(f"{where}: no image file at {path}")
        if not load:
            return value
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as exc:  # PIL's errors for files that are not images
            raise EMLoCError(f"{where}: {path} is not an image PIL can read: {exc}") from exc
    return value
