"""Finds the transformer blocks of a U-Net by scanning its modules, never from hard-coded tables.

Keys follow ComfyUI's patch addressing: ``(block_name, block_id, transformer_index)`` where
``block_name`` is ``"input"``, ``"middle"`` or ``"output"``; the middle block is ``("middle", 0)``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable

import torch

BlockKey = tuple[str, int, int]
#: (path, module) pairs of a diffusion model, as ``named_modules()`` yields them
NamedModules = Iterable[tuple[str, torch.nn.Module]]

_TRANSFORMER_PATH = re.compile(
    r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)$"
)


class UnsupportedModelError(ValueError):
    """The model is not a U-Net this pack can patch (e.g. a DiT such as Flux or SD3)."""


@dataclass(frozen=True)
class TransformerBlock:
    key: BlockKey
    module_path: str
    heads: int
    dim_head: int
    has_cross_attention: bool
    #: the only transformer of its spatial transformer (SD1.x): other packs may key its replace by (name, id)
    alone_in_block: bool = False

    @property
    def channels(self) -> int:
        return self.heads * self.dim_head


def _order(key: BlockKey) -> tuple[int, int, int]:
    # Diffusers registers down blocks, then up blocks, then the middle block; the paper's
    # layer-fraction control (StyleAligned `only_self_level`) indexes layers in that order.
    rank = {"input": 0, "output": 1, "middle": 2}[key[0]]
    return rank, key[1], key[2]


def discover_transformer_blocks(modules: NamedModules, model_name: str = "model") -> list[TransformerBlock]:
    """All transformer blocks of a SD1.x/SD2/SDXL-style U-Net, in diffusers' layer order, from the
    ``(path, module)`` pairs of its module tree (the tree as loaded: see nodes.patching).

    Raises UnsupportedModelError for anything without U-Net input/output blocks (DiT models).
    """
    modules = list(modules)
    tops = {path for path, _ in modules if path and "." not in path}
    if not {"input_blocks", "output_blocks"} <= tops:
        root = type(modules[0][1]).__name__ if modules else "empty model"
        raise UnsupportedModelError(
            f"{model_name} is a {root}, not a U-Net (SD1.5/SD2/SDXL). "
            "DiT models such as Flux or SD3 are not supported yet by the personalization nodes."
        )
    blocks = []
    for path, module in modules:
        match = _TRANSFORMER_PATH.match(path)
        if match is None:
            continue
        name, block_id, middle, index = match.groups()
        key = ("middle", 0, int(index)) if middle else (name, int(block_id), int(index))
        attn1 = module.attn1
        blocks.append(TransformerBlock(
            key=key,
            module_path=path,
            heads=attn1.heads,
            dim_head=attn1.dim_head,
            has_cross_attention=getattr(module, "attn2", None) is not None,
        ))
    if not blocks:
        raise UnsupportedModelError(f"{model_name} has no transformer blocks to patch.")
    depth = Counter(b.key[:2] for b in blocks)
    return sorted((replace(b, alone_in_block=depth[b.key[:2]] == 1) for b in blocks), key=lambda b: _order(b.key))


def group_norms(modules: NamedModules) -> list[tuple[str, torch.nn.GroupNorm]]:
    """``(path, module)`` of every GroupNorm in the U-Net (ResBlocks and transformer input norms)."""
    return [(path, module) for path, module in modules if isinstance(module, torch.nn.GroupNorm)]


def parse_block_selection(text: str, blocks: list[TransformerBlock]) -> frozenset[BlockKey]:
    """Turns a user selector like ``"input, middle, output:3, output:4.1"`` into block keys.

    Each comma-separated item is ``name``, ``name:id`` or ``name:id.index``; empty text selects all.
    Unknown names or items matching no block raise ValueError listing what exists.
    """
    keys = [b.key for b in blocks]
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return frozenset(keys)
    selected = set()
    for item in items:
        match = re.fullmatch(r"(input|middle|output)(?::(\d+)(?:\.(\d+))?)?", item)
        if match is None:
            raise ValueError(f"block selector {item!r} is not of the form name, name:id or name:id.index "
                             "(name is input, middle or output)")
        name, block_id, index = match.groups()
        hits = [k for k in keys if k[0] == name
                and (block_id is None or k[1] == int(block_id))
                and (index is None or k[2] == int(index))]
        if not hits:
            available = ", ".join(f"{k[0]}:{k[1]}.{k[2]}" for k in keys)
            raise ValueError(f"block selector {item!r} matches no transformer block; this model has: {available}")
        selected.update(hits)
    return frozenset(selected)


def evenly_skipped(keys: list[BlockKey], skip_fraction: float) -> frozenset[BlockKey]:
    """The keys that keep sharing when a fraction of layers is switched off at even spacing.

    Mirrors StyleAligned's ``only_self_level`` switch vector: with ``count = int(level * layers)``
    every ``layers // count``-th layer is switched off; above one half the complement pattern is
    used, so the switched-off layers stay spread over the network.
    """
    if not 0.0 <= skip_fraction <= 1.0:
        raise ValueError(f"skip fraction must lie in [0, 1], got {skip_fraction}")
    if skip_fraction == 1.0:
        return frozenset()
    flipped = skip_fraction > 0.5
    switched = int((1.0 - skip_fraction if flipped else skip_fraction) * len(keys))
    if switched == 0:
        return frozenset() if flipped else frozenset(keys)
    period = len(keys) // switched
    on_grid = {i for i in range(len(keys)) if i % period == 0}
    return frozenset(k for i, k in enumerate(keys) if (i in on_grid) == flipped)
