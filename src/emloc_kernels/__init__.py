"""emloc_kernels: fused Triton kernels for EMLoC, each beside its PyTorch reference.

Every public op takes backend="auto" | "triton" | "torch"; "auto" runs Triton on CUDA
tensors and the reference otherwise.
"""
from .compaction import gather_append
from .lm_head_js import TeacherJS, lm_head_js, teacher_logsumexp
from .prefix_attention import prefix_attention
from .probe_scores import probe_scores
from .ranking import rank_tokens

__all__ = ["TeacherJS", "gather_append", "lm_head_js", "prefix_attention", "probe_scores", "rank_tokens",
           "teacher_logsumexp"]
