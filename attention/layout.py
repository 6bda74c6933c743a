"""Batch layout of one U-Net call: ComfyUI stacks ``len(cond_or_uncond)`` chunks of the latent batch.

Chunks may be cond only, uncond only, both in either order, or more (area conds); never assume two
equal halves. The reference of StyleAligned is sample 0 of each chunk.
"""
from __future__ import annotations

import torch


def split_chunks(x: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """View ``(n_chunks * B, ...)`` as ``(n_chunks, B, ...)``; raises on a batch that does not divide."""
    if n_chunks < 1 or x.shape[0] % n_chunks != 0:
        raise ValueError(f"batch of {x.shape[0]} cannot be split into {n_chunks} cond/uncond chunks")
    return x.view(n_chunks, x.shape[0] // n_chunks, *x.shape[1:])


def merge_chunks(x: torch.Tensor) -> torch.Tensor:
    """Inverse of split_chunks."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def chunk_count(cond_or_uncond: list[int] | None, batch: int) -> int:
    """Number of chunks in a call; a call without layout information is one chunk."""
    n_chunks = len(cond_or_uncond) if cond_or_uncond else 1
    if batch % n_chunks != 0:
        raise ValueError(f"batch of {batch} does not hold {n_chunks} equal cond/uncond chunks")
    return n_chunks


def cond_row_indices(cond_or_uncond: list[int] | tuple[int, ...] | None, batch: int) -> list[int]:
    """Rows of every cond chunk (``cond_or_uncond`` value 0) of a call; a call without layout
    information (a trainer's U-Net call) is all cond."""
    chunks = list(cond_or_uncond or ()) or [0]
    per_chunk = batch // chunk_count(chunks, batch)
    return [c * per_chunk + r for c, kind in enumerate(chunks) if kind == 0 for r in range(per_chunk)]
