"""Shared ModelPatcher glue: block discovery on a MODEL, dispatcher installation, sigma ranges.

Every technique goes through :func:`add_attention_processor`, so a block holds at most one of our
dispatchers per patch point, whatever nodes are chained.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import comfy.patcher_extension
import torch

from ..attention.blocks import UNET, Family, TransformerBlock, UnsupportedModelError, discover_transformer_blocks
from ..attention.families import class_names
from ..attention.dispatcher import (CHAIN_KEY, AttentionConflictError, AttentionProcessor, ProcessorChain,
                                   describe_foreign, install_dispatcher, origin_of, overwritten_dispatchers,
                                   stash_hidden_states)
from ..attention.joint import (JOINT_ATTENTION, LAYOUT_KEY, OVERRIDE_KEY, QUERY_INPUTS_KEY, LayoutRecord,
                               QueryInputs, install_block_marker, install_joint_dispatcher, overwritten_joint_entries,
                               read_joint_layout)
from .family_support import supported_families
from .comfy_features import comfy_attention_function, computes_exact_attention, require_attention_override

WRAPPER_KEY = "personalization"
DISPATCH_CHECK_KEY = WRAPPER_KEY + ".dispatch_check"
JOINT_LAYOUT_KEY = WRAPPER_KEY + ".joint_layout"
#: transformer_options key of the hooks of one model call a checkpointed block must run again when backward
#: recomputes it (after the call): a context manager factory (see training/checkpointing.py)
RECOMPUTE_HOOKS_KEY = WRAPPER_KEY + ".recompute_hooks"


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


def model_class_names(model) -> list[str]:
    """The names along the MROs of a MODEL's ComfyUI model config (what ComfyUI's detection made of its file:
    ``supported_models.ZImage``) and then of its model class (``model_base.Lumina2``, which Z-Image shares with
    Lumina 2), nearest first: what family adapters recognise it by."""
    return class_names(getattr(model.model, "model_config", None)) + class_names(model.model)


def transformer_blocks(model, node: str = "", families: Optional[tuple[Family, ...]] = None) -> list[TransformerBlock]:
    """The transformer blocks of a MODEL, which must be of one of ``families`` (default: those ``node`` declares in
    nodes.family_support; the U-Nets where no node asks); a clear error naming ``node`` and the families it supports
    otherwise."""
    if families is None:
        families = supported_families(node) if node else (UNET,)
    who = f"{node}: this MODEL" if node else "This MODEL"
    blocks = discover_transformer_blocks(unpatched_modules(model), model_name=f"{who} ({type(model.model).__name__})",
                                         model_classes=model_class_names(model))
    family = blocks[0].family
    if family not in families:
        supported = ", ".join(f.name for f in families)
        raise UnsupportedModelError(f"{who} is a {family.name} model; {node or 'this node'} supports {supported} "
                                    "models.")
    return blocks


def add_attention_processor(patched, processor: AttentionProcessor, blocks: list[TransformerBlock]) -> None:
    """Add ``processor`` to the clone's chain and make sure our dispatcher serves ``blocks``."""
    options = patched.model_options["transformer_options"]
    if blocks and blocks[0].family.joint:
        served = _serve_joint_attention(patched, processor, blocks)
    else:
        served = _serve_unet_blocks(patched, processor, blocks)
    chain = options.get(CHAIN_KEY) or ProcessorChain()
    patched.model_options["transformer_options"][CHAIN_KEY] = chain.with_processor(processor, served)
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, DISPATCH_CHECK_KEY):
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, DISPATCH_CHECK_KEY,
                                     refuse_overwritten_dispatchers)


