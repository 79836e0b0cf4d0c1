"""Tiny random Qwen2-VL / Qwen2.5-VL models and an in-code processor for them (no downloads).

- tiny_vl_tokenizer(): the chat tokenizer of tiny_models.py (same BPE vocabulary, ids 0..383) plus the
  Qwen2-VL vision special tokens and the real Qwen2-VL-Instruct chat template.
- tiny_vl_processor(family): Qwen2VLProcessor / Qwen2_5_VLProcessor around that tokenizer, the Qwen2-VL
  image processor (default settings, small max_pixels) and a video processor.
- tiny_vl_model(family, ...): Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration with
  random weights, a tiny vision tower and M-RoPE sections valid for its head_dim.
- tiny_images(sizes, seed) / tiny_video(n_frames, size, seed): random PIL inputs.

The video processor: transformers' Qwen2VLVideoProcessor needs torchvision; when torchvision is not
installed, TinyQwen2VLVideoProcessor (numpy + PIL, same output layout: pixel_values_videos
[sum(t*h*w), 3*2*14*14], video_grid_thw [n, 3], video_metadata on request) stands in for it.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer
from transformers import BatchFeature, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.video_processing_utils import VideoProcessorMixin
from transformers.video_utils import VideoMetadata, make_batched_videos

if __package__:
    from .tiny_models import chat_tokenizer
else:  # pytest puts tests/ on sys.path: `from tiny_vl_models import ...`
    from tiny_models import chat_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl")

VISION_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# The chat template of Qwen2-VL-Instruct (also used by Qwen2.5-VL-Instruct), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 56 * 56            # the Qwen2-VL image processor default
MAX_PIXELS = 28 * 28 * 64       # at most 64 merged tokens per image / per frame pair


@functools.lru_cache(maxsize=1)
def tiny_vl_tokenizer() -> PreTrainedTokenizerFast:
    """tiny_models.chat_tokenizer()'s BPE (ids 0..383: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2)
    plus <|vision_start|>, <|vision_end|>, <|image_pad|>, <|video_pad|> (ids 384..387) as added special
    tokens, with the Qwen2-VL chat template. Shared (cached) instance: don't mutate it in tests."""
    tok = Tokenizer.from_str(chat_tokenizer().backend_tokenizer.to_str())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return fast


def vl_token_ids() -> dict:
    """The special token ids, named as in the model config."""
    tok = tiny_vl_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}
    ids.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return ids


