"""Plain scaled-dot-product attention in ComfyUI's calling convention, and torch's fused kernel that also
returns each query's log-sum-exp.

In the ComfyUI graph the dispatcher gets ComfyUI's own optimized attention instead of :func:`sdpa_attention`
(so users' attention backends and overrides still apply); all take ``(B, N, heads * dim_head)`` tensors.
:func:`sdpa_with_logsumexp` serves the dispatcher only where the node glue found that the attention it stands in
for computes the same exact softmax (``AttentionCall.attention_with_logsumexp``).
"""
from __future__ import annotations

from typing import Optional

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


def sdpa_with_logsumexp(q, k, v, heads) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Attention over ``(B, N, heads * d)`` tensors with the standard scale and, per query and head, the
    log-sum-exp of its scaled logits ``(B, heads, Nq)`` in float32, from torch's fused CPU kernel that returns
    both (tiled: no logits are kept). None where that kernel cannot serve: other devices, a torch without it,
    or when a gradient is needed (torch does not differentiate the log-sum-exp output)."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if kernel is None or q.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return None
    out, logsumexp = kernel(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return merge_heads(out), logsumexp
