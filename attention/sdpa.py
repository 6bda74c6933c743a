"""Plain scaled-dot-product attention in ComfyUI's calling convention, for tests and benchmarks.

In the ComfyUI graph the dispatcher gets ComfyUI's own optimized attention instead (so users'
attention backends and overrides still apply); both take ``(B, N, heads * dim_head)`` tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, N, heads * d)`` → ``(B, heads, N, d)``."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, d)`` → ``(B, N, heads * d)``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def sdpa_attention(q, k, v, heads, mask=None, **_ignored) -> torch.Tensor:
    """Attention over ``(B, N, heads * d)`` tensors with an optional additive float mask."""
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                         attn_mask=mask)
    return merge_heads(out)