def _smart_resize(height, width, factor, min_pixels, max_pixels):
    """transformers' qwen2_vl smart_resize (same arithmetic)."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


class TinyQwen2VLVideoProcessor(VideoProcessorMixin):
    """numpy/PIL stand-in for Qwen2VLVideoProcessor (which needs torchvision).

    Input: one video (list of PIL frames, array [T, H, W, 3] uint8, or tensor [T, 3, H, W]) or a list
    of them. Frames are resized (bicubic, PIL) to smart_resize(H, W) with factor 28 and
    size={"shortest_edge", "longest_edge"} pixels, rescaled by 1/255, CLIP-normalized, padded to an
    even frame count with the last frame and patchified in Qwen2VLVideoProcessor.patchify's order.
    No frame sampling: every frame given is used. fps (for video_metadata) is 24 unless `fps=` is given.
    """

    patch_size = PATCH_SIZE
    temporal_patch_size = TEMPORAL_PATCH_SIZE
    merge_size = MERGE_SIZE
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    rescale_factor = 1 / 255
    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, **kwargs):
        super().__init__(**kwargs)
        self.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    def _frames(self, video) -> np.ndarray:
        """-> float32 [T, 3, H, W] in 0..255."""
        if isinstance(video, torch.Tensor):
            video = video.cpu().numpy()
        arr = np.asarray(video)
        if arr.ndim != 4:
            raise ValueError(f"a video must be 4-D (frames first), got shape {arr.shape}")
        if arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
            arr = arr.transpose(0, 3, 1, 2)  # [T, H, W, C] -> [T, C, H, W]
        if arr.shape[1] == 1:
            arr = np.repeat(arr, 3, axis=1)
        return arr.astype(np.float32)

    def _resize(self, frames: np.ndarray, height: int, width: int) -> np.ndarray:
        from PIL import Image

        if frames.shape[-2:] == (height, width):
            return frames
        out = []
        for frame in frames:
            img = Image.fromarray(np.clip(frame.transpose(1, 2, 0).round(), 0, 255).astype(np.uint8))
            out.append(np.asarray(img.resize((width, height), Image.BICUBIC), np.float32).transpose(2, 0, 1))
        return np.stack(out)

    def _patchify(self, frames: np.ndarray):
        tps, ps, ms = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -frames.shape[0] % tps:
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
        n, c, h, w = frames.shape
        gt, gh, gw = n // tps, h // ps, w // ps
        patches = frames.reshape(gt, tps, c, gh // ms, ms, ps, gw // ms, ms, ps)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, C, tps, ph, pw)
        return patches.reshape(gt * gh * gw, c * tps * ps * ps), (gt, gh, gw)

    def get_num_of_video_patches(self, num_frames, height, width, videos_kwargs=None):
        factor = self.patch_size * self.merge_size
        h, w = _smart_resize(height, width, factor, self.size["shortest_edge"], self.size["longest_edge"])
        t = (num_frames + -num_frames % self.temporal_patch_size) // self.temporal_patch_size
        return t * (h // self.patch_size) * (w // self.patch_size)

    def __call__(self, videos, return_tensors=None, return_metadata=False, fps=None, **kwargs):
        return self.preprocess(videos, return_tensors=return_tensors, return_metadata=return_metadata, fps=fps)

    def preprocess(self, videos, return_tensors=None, return_metadata=False, fps=None, **kwargs):
        mean = np.asarray(self.image_mean, np.float32)[None, :, None, None]
        std = np.asarray(self.image_std, np.float32)[None, :, None, None]
        factor = self.patch_size * self.merge_size
        all_patches, grids, metadata = [], [], []
        for video in make_batched_videos(videos):
            frames = self._frames(video)
            h, w = _smart_resize(frames.shape[2], frames.shape[3], factor, self.size["shortest_edge"],
                                 self.size["longest_edge"])
            frames = (self._resize(frames, h, w) * self.rescale_factor - mean) / std
            patches, grid = self._patchify(frames)
            all_patches.append(patches)
            grids.append(list(grid))
            metadata.append(VideoMetadata(total_num_frames=len(video), fps=fps or 24.0,
                                          frames_indices=list(range(len(video))), height=h, width=w))
        data = {"pixel_values_videos": np.concatenate(all_patches).astype(np.float32),
                "video_grid_thw": np.asarray(grids, dtype=np.int64)}
        out = BatchFeature(data=data, tensor_type=return_tensors)
        if return_metadata:
            out["video_metadata"] = metadata
        return out


@functools.lru_cache(maxsize=1)
def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def _video_processor():
    if not _has_torchvision():
        return TinyQwen2VLVideoProcessor()
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=False)


def _image_processor():
    # Without torchvision transformers resolves Qwen2VLImageProcessor to the PIL backend (with a warning);
    # ask for the PIL one directly so both environments use the same code.
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@functools.lru_cache(maxsize=None)
def _processor_class(family: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

    cls = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor}.get(family)
    if cls is None:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if _has_torchvision():
        return cls

    # ProcessorMixin.__init__ type-checks video_processor against transformers.VideoProcessorMixin, which
    # the transformers namespace only exports with torchvision: accept the stand-in instead.
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and isinstance(argument, TinyQwen2VLVideoProcessor):
            return TinyQwen2VLVideoProcessor
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"__module__": __name__, "__doc__": cls.__doc__,
                                       "check_argument_for_proper_class": check_argument_for_proper_class})


def tiny_vl_processor(family: str = "qwen2_vl"):
    """A Qwen2VLProcessor ("qwen2_vl") or Qwen2_5_VLProcessor ("qwen2_5_vl"), fully in code.

    Tokenizer: tiny_vl_tokenizer() (shared). Image processor: Qwen2VLImageProcessorPil with its defaults
    except max_pixels=28*28*64 (patch 14, merge 2, temporal patch 2, CLIP mean/std, min_pixels 56*56).
    Video processor: Qwen2VLVideoProcessor if torchvision is installed; else TinyQwen2VLVideoProcessor, and
    the processor is a same-named subclass of the transformers class (isinstance holds) that accepts it.
    Calling it returns input_ids, attention_mask, mm_token_type_ids (0 text, 1 image, 2 video),
    pixel_values + image_grid_thw, pixel_values_videos + video_grid_thw (and second_per_grid_ts for
    Qwen2.5-VL videos).
    """
    return _processor_class(family)(image_processor=_image_processor(), tokenizer=tiny_vl_tokenizer(),
                                    video_processor=_video_processor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)


def mrope_section_for(head_dim: int) -> list[int]:
    """[t, h, w] with sum head_dim // 2, in the proportions of the real models ([16, 24, 24] for 128)."""
    half = head_dim // 2
    hw = 3 * half // 8
    return [half - 2 * hw, hw, hw]


