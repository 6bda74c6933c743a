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
- ``CROSS_ATTENTION`` processors get the *cross view*: ``edit_key_values`` the text keys/values (the
  tokens in front of the image tokens), then ``edit_logits`` and ``read_probs`` the ``(B, heads, N, L)``
  logits / probabilities of the sampled latent's N image queries against ALL joint keys ``[text | image]``,
  one softmax over them, as in the unpatched joint attention. ``call.text_keys`` is the slice of columns
  holding the conditioning's tokens (after SD3's register tokens, if any) and ``call.query_grid`` the
  latent's token grid, so a processor written for a U-Net attn2 (whose logits are its text keys, the same
  ``call.text_keys`` and ``call.query_grid``) runs here unchanged; what changes is only that its softmax also
  covers the image keys, which is what the DiT attends with. The image output is that softmax times
  ``[text values | image values]``. Those logits are made in chunks of query rows, each chunk edited, read
  and turned into its output rows before the next is made (``call.query_rows`` names a chunk's rows;
  :data:`CROSS_VIEW_CHUNK_BYTES`): all of them are 1.7 GiB per sample at Flux's 1024 px, and a call held up
  to three such tensors; in chunks one call's transient peak there fell from 3.6-5.2 GiB to under 0.5 GiB
  (batch 1, bench/cross_view_memory.py). Readers join their per-row reductions (``call.gather_rows``); an editor that
  needs every row before editing any (DisenDiff's class maps) surveys all chunks first (``survey_logits``),
  which costs one more pass of logits. Text queries, image tokens after the latent's (Flux Kontext's
  references) and image-only calls (no text keys) are computed as without the pack. Edits of the logits
  of the image keys are allowed only when no self-attention owner takes the call (below).
  ``parallel_output`` processors (RealCustom's image branch) get the latent's image queries ``(B, N, heads * d)``
  (on Flux with RoPE applied, as the attention function gets them) and their output is added to those rows of
  the image output, whoever computes it (the plain joint attention through the fused function when no
  processor needs logits, the cross view's softmax, or a self-attention owner); text rows never get it.
  ``extra_key_values`` is not served on joint attention yet.
- Both in one call (StyleAligned and DisenDiff's calibration on the same block): the cross view runs on
  the plain joint keys, and what its edits added to the text-key logits reaches the self-attention owner as
  ``call.context_bias`` ``(B, heads, N, T)`` (joined from the chunks), which it adds to its queries' logits
  of ``call.context`` (its softmax also holds the reference's image keys, which the cross view's maps do not
  see). The order of the nodes does not matter. An edit of image-key logits cannot move into the owner's
  softmax, whose image keys differ, and raises :class:`~.dispatcher.AttentionConflictError`.

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
processors takes part in; a processor that replaces attention or edits its softmax cannot compose with it
and raises :class:`~.dispatcher.AttentionConflictError` naming both. An override installed after ours
replaces it; the node glue then refuses to sample (see ``nodes.patching``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dispatcher import (CHAIN_KEY, CROSS_ATTENTION, SELF_ATTENTION, AttentionCall, AttentionConflictError,
                         ProcessorChain, attention_logits, describe_foreign)
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
    #: of the text tokens, the learned register tokens in front of the conditioning's (SD3's register_length)
    register_tokens: int = 0

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
                             block, attn_precision=kwargs.get("attn_precision"), query_grid=layout.image_grid)
        owners = [p for p in chain.at(SELF_ATTENTION) if p.active(call)]
        # an image-only attention has no text keys: nothing of a cross view
        crossing = [p for p in chain.at(CROSS_ATTENTION) if p.active(call)] if text else []
        viewing = [p for p in crossing if any(p.overrides(hook) for hook in _CROSS_VIEW_HOOKS)]
        adding = [p for p in crossing if p.overrides("parallel_output")]
        if not owners and not crossing:
            return self._base(func, args, kwargs)
        taking_part = (owners + crossing)[0].node_name
        if len(owners) > 1:
            raise AttentionConflictError(
                f"{owners[0].node_name} and {owners[1].node_name} both replace self-attention in block "
                f"{block[0]}:{block[1]}; use one of them per model.")
        if self.inner is not None:
            raise AttentionConflictError(
                f"{taking_part} {'replaces' if owners else 'changes'} attention in block {block[0]}:{block[1]}, but "
                f"{describe_foreign(self.inner)} already overrides DiT attention; apply only one of them to this model.")
        if kwargs.get("mask") is not None:
            raise AttentionConflictError(
                f"{taking_part} cannot change attention in a call with an attention mask (block "
                f"{block[0]}:{block[1]}); remove the conditioning's attention mask or this node.")
        unserved = [p for p in crossing if p.overrides("extra_key_values")]
        if unserved:
            raise AttentionConflictError(f"{unserved[0].node_name} adds keys to cross-attention, which the pack does "
                                         "not do on joint (DiT) attention yet.")
        q, k, v = (merge_heads(t) if batched_heads else t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
        call.text_keys = slice(layout.register_tokens, text)
        context = (k[:, :text], v[:, :text]) if text else None
        grid = layout.image_tokens
        latent_out = None
        if viewing:
            context, latent_out, call.context_bias = _cross_view(q[:, text:text + grid], k, v, text, call, viewing,
                                                                 owners[0] if owners else None, q.shape[1] - text)
        if owners:
            call.context = context
            image_out = owners[0].self_attention(q[:, text:], k[:, text:], v[:, text:], call)
        elif latent_out is not None:
            image_out = latent_out
            if q.shape[1] > text + grid:  # image tokens after the latent's (Flux Kontext's references): plain
                image_out = torch.cat([image_out, call.attention(q[:, text + grid:], k, v)], dim=1)
        else:  # only parallel outputs: the image rows of the plain joint attention, through the fused function
            image_out = call.attention(q[:, text:], k, v)
        if adding:
            image_out = _add_parallel_outputs(image_out, q[:, text:text + grid], call, adding)
        out = torch.cat([call.attention(q[:, :text], k, v), image_out.to(q.dtype)], dim=1) if text else image_out
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
                       image_grid=(-(-height // patch_size), -(-width // patch_size)), register_tokens=register_tokens)


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


#: cross-attention hooks served on the cross view's logits (``parallel_output`` needs no logits)
_CROSS_VIEW_HOOKS = ("edit_key_values", "edit_logits", "read_probs")


def _add_parallel_outputs(image_out, queries, call: AttentionCall, adding):
    """``image_out`` (all image rows) plus each processor's ``parallel_output`` of the latent's image ``queries``
    on the latent's rows; image tokens after the latent's (Flux Kontext's references) get nothing."""
    grid = queries.shape[1]
    latent_out = image_out[:, :grid]
    for processor in adding:
        extra = processor.parallel_output(queries, call)
        if extra is not None:
            latent_out = latent_out + extra.to(latent_out.dtype)
    return torch.cat([latent_out, image_out[:, grid:]], dim=1) if image_out.shape[1] > grid else latent_out


#: bytes of the float32 logits of one row chunk of the cross view. Its logits of all the latent's image queries
#: are (B, heads, N, L): at Flux's 1024 px (24 heads, 4096 image + 512 text keys) 1.7 GiB per sample, and a call
#: holds up to three tensors of that size at once (logits, edited logits, probabilities). Chunks whose logits
#: stay under this budget hold a call's logit-sized transients to a few times it at any resolution and batch,
#: next to the ~0.3 GiB of joint q/k/v copies such a call makes anyway (bench/cross_view_memory.py); a chunk is
#: still 150 query rows there, so its matrix products stay large.
CROSS_VIEW_CHUNK_BYTES = 64 * 2 ** 20


def _cross_view(queries, k, v, text: int, call: AttentionCall, crossing, owner, image_rows: int):
    """The cross view of a joint call for the processors ``crossing``: ``edit_key_values`` on the text keys/values,
    then the float32 logits ``(B, heads, N, L)`` of the latent's N image ``queries`` against the joint keys
    ``[text | image]``, served in chunks of query rows (``call.query_rows``; :data:`CROSS_VIEW_CHUNK_BYTES`) to
    ``survey_logits``, ``edit_logits`` and ``read_probs`` (the softmax of the edited logits), each chunk done before
    the next is made. Returns the edited text ``(keys, values)``; the latent's image output rows ``(B, N, heads*d)``
    (that softmax times ``[text | image]`` values), or None when a self-attention ``owner`` takes the call; and for
    the owner the text bias of the edits (:func:`_text_bias`) over its ``image_rows`` queries, else None."""
    text_keys, text_values = k[:, :text], v[:, :text]
    for processor in crossing:
        if processor.overrides("edit_key_values"):
            text_keys, text_values = processor.edit_key_values(text_keys, text_values, call)
    keys = torch.cat([text_keys, k[:, text:]], dim=1)
    editors = [p for p in crossing if p.overrides("edit_logits")]
    readers = [p for p in crossing if p.overrides("read_probs")]
    rows = max(1, CROSS_VIEW_CHUNK_BYTES // (queries.shape[0] * call.heads * keys.shape[1] * 4))
    chunks = [slice(start, min(start + rows, queries.shape[1])) for start in range(0, queries.shape[1], rows)]
    if len(chunks) > 1:
        _survey(queries, keys, call, editors, chunks)
    values = None if owner else split_heads(torch.cat([text_values, v[:, text:]], dim=1), call.heads)
    outputs, biases = [], []
    for chunk in chunks:
        call.query_rows = chunk if len(chunks) > 1 else None
        plain = attention_logits(queries[:, chunk], keys, call.heads)
        logits = plain
        for processor in editors:  # processors return edited logits and leave their argument as it is
            logits = processor.edit_logits(logits, call)
        if owner:
            biases.append(_text_bias(logits, plain, text, owner, editors))
        del plain  # freed before the softmax is made (unless no processor edited it)
        probs = logits.softmax(dim=-1) if readers or not owner else None
        del logits
        for processor in readers:
            processor.read_probs(probs, call)
        if not owner:
            outputs.append(merge_heads(probs.to(values.dtype) @ values))
        del probs
    call.query_rows, call.surveys = None, {}
    if not owner:
        return (text_keys, text_values), torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0], None
    bias = torch.cat(biases, dim=2) if len(biases) > 1 else biases[0]
    if image_rows > bias.shape[2]:  # zero for image rows after the latent's (Flux Kontext's references)
        bias = torch.nn.functional.pad(bias, (0, 0, 0, image_rows - bias.shape[2]))
    return (text_keys, text_values), None, bias


def _survey(queries, keys, call: AttentionCall, editors, chunks) -> None:
    """``call.surveys`` of the ``editors`` that survey the logits before editing them: one pass over the ``chunks``
    per such editor, its logits edited by the editors before it (whose surveys are then known)."""
    for position, editor in enumerate(editors):
        if not editor.overrides("survey_logits"):
            continue
        pieces = []
        for chunk in chunks:
            call.query_rows = chunk
            logits = attention_logits(queries[:, chunk], keys, call.heads)
            for earlier in editors[:position]:
                logits = earlier.edit_logits(logits, call)
            survey = editor.survey_logits(logits, call)
            if survey is None:  # nothing to survey in this call
                break
            pieces.append(survey)
        if pieces:
            call.surveys[editor.name] = torch.cat(pieces, dim=1)


def _text_bias(logits, plain, text: int, owner, editors):
    """What the cross view's edits added to the ``plain`` logits of some query rows, as a bias ``(B, heads, rows,
    text)`` on the text columns of a self-attention owner's softmax; edits of image columns cannot move into
    another softmax over other image keys."""
    if not torch.equal(logits[..., text:], plain[..., text:]):
        raise AttentionConflictError(
            f"{editors[0].node_name} edits the image-key logits of a joint attention that {owner.node_name} replaces; "
            "apply only one of them to these blocks.")
    return logits[..., :text] - plain[..., :text]