def _serve_unet_blocks(patched, processor: AttentionProcessor, blocks: list[TransformerBlock]) -> list[tuple]:
    """Our attn1/attn2 replace at each block; the (point, key) entries it now serves."""
    options = patched.model_options["transformer_options"]
    point = processor.patch_point
    replaces = options.get("patches_replace", {}).get(point, {})
    served = []
    for block in blocks:
        name, block_id, index = block.key
        existing = replaces.get(block.key, replaces.get((name, block_id)))
        dispatcher = install_dispatcher(existing, point, comfy_attention_function(), computes_exact_attention)
        patched.set_model_patch_replace(dispatcher, point, name, block_id, index)
        served.append((point, block.key))
        if block.alone_in_block:
            # Packs that patch one-transformer blocks (SD1.x) by (name, id), as IPAdapter does, must find
            # our dispatcher there too, or their patch would sit behind ours and never run.
            patched.set_model_patch_replace(dispatcher, point, name, block_id)
            served.append((point, (name, block_id)))
    if processor.needs_hidden_states and stash_hidden_states not in options.get("patches", {}).get("attn2_patch", []):
        patched.set_model_attn2_patch(stash_hidden_states)
    return served


def _serve_joint_attention(patched, processor: AttentionProcessor, blocks: list[TransformerBlock]) -> list[tuple]:
    """Our attention override on a DiT clone, the layout of each model call published for it, and (for
    families whose forward does not name the running block) a block marker per block."""
    require_attention_override(processor.node_name)
    options = patched.model_options["transformer_options"]
    options[OVERRIDE_KEY] = install_joint_dispatcher(options.get(OVERRIDE_KEY), computes_exact_attention)
    served = [(JOINT_ATTENTION, (OVERRIDE_KEY,))]
    family = blocks[0].family
    if not family.comfy_marks_blocks and not family.marked_by_call_hooks:
        markers = options.get("patches_replace", {}).get("dit", {})
        for block in blocks:
            name, index, _ = block.key
            key = block.family.marker_key(block)
            patched.set_model_patch_replace(install_block_marker(markers.get(key), name, index), "dit", *key)
            served.append(("dit", key))
    if not patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, JOINT_LAYOUT_KEY):
        every_block = transformer_blocks(patched, families=(family,)) if family.marked_by_call_hooks else ()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, JOINT_LAYOUT_KEY,
                                     functools.partial(publish_joint_layout, family, tuple(every_block)))
    return served


def publish_joint_layout(family: Family, marked: tuple[TransformerBlock, ...], executor, x, t, c_concat, c_crossattn,
                         control, transformer_options, **kwargs):
    """APPLY_MODEL wrapper (bound to the model's ``family`` and, where the family needs them, the blocks to mark
    when installed): the token layout of this model call, read when its first block receives its streams
    (:class:`~..attention.joint.LayoutRecord`), for the joint dispatcher's attention calls, the ``marked`` blocks
    named in transformer_options while each runs, and (when a processor has its own projections) the inputs of
    the image queries, recorded while the call runs."""
    diffusion_model = executor.class_obj.diffusion_model
    record = LayoutRecord()
    options = {**transformer_options, LAYOUT_KEY: record}
    foreign = ", ".join("the post_input patch {} (from {})".format(*origin_of(p))
                        for p in transformer_options.get("patches", {}).get("post_input", []))
    with contextlib.ExitStack() as recording:
        recording.enter_context(recording_layout(diffusion_model, family, record, x.shape, foreign))
        recording.enter_context(marking_blocks(diffusion_model, marked))
        chain = options.get(CHAIN_KEY)
        if chain is not None and any(p.needs_hidden_states for p in chain.processors):
            options[QUERY_INPUTS_KEY] = QueryInputs(family.query_placement)
            options[RECOMPUTE_HOOKS_KEY] = functools.partial(recording_query_inputs, diffusion_model,
                                                             options[QUERY_INPUTS_KEY], record)
            recording.enter_context(options[RECOMPUTE_HOOKS_KEY]())
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


