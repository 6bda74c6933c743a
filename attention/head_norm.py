"""A trainable copy of the per-head norm a DiT applies to its queries or keys before attention.

Flux normalises every head's query and key with an RMSNorm with a learned scale; SD3.5 with an RMSNorm (or, in
some checkpoints, a LayerNorm) over the head width; SD3 with none. :meth:`HeadNorm.copy_of` reads which from the
block's module and copies its weights, so a parallel projection starts exactly where the block's own does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: the epsilon of every per-head norm of ComfyUI's Flux and MMDiT models
EPS = 1e-6
RMS, LAYER = "rms", "layer"


class HeadNorm(nn.Module):
    """RMS or layer norm over the last (head width) dimension with a learned scale (and, for ``layer``, bias)."""

    def __init__(self, kind: str, width: int, eps: float = EPS):
        super().__init__()
        if kind not in (RMS, LAYER):
            raise ValueError(f"unknown head norm {kind!r}; expected {RMS!r} or {LAYER!r}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width)) if kind == LAYER else None

    @classmethod
    def copy_of(cls, module: Optional[nn.Module]) -> Optional["HeadNorm"]:
        """A copy of a DiT's query/key norm module (None for none): a LayerNorm, or an RMSNorm whose scale is
        ``weight`` (MMDiT) or ``scale`` (Flux)."""
        if module is None or isinstance(module, nn.Identity):
            return None
        if isinstance(module, nn.LayerNorm):
            norm = cls(LAYER, module.normalized_shape[-1], module.eps)
            with torch.no_grad():
                norm.weight.copy_(module.weight.float())
                norm.bias.copy_(module.bias.float())
            return norm
        scale = getattr(module, "scale", None)
        scale = getattr(module, "weight", None) if scale is None else scale
        if scale is None:
            raise ValueError(f"cannot copy the per-head norm {type(module).__name__}: it has no learned scale")
        norm = cls(RMS, scale.shape[-1], getattr(module, "eps", EPS))
        with torch.no_grad():
            norm.weight.copy_(scale.float())
        return norm

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "HeadNorm":
        norm = cls(LAYER if "bias" in state else RMS, state["weight"].shape[0])
        norm.load_state_dict(state, strict=True)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x)
        if self.kind == LAYER:
            return F.layer_norm(x, weight.shape, weight, self.bias.to(x), self.eps)
        return F.rms_norm(x, weight.shape, weight, self.eps)
