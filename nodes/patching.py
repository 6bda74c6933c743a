"""Shared ModelPatcher glue: block discovery on a MODEL, dispatcher installation, sigma ranges.

Every technique goes through :func:`add_attention_processor`, so a block holds at most one of our
dispatchers per patch point, whatever nodes are chained.
"""
from __future__ import annotations

import comfy.patcher_extension
import torch

from ..attention.blocks import TransformerBlock, discover_transformer_blocks
from ..attention.dispatcher import (CHAIN_KEY, AttentionConflictError, AttentionProcessor, ProcessorChain,
                                   describe_foreign, install_dispatcher, overwritten_dispatchers,
                                   stash_hidden_states)
from .comfy_features import comfy_attention_function

WRAPPER_KEY = "personalization"
DISPATCH_CHECK_KEY = WRAPPER_KEY + ".dispatch_check"


def unpatched_modules(model, root: str = "diffusion_model") -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of the model's tree under ``root`` as it was loaded (paths relative to ``root``).

    Clones share one module tree, and ComfyUI leaves the object patches of the clone it last loaded
    applied to it (ours or another pack's, restored only when another clone loads). A walk of the live
    tree would find those stand-ins, and their children, where the loaded modules are: the originals
    are in ``object_patches_backup``, which every clone of a model shares.
    """
    backups = model.object_patches_backup
    found = []

    def walk(module, path):
        module = backups.get(path, module)
        found.append((path, module))
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model.model, "")
    if not root:
        return found
    return [(path[len(root) + 1:], module) for path, module in found if path == root or path.startswith(root + ".")]


def transformer_blocks(model, node: str = "") -> list[TransformerBlock]:
    """The transformer blocks of a MODEL's U-Net; a clear error (naming ``node``) for DiT and other families."""
    who = f"{node}: this MODEL" if node else "This MODEL"
    return discover_transformer_blocks(unpatched_modules(model), model_name=f"{who} ({type(model.model).__name__})")


def add_attention_processor(patched, processor: AttentionProcessor, blocks: list[TransformerBlock]) -> None:
    """Add ``processor`` to the clone's chain and make sure our dispatcher serves ``blocks``."""
    options = patched.model_options["transformer_options"]
    point = processor.patch_point
    replaces = options.get("patches_replace", {}).get(point, {})
    served = []
    for block in blocks:
        name, block_id, index = block.key
        existing = replaces.get(block.key, replaces.get((name, block_id)))
        dispatcher = install_dispatcher(existing, point, comfy_attention_function())
        patched.set_model_patch_replace(dispatcher, point, name, block_id, index)
        served.append(block.key)
        if block.alone_in_block:
            # Packs that patch one-transformer blocks (SD1.x) by (name, id), as IPAdapter does, must find
            # our dispatcher there too, or their patch would sit behind ours and never run.
            patched.set_model_patch_replace(dispatcher, point, name, block_id)
            served.append((name, block_id))
    if processor.needs_hidden_states and stash_hidden_states not in options.get("patches", {}).get("attn2_patch", []):
        patched.set_model_attn2_patch(stash_hidden_states)
    chain = options.get(CHAIN_KEY) or ProcessorChain()
    patched.model_options["transformer_options"][CHAIN_KEY] = chain.with_processor(processor, served)
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, DISPATCH_CHECK_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, DISPATCH_CHECK_KEY,
                                     refuse_overwritten_dispatchers)


def refuse_overwritten_dispatchers(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a clear error instead of sampling without our patch when another pack's
    attention replace, applied after our nodes, took a block over."""
    options = executor.class_obj.model_options.get("transformer_options", {})
    for point, block, replace in overwritten_dispatchers(options):
        owners = ", ".join(sorted({p.node_name for p in options[CHAIN_KEY].at(point)}))
        raise AttentionConflictError(
            f"{describe_foreign(replace) if replace is not None else 'a node'} replaced the {point} attention of "
            f"block {block} after {owners} patched it, so {owners} would silently do nothing; apply {owners} "
            "after that node (ours wrap it), or leave one of them out.")
    return executor(*args, **kwargs)


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a step range given in percent of sampling, ComfyUI-style."""
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
