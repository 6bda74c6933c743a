"""The pack's one attention override per DiT clone: family-free views of a joint text+image attention.

ComfyUI routes every DiT attention through ``comfy.ldm.modules.attention.wrap_attn``, which hands the call
to ``transformer_options["optimized_attention_override"](func, q, k, v, heads, **kwargs)`` when one is set:
Flux's double and single blocks, SD3/SD3.5's joint blocks and SD3.5 Medium's second, image-only attention.
The pack installs ONE :class:`JointAttentionDispatcher` there per clone (DESIGN.md §3). It finds the
processors of the running block in the same :class:`~.dispatcher.ProcessorChain` the U-Net dispatchers
use, and hands each the view of the call it knows from the U-Net:

- ``SELF_ATTENTION`` processors (StyleAligned) get the image-token self-attention: the image tokens'
  q/k/v as ``(B, N, heads * d)``, with the sample's own text keys/values as ``call.context``, since in the
  joint softmax image queries see both. Text queries are computed as without the pack.
- ``CROSS_ATTENTION`` processors are not served on DiT models yet; their nodes refuse DiT models.

What the dispatcher knows of each call, and from where:

- the token layout: text first in every supported family (Flux's double blocks concatenate ``txt, img``,
  its single blocks run on that concatenation, SD3's ``_block_mixing`` puts the context first); the text
  token count comes from the model call (:class:`JointLayout`, published into transformer_options by the
  node glue around ``apply_model``). A call over exactly the image tokens is an image-only attention (SD3.5
  Medium's ``x_block.attn2``). Image tokens are everything after the text (Flux Kontext's reference latents
  follow the main image); the first ``image_grid`` of them are the sampled latent.
- the block: ``transformer_options["block_type"/"block_index"]``, set by ComfyUI for Flux and by the node
  glue's block marker for MMDiT (whose forward does not set them);
- the q/k/v layout: ``skip_reshape=True`` means ``(B, heads, L, d)`` (Flux, RoPE already applied to q and
  k), else ``(B, L, heads * d)`` or ``(B, L, heads, d)`` (SD3 hands its values in the latter);
- the cond/uncond layout and the sigma, from transformer_options as on the U-Net.

Another pack's override installed before ours is kept as ``inner`` and called for every call none of our
processors takes part in; a processor that replaces attention cannot compose with it and raises
:class:`~.dispatcher.AttentionConflictError` naming both. An override installed after ours replaces it; the
node glue then refuses to sample (see ``nodes.patching``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dispatcher import (CHAIN_KEY, SELF_ATTENTION, AttentionCall, AttentionConflictError, ProcessorChain,
                         describe_foreign)
from .sdpa import merge_heads, split_heads

#: transformer_options key of the attention override ComfyUI's wrap_attn calls
OVERRIDE_KEY = "optimized_attention_override"
#: transformer_options key under which the node glue publishes the JointLayout of the running model call
LAYOUT_KEY = "personalization.joint_layout"
#: the patch point of the chain's ``served`` entries for the override
JOINT_ATTENTION = "joint"


@dataclass(frozen=True)
class JointLayout:
    """Token layout of the joint sequences of one model call."""

    #: text tokens at the front of every joint sequence
    text_tokens: int
    #: token grid (rows, columns) of the sampled latent: the first image tokens
    image_grid: tuple[int, int]

    @property
    def image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]


class UnrecognisedAttentionError(RuntimeError):
    """A DiT attention call whose token layout the dispatcher cannot read."""


def _queries_keys_values(args, kwargs):
    """(q, k, v, heads) of a wrap_attn call, whether ``heads`` came by position or by name."""
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    return q, k, v, heads


class JointAttentionDispatcher:
    """The attention override of one DiT clone (see the module docstring)."""

    def __init__(self, inner: Optional[Callable] = None):
        self.inner = inner

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        chain: Optional[ProcessorChain] = options.get(CHAIN_KEY)
        layout: Optional[JointLayout] = options.get(LAYOUT_KEY)
        block_type = options.get("block_type")
        if chain is None or layout is None or block_type is None:
            return self._base(func, args, kwargs)
        q, k, v, heads = _queries_keys_values(args, kwargs)
        batched_heads = bool(kwargs.get("skip_reshape"))
        length = q.shape[2] if batched_heads else q.shape[1]
        text = self._text_tokens(length, layout, block_type)
        block = (block_type, int(options.get("block_index", 0)), 0)
        call = AttentionCall(options, func, q.shape[0], heads, (q.shape[-1] if batched_heads else q.shape[-1] // heads),
                             block, attn_precision=kwargs.get("attn_precision"))
        owners = [p for p in chain.at(SELF_ATTENTION) if p.active(call)]
        if not owners:
            return self._base(func, args, kwargs)
        if len(owners) > 1:
            raise AttentionConflictError(
                f"{owners[0].node_name} and {owners[1].node_name} both replace self-attention in block "
                f"{block[0]}:{block[1]}; use one of them per model.")
        if self.inner is not None:
            raise AttentionConflictError(
                f"{owners[0].node_name} replaces attention in block {block[0]}:{block[1]}, but "
                f"{describe_foreign(self.inner)} already overrides DiT attention; apply only one of them to this model.")
        if kwargs.get("mask") is not None:
            raise AttentionConflictError(
                f"{owners[0].node_name} cannot share attention in a call with an attention mask (block "
                f"{block[0]}:{block[1]}); remove the conditioning's attention mask or this node.")
        q, k, v = (merge_heads(t) if batched_heads else t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
        call.context = (k[:, :text], v[:, :text]) if text else None
        out = owners[0].self_attention(q[:, text:], k[:, text:], v[:, text:], call)
        if text:
            out = torch.cat([call.attention(q[:, :text], k, v), out.to(q.dtype)], dim=1)
        return split_heads(out, heads) if kwargs.get("skip_output_reshape") else out

    @staticmethod
    def _text_tokens(length: int, layout: JointLayout, block_type: str) -> int:
        """Text tokens at the front of a call over ``length`` tokens: the model call's text count for a joint
        text+image attention, 0 for an image-only one."""
        if length >= layout.text_tokens + layout.image_tokens:
            return layout.text_tokens
        if length == layout.image_tokens:
            return 0
        raise UnrecognisedAttentionError(
            f"an attention call of a {block_type} block runs over {length} tokens, which is neither the "
            f"{layout.text_tokens} text + {layout.image_tokens} image tokens of this model call nor its image "
            "tokens alone; the personalization nodes cannot tell its text from its image tokens.")

    def _base(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)


def install_joint_dispatcher(existing: Optional[Callable]) -> JointAttentionDispatcher:
    """Ours if already installed, else a new one wrapping another pack's override (or none)."""
    if isinstance(existing, JointAttentionDispatcher):
        return existing
    return JointAttentionDispatcher(inner=existing)


