"""Shared ModelPatcher glue: block discovery on a MODEL, dispatcher installation, sigma ranges.

Every technique goes through :func:`add_attention_processor`, so a block holds at most one of our
dispatchers per patch point, whatever nodes are chained.
"""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ..attention.blocks import TransformerBlock, discover_transformer_blocks
from ..attention.dispatcher import (CHAIN_KEY, AttentionProcessor, ProcessorChain, install_dispatcher,
                                   stash_hidden_states)

WRAPPER_KEY = "personalization"


def transformer_blocks(model) -> list[TransformerBlock]:
    """The transformer blocks of a MODEL's U-Net; a clear error for DiT and other families."""
    return discover_transformer_blocks(model.get_model_object("diffusion_model"),
                                       model_name=f"This MODEL ({type(model.model).__name__})")


def add_attention_processor(patched, processor: AttentionProcessor, blocks: list[TransformerBlock]) -> None:
    """Add ``processor`` to the clone's chain and make sure our dispatcher serves ``blocks``."""
    options = patched.model_options["transformer_options"]
    point = processor.patch_point
    replaces = options.get("patches_replace", {}).get(point, {})
    for block in blocks:
        name, block_id, index = block.key
        existing = replaces.get(block.key, replaces.get((name, block_id)))
        dispatcher = install_dispatcher(existing, point, comfy_attention.optimized_attention)
        patched.set_model_patch_replace(dispatcher, point, name, block_id, index)
    if processor.needs_hidden_states and stash_hidden_states not in options.get("patches", {}).get("attn2_patch", []):
        patched.set_model_attn2_patch(stash_hidden_states)
    chain = options.get(CHAIN_KEY) or ProcessorChain()
    patched.model_options["transformer_options"][CHAIN_KEY] = chain.with_processor(processor)


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a step range given in percent of sampling, ComfyUI-style."""
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
