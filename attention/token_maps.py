"""Cross-attention maps of prompt tokens, captured while the U-Net runs.

Used by DisenDiff (calibration loss while training, map preview while sampling, the latter on DiTs too)
and by DETEX's optional attention regulariser. A map is a token's attention probability over the image queries,
averaged over the heads of a layer and then over the *map layers*: the cross-attention blocks of the
deepest U-Net level outside the middle block (SD1.5 at 512 px: the five 16×16 layers, DisenDiff's
and Break-A-Scene's choice). :func:`map_block_keys` picks that level from the block list (channels),
so SDXL and other resolutions get the equivalent layers instead of silently none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .blocks import BlockKey, TransformerBlock
from .dispatcher import CROSS_ATTENTION, AttentionProcessor
from .layout import cond_row_indices


def map_block_keys(blocks: Sequence[TransformerBlock]) -> frozenset[BlockKey]:
    """Cross-attention blocks of the deepest level outside the middle block (SD1.5: the five 16×16)."""
    candidates = [b for b in blocks if b.has_cross_attention and b.key[0] != "middle"]
    if not candidates:
        raise ValueError("this model has no cross-attention blocks outside the middle block")
    deepest = max(b.channels for b in candidates)
    return frozenset(b.key for b in candidates if b.channels == deepest)


@dataclass(eq=False)
class MapRecorder(AttentionProcessor):
    """Keeps the head-mean probabilities ``(b, T, h, w)`` of the text keys (``call.text_keys``: on a DiT the
    conditioning's columns of the joint softmax) of the cond rows of every call of the ``blocks`` layers (every row of a trainer's call, which has no uncond), with their autograd graph
    when gradients are on, so a trainer can put a loss on them. Whoever reads the maps clears
    ``maps`` before the next U-Net call; :meth:`layer_mean` averages over the recorded calls.

    ``node_name`` names the node that attaches the recorder (for the dispatcher's messages).
    """

    blocks: frozenset
    node_name: str = "personalization node"
    maps: list = field(default_factory=list)
    views_uncond_rows = False  # cond rows only
    reads_text_columns_only = True
    name = "token_maps"
    patch_point = CROSS_ATTENTION

    def active(self, call):
        return call.block in self.blocks

    def read_probs(self, probs, call):
        rows = cond_row_indices(call.cond_or_uncond, probs.shape[0])
        if rows:
            selected = probs if len(rows) == probs.shape[0] else probs[rows]  # no copy when all rows are cond
            maps = call.gather_rows("token_maps", selected[..., call.text_keys].mean(1))  # (b, queries, T)
            if maps is not None:  # the chunk with the last query row (see AttentionCall.gather_rows)
                self.maps.append(maps.transpose(1, 2).reshape(*maps.shape[::2], *call.query_grid))

    def layer_mean(self) -> torch.Tensor:
        """``(b, T, h, w)``: the recorded maps averaged over the layer calls."""
        if not self.maps:
            raise RuntimeError("no cross-attention maps were recorded; did the map layers run a cond pass?")
        return torch.stack(self.maps).mean(0)
