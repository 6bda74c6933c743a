"""StyleAligned's optional GroupNorm sharing: each target is normalised jointly with its reference.

GroupNorms sit in ResBlocks, where no transformer options reach, so the chunk layout of the current
U-Net call is published through a context variable that a diffusion-model wrapper sets around the
call (:func:`norm_sharing`); outside such a scope the norms behave exactly as before.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from .layout import merge_chunks, split_chunks

_chunks_of_current_call: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar(
    "personalization_norm_sharing_chunks", default=None)


@contextlib.contextmanager
def norm_sharing(n_chunks: Optional[int]) -> Iterator[None]:
    """Within this scope, shared GroupNorms treat the batch as ``n_chunks`` chunks (None: off)."""
    token = _chunks_of_current_call.set(n_chunks)
    try:
        yield
    finally:
        _chunks_of_current_call.reset(token)


class ReferenceSharedGroupNorm(torch.nn.GroupNorm):
    """A GroupNorm holding the SAME parameters as the one it replaces, so weight patches (LoRA)
    addressed to the original path still apply, that joins each target with its chunk's reference.

    Concatenating along H (as the paper's code does) makes the group statistics those of
    target ∪ reference; the reference itself keeps its own statistics.
    """

    def __init__(self, norm: torch.nn.GroupNorm):
        torch.nn.Module.__init__(self)
        self.num_groups, self.num_channels, self.eps, self.affine = norm.num_groups, norm.num_channels, norm.eps, norm.affine
        self.weight, self.bias = norm.weight, norm.bias

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=x.device, dtype=x.dtype) if self.weight is not None else None
        bias = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_chunks = _chunks_of_current_call.get()
        if n_chunks is None or x.shape[0] % n_chunks != 0 or x.shape[0] // n_chunks < 2 or x.ndim < 3:
            return self._norm(x)
        chunks = split_chunks(x, n_chunks)
        batch, height = chunks.shape[1], x.shape[2]
        reference = chunks[:, :1]
        joint = torch.cat([chunks[:, 1:], reference.expand(-1, batch - 1, *reference.shape[2:])], dim=3)
        out = torch.empty_like(chunks)
        out[:, 0] = self._norm(reference[:, 0])
        out[:, 1:] = self._norm(merge_chunks(joint)).view_as(joint)[:, :, :, :height]
        return merge_chunks(out)