@contextlib.contextmanager
def recording_layout(diffusion_model, family: Family, record: LayoutRecord, latent_shape, foreign: str):
    """Hooks, for the duration of one model call, that write its JointLayout into ``record`` when the first block
    receives its streams, from the text (and image) embedder's output (see attention.joint.read_joint_layout).
    ``foreign`` names the patches that may have changed the streams in between."""
    embedded = {}

    def keep(name):
        return lambda _module, _args, out: embedded.__setitem__(name, out)

    def read(_module, args, kwargs):
        streams = [kwargs[at] if isinstance(at, str) else args[at] for at in family.first_block_streams]
        if family.text_stream is not None:  # one stream [text | image]
            text_tokens = embedded["text"].shape[1]
            streams = [streams[0][:, :text_tokens], streams[0][:, text_tokens:]]
        record.layout = read_joint_layout(latent_shape, diffusion_model.patch_size, *streams,
                                          embedded["conditioning"], embedded.get("latent"), foreign,
                                          refined=family.text_stream is not None)

    handles = [diffusion_model.get_submodule(family.text_embedder).register_forward_hook(keep("conditioning"))]
    try:
        if family.image_embedder is not None:
            handles.append(diffusion_model.get_submodule(family.image_embedder).register_forward_hook(keep("latent")))
        if family.text_stream is not None:
            text_stream = diffusion_model.get_submodule(family.text_stream)
            if isinstance(text_stream, torch.nn.ModuleList):  # refiner blocks: the text leaves the last one
                text_stream = text_stream[-1]
            handles.append(text_stream.register_forward_hook(keep("text")))
        handles.append(diffusion_model.get_submodule(family.first_block).register_forward_pre_hook(read, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def marking_blocks(diffusion_model, blocks: tuple[TransformerBlock, ...]):
    """Hooks, for the duration of one model call, that name each of ``blocks`` in the transformer_options it runs
    with (``block_type``, ``block_index``), as ComfyUI's Flux forward does itself, for families whose forward names
    no block and offers no block replace (Z-Image)."""
    def naming(block: TransformerBlock):
        name, index, _ = block.key

        def name_block(_module, args, kwargs):
            options = {**kwargs.get("transformer_options", {}), "block_type": name, "block_index": index}
            return args, {**kwargs, "transformer_options": options}
        return name_block
    handles = [diffusion_model.get_submodule(block.module_path).register_forward_pre_hook(naming(block),
                                                                                          with_kwargs=True)
               for block in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def recording_query_inputs(diffusion_model, inputs: QueryInputs, record: LayoutRecord):
    """Forward hooks, for the duration of one model call, that record into ``inputs`` each block's image-token
    input of its query projection and the call's rotary position embedding (see attention.joint.QueryInputs).
    Hooks on the shared modules live only inside this call, so no other clone or graph ever sees them."""
    blocks = discover_transformer_blocks(diffusion_model.named_modules())
    handles = []

    def recorder(one_stream: bool):
        def record_input(_module, args):
            inputs.image_tokens = args[0][:, record.layout.text_tokens:] if one_stream else args[0]
        return record_input
    try:
        for block in blocks:
            module = diffusion_model.get_submodule(block.projections.image_query.path)
            handles.append(module.register_forward_pre_hook(recorder(block.projections.one_stream)))
        embedder = blocks[0].family.position_embedder
        if embedder is not None:
            handles.append(diffusion_model.get_submodule(embedder).register_forward_hook(
                lambda _module, _args, out: setattr(inputs, "positions", out)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def refuse_overwritten_dispatchers(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a clear error instead of sampling without our patch when another pack's
    attention patch, applied after our nodes, took a block (or a DiT's attention override) over."""
    options = executor.class_obj.model_options.get("transformer_options", {})
    chain = options.get(CHAIN_KEY)
    for point, block, replace in [*overwritten_dispatchers(options), *overwritten_joint_entries(options)]:
        serving = chain.processors if point in (JOINT_ATTENTION, "dit") else chain.at(point)
        owners = ", ".join(sorted({p.node_name for p in serving}))
        what = "the DiT attention override" if point == JOINT_ATTENTION else f"the {point} attention of block {block}"
        raise AttentionConflictError(
            f"{describe_foreign(replace) if replace is not None else 'a node'} replaced {what} after {owners} "
            f"patched it, so {owners} would silently do nothing; apply {owners} after that node (ours wrap it), "
            "or leave one of them out.")
    return executor(*args, **kwargs)


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_start, sigma_end) of a step range given in percent of sampling, ComfyUI-style."""
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))
