"""Finds the transformer blocks of a diffusion model by scanning its modules, never from hard-coded tables.

What each family's blocks are, and everything else family-specific, is its adapter's (:mod:`.families`); this
module asks the adapters and offers what every technique does with blocks: discovery, user selection, layer
fractions.

Keys are ``(block_name, block_id, transformer_index)``:
- U-Nets (SD1.5/SD2/SDXL) follow ComfyUI's attn1/attn2 patch addressing: ``block_name`` is ``"input"``,
  ``"middle"`` or ``"output"``; the middle block is ``("middle", 0)``.
- DiTs name their blocks as ComfyUI's models do, index 0: Flux ``("double", i, 0)`` and ``("single", i, 0)``,
  SD3/SD3.5 (MMDiT) ``("joint", i, 0)``. Users select them as ``double:3``, ``single:12``, ``joint:7``.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from .families import (ALL_FAMILIES, FLUX, MMDIT, OTHER_FAMILIES, UNET, BlockKey, Family, JointProjections,
                       NamedModules, TransformerBlock, UnsupportedModelError, family_of_model, family_of_tag)

__all__ = ["ALL_FAMILIES", "FLUX", "MMDIT", "OTHER_FAMILIES", "UNET", "BlockKey", "Family", "JointProjections",
           "NamedModules", "TransformerBlock", "UnsupportedModelError", "discover_transformer_blocks",
           "evenly_skipped", "family_of_tag", "group_norms", "parse_block_selection", "selected_blocks",
           "BLOCK_SELECTIONS"]


def discover_transformer_blocks(modules: NamedModules, model_name: str = "model",
                                model_classes: Optional[list[str]] = None) -> list[TransformerBlock]:
    """All transformer blocks of a model of a supported family, in layer order, from the ``(path, module)`` pairs
    of its module tree (the tree as loaded: see nodes.patching). ``model_classes``: the names along the MRO of
    ComfyUI's model object, which a DiT must be recognised by; None where the model was recognised before (a
    model call's hooks).

    Raises UnsupportedModelError for any other architecture, naming the family where ComfyUI's class tells it
    and the families that are supported.
    """
    modules = list(modules)
    family = family_of_model(modules, model_name, model_classes)
    blocks = family.find_blocks(modules)
    if not blocks:
        raise UnsupportedModelError(f"{model_name} has no transformer block of a {family.name} model; the "
                                    "personalization nodes cannot patch it.")
    return sorted(blocks, key=lambda b: family.order(b.key))


def group_norms(modules: NamedModules) -> list[tuple[str, torch.nn.GroupNorm]]:
    """``(path, module)`` of every GroupNorm in the U-Net (ResBlocks and transformer input norms)."""
    return [(path, module) for path, module in modules if isinstance(module, torch.nn.GroupNorm)]


def parse_block_selection(text: str, blocks: list[TransformerBlock]) -> frozenset[BlockKey]:
    """Turns a user selector like ``"input, middle, output:3, output:4.1"`` or ``"double, single:0"`` into
    block keys.

    Each comma-separated item is ``name``, ``name:id`` or ``name:id.index`` with a block name of the model
    (U-Net: input, middle, output; Flux, Flux.2, Chroma: double, single; SD3: joint; Z-Image: layer; Qwen-Image:
    double); empty text selects all. Unknown names or items matching no block raise ValueError listing what exists.
    """
    keys = [b.key for b in blocks]
    names = sorted({k[0] for k in keys}, key=blocks[0].family.block_names.index) if blocks else []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return frozenset(keys)
    selected = set()
    for item in items:
        match = re.fullmatch(r"([a-z]+)(?::(\d+)(?:\.(\d+))?)?", item)
        if match is None or match.group(1) not in names:
            raise ValueError(f"block selector {item!r} is not of the form name, name:id or name:id.index "
                             f"(name is {', '.join(names)} for this model)")
        name, block_id, index = match.groups()
        hits = [k for k in keys if k[0] == name
                and (block_id is None or k[1] == int(block_id))
                and (index is None or k[2] == int(index))]
        if not hits:
            available = ", ".join(b.label for b in blocks)
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


#: which blocks carry an adapter's per-block weights (PVA's parallel projections, RealCustom's branch; recorded in
#: their files): every one (the papers: every cross-attention layer), the two-stream blocks only (Flux's double
#: blocks, SD3's joint blocks: all of SD3's), or every 2nd / 4th block in the model's order, starting with the first
BLOCK_SELECTIONS = ("all", "double", "every_2", "every_4")
TWO_STREAM_BLOCKS = ("double", "joint")


def selected_blocks(selection: str, keys: list[BlockKey]) -> list[BlockKey]:
    """The keys (in the model's order) that ``selection`` (one of :data:`BLOCK_SELECTIONS`) keeps."""
    if selection == "all":
        return list(keys)
    if selection == "double":
        chosen = [k for k in keys if k[0] in TWO_STREAM_BLOCKS]
        if not chosen:
            raise ValueError("block selection 'double' keeps the two-stream blocks (Flux's double, SD3's joint "
                             "blocks), and this model has none; use 'all' or 'every_2'.")
        return chosen
    if selection.startswith("every_") and selection in BLOCK_SELECTIONS:
        return list(keys[::int(selection.removeprefix("every_"))])
    raise ValueError(f"unknown block selection {selection!r}; expected one of {BLOCK_SELECTIONS}")