def tiny_vl_config(family="qwen2_vl", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, std=0.02,
                   vision_depth=2, vision_dim=32, vision_heads=2, max_positions=4096,
                   attn_implementation="sdpa"):
    """The config tiny_vl_model builds from (see there)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    ids = vl_token_ids()
    head_dim = hidden // n_heads
    text = dict(vocab_size=len(tiny_vl_tokenizer()), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                max_position_embeddings=max_positions, initializer_range=std, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": mrope_section_for(head_dim)},
                pad_token_id=ids["pad_token_id"], bos_token_id=None, eos_token_id=ids["eos_token_id"])
    common = dict(depth=vision_depth, num_heads=vision_heads, in_channels=3, patch_size=PATCH_SIZE,
                  spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, initializer_range=std)
    if family == "qwen2_vl":
        vision = dict(common, embed_dim=vision_dim, hidden_size=hidden, mlp_ratio=2)
        cls = Qwen2VLConfig
    else:
        vision = dict(common, hidden_size=vision_dim, intermediate_size=2 * vision_dim, out_hidden_size=hidden,
                      window_size=112, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2)
        cls = Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=ids["image_token_id"],
               video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
               vision_end_token_id=ids["vision_end_token_id"], tie_word_embeddings=False,
               attn_implementation=attn_implementation)


def tiny_vl_model(family="qwen2_vl", n_layers=2, hidden=64, n_heads=4, n_kv_heads=2, seed=0, std=0.2,
                  dtype=torch.float32, vision_depth=2, vision_dim=32, vision_heads=2, max_positions=4096,
                  attn_implementation="sdpa"):
    """A random Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration in eval mode.

    Text: head_dim = hidden // n_heads, mrope_section = mrope_section_for(head_dim), vocab = the
    tiny_vl_tokenizer's (388), untied lm_head. Vision: depth vision_depth, width vision_dim, patch 14,
    spatial merge 2, temporal patch 2, output width = hidden (Qwen2.5-VL: window 112, last block full).
    Weights: every Linear / Embedding / Conv3d weight ~ N(0, std) from torch.manual_seed(seed), biases 0,
    norms 1. std=0.2 gives logits with std ~1.6 and mean max-probability ~0.1 (vocab 388); tiny_models'
    std=0.02 would give near-uniform ones (std ~0.16).
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    config = tiny_vl_config(family, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads,
                            std=std, vision_depth=vision_depth, vision_dim=vision_dim, vision_heads=vision_heads,
                            max_positions=max_positions, attn_implementation=attn_implementation)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    model = cls(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv3d)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model.to(dtype).eval()


def tiny_images(sizes=((56, 56), (84, 56), (112, 84)), seed=0):
    """Random RGB PIL images, one per (width, height) in sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB") for w, h in sizes]


def tiny_video(n_frames=4, size=(56, 56), seed=0):
    """A random video: a list of n_frames RGB PIL frames of (width, height) size."""
    return tiny_images([size] * n_frames, seed=seed)