def joint_layout(latent_shape, context_tokens: int, patch_size: int, register_tokens: int = 0) -> JointLayout:
    """The layout of a model call on a latent of ``latent_shape`` (..., H, W) with ``context_tokens`` text
    tokens: DiTs patchify the latent into ceil(H/p) x ceil(W/p) tokens (Flux and SD3 pad odd sizes) and
    put learned register tokens, if any (SD3's register_length), in front of the text."""
    height, width = latent_shape[-2:]
    return JointLayout(text_tokens=register_tokens + context_tokens,
                       image_grid=(-(-height // patch_size), -(-width // patch_size)))


class BlockMarker:
    """``dit`` block replace that names the running block in transformer_options for the attention calls
    inside it (ComfyUI's MMDiT forward does not, Flux's does). It runs the block, or the replace another pack
    installed at this block before ours, with the same arguments otherwise."""

    def __init__(self, block_type: str, index: int, inner: Optional[Callable] = None):
        self.block_type, self.index, self.inner = block_type, index, inner

    def __call__(self, args: dict, extra: dict):
        options = {**args.get("transformer_options", {}), "block_type": self.block_type, "block_index": self.index}
        args = {**args, "transformer_options": options}
        if self.inner is not None:
            return self.inner(args, extra)
        return extra["original_block"](args)


def install_block_marker(existing: Optional[Callable], block_type: str, index: int) -> BlockMarker:
    if isinstance(existing, BlockMarker):
        return existing
    return BlockMarker(block_type, index, inner=existing)


def overwritten_joint_entries(transformer_options: dict):
    """(point, key, entry) of every joint entry our chain is served at that is no longer ours: the attention
    override, or an MMDiT block marker, replaced by another pack after our nodes ran."""
    chain: Optional[ProcessorChain] = transformer_options.get(CHAIN_KEY)
    for point, key in sorted(chain.served) if chain else ():
        if point == JOINT_ATTENTION:
            entry = transformer_options.get(OVERRIDE_KEY)
            if not isinstance(entry, JointAttentionDispatcher):
                yield point, key, entry
        elif point == "dit":
            entry = transformer_options.get("patches_replace", {}).get("dit", {}).get(key)
            if not isinstance(entry, BlockMarker):
                yield point, key, entry
