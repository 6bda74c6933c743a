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
  which costs one more pass of logits. When every such processor views cond rows only
  (``views_uncond_rows`` False: the word map, the calibration, the map preview), the view holds the cond chunks'
  samples alone (``call.of_cond_rows()``) and the other rows take the fused path. When every such processor
  only reads the text columns (``reads_text_columns_only``: the word map, the map preview) and a kernel returning
  each query's log-sum-exp ``L`` serves the call (``AttentionCall.attention_with_logsumexp``), the *text view*
  stands in: the image rows come from the fused kernel, and the readers get the probabilities of the first
  ``text`` joint keys alone, ``exp(q·k_textᵀ/√d - L)`` (equal to the cross view's columns; at Flux's size a
  twentieth of the logits), in the same row chunks. Text queries, image tokens after the latent's (Flux Kontext's
  references) and image-only calls (no text keys) are computed as without the pack. Edits of the logits
  of the image keys are allowed only when no self-attention owner takes the call (below).
  ``parallel_output`` processors (RealCustom's image branch) get the latent's image queries ``(B, N, heads * d)``
  (on Flux with RoPE applied, as the attention function gets them) and their output is added to those rows of
  the image output, whoever computes it (the plain joint attention through the fused function when no
  processor needs logits, the cross view's softmax, or a self-attention owner); text rows never get it.
  ``extra_key_values`` processors (PVA's identity tokens) get the latent's image queries and their keys join
  the softmax of those queries only, whoever computes it (fused attention, with the extra keys merged in by the
  plain kernel's log-sum-exp or widening its heads, see :mod:`.joint_softmax`; the cross view's logits, as extra
  columns after the joint keys, or the text view's log-sum-exp; a self-attention owner's softmax, as keys after
  ``call.context`` with their logits' difference from the owner's queries in ``call.context_bias``). A processor
  with its own projections (``needs_hidden_states``) gets ``call.hidden_states``, the input of the block's image query projection for the latent's tokens, and
  ``call.place_image_queries`` (Flux: the rotary position embedding of those tokens), both recorded during
  the model call by hooks the node glue installs (:class:`QueryInputs`).
- Both in one call (StyleAligned and DisenDiff's calibration on the same block): the cross view runs on
  the plain joint keys, and what its edits added to the text-key logits reaches the self-attention owner as
  ``call.context_bias`` ``(B, heads, N, T)`` (joined from the chunks), which it adds to its queries' logits
  of ``call.context`` (its softmax also holds the reference's image keys, which the cross view's maps do not
  see). The order of the nodes does not matter. An edit of image-key logits cannot move into the owner's
  softmax, whose image keys differ, and raises :class:`~.dispatcher.AttentionConflictError`.

What the dispatcher knows of each call, and from where:

- the token layout: text first in every supported family (Flux's double blocks concatenate ``txt, img``,
  its single blocks run on that concatenation, SD3's ``_block_mixing`` puts the context first), read from
  what the model's first block receives (:func:`read_joint_layout`, recorded by the node glue into a
  :class:`LayoutRecord` during the model call), never from the conditioning: the text stream there holds
  what the model and other packs put beside the prompt's tokens (SD3's register tokens; ComfyUI's USO style
  tokens through Flux's ``post_input`` patch), and the prompt's own columns (``call.text_keys``) are found in
  it. A call over exactly the image tokens is an image-only attention (SD3.5 Medium's ``x_block.attn2``).
  Image tokens are everything after the text (Flux Kontext's reference latents follow the main image); the
  first ``image_grid`` of them are the sampled latent.
- the block: ``transformer_options["block_type"/"block_index"]``, set by ComfyUI for Flux and by the node
  glue's block marker for MMDiT (whose forward does not set them);
- the q/k/v layout: ``skip_reshape=True`` means ``(B, heads, L, d)`` (Flux, RoPE already applied to q and
  k), else ``(B, L, heads * d)`` or ``(B, L, heads, d)`` (SD3 hands its values in the latter);
- the cond/uncond layout and the sigma, from transformer_options as on the U-Net.

Another pack's override installed before ours is kept as ``inner`` and called for every call none of our
processors takes part in, and for the calls where ours only read the probabilities or add an output
(RealCustom's word map and image branch: read from the cross view of the plain joint keys, added to its
output's image rows); a processor that replaces attention, edits its softmax or adds keys to it cannot compose
with it and raises :class:`~.dispatcher.AttentionConflictError` naming both. An override installed after ours
replaces it; the node glue then refuses to sample (see ``nodes.patching``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .dispatcher import (CHAIN_KEY, CROSS_ATTENTION, SELF_ATTENTION, AttentionCall, AttentionConflictError,
                         ExactAttentionCheck, JointKeys, ProcessorChain, attention_logits, attention_with_extra_keys,
                         describe_foreign, joint_logits, row_index)
from .layout import cond_row_indices
from .sdpa import merge_heads, split_heads

#: transformer_options key of the attention override ComfyUI's wrap_attn calls
OVERRIDE_KEY = "optimized_attention_override"
#: transformer_options key under which the node glue publishes the JointLayout of the running model call
LAYOUT_KEY = "personalization.joint_layout"
#: the patch point of the chain's ``served`` entries for the override
JOINT_ATTENTION = "joint"
#: transformer_options key of the QueryInputs the node glue records during a model call
QUERY_INPUTS_KEY = "personalization.query_inputs"


@dataclass(frozen=True)
class JointLayout:
    """Token layout of the joint sequences of one model call, as its first block received them."""

    #: text tokens at the front of every joint sequence
    text_tokens: int
    #: token grid (rows, columns) of the sampled latent: the first image tokens
    image_grid: tuple[int, int]
    #: the text tokens that are the prompt's conditioning; the others are tokens the model (SD3's registers) or
    #: another pack (ComfyUI's USO style tokens, through Flux's ``post_input`` patch) put beside them. None: all
    conditioning: Optional[slice] = None

    @property
    def image_tokens(self) -> int:
        return self.image_grid[0] * self.image_grid[1]

    @property
    def conditioning_columns(self) -> slice:
        return self.conditioning if self.conditioning is not None else slice(0, self.text_tokens)


class UnrecognisedLayoutError(RuntimeError):
    """The text and image tokens a DiT's first block receives cannot be told apart without guessing."""


class LayoutRecord:
    """Where the node glue writes the :class:`JointLayout` of a model call once its first block receives its
    streams (after every ``post_input`` patch): the attention calls of that call read it from here."""

    def __init__(self, layout: Optional[JointLayout] = None):
        self.layout = layout


def _offset_of_rows(part: torch.Tensor, whole: torch.Tensor) -> Optional[int]:
    """The offset ``o`` at which ``whole[:, o:o + n]`` equals the ``n`` token rows of ``part`` exactly, if any
    (both ``(B, tokens, width)``)."""
    count = part.shape[1]
    if part.shape[0] != whole.shape[0] or part.shape[2:] != whole.shape[2:] or count > whole.shape[1]:
        return None
    for offset in range(whole.shape[1] - count + 1):
        if torch.equal(whole[:, offset:offset + count], part):
            return offset
    return None


def read_joint_layout(latent_shape, patch_size: int, text: torch.Tensor, image: torch.Tensor,
                      conditioning: torch.Tensor, latent: Optional[torch.Tensor] = None,
                      foreign: str = "", refined: bool = False) -> JointLayout:
    """The layout of a model call from what its first block receives: the ``text`` and ``image`` streams
    ``(B, tokens, width)``, the ``conditioning`` as the text embedder made it, and (where nothing is added in
    between) the image embedder's output ``latent``, whose first tokens are the sampled latent's. DiTs patchify a
    latent of ``latent_shape`` (..., H, W) into ceil(H/p) x ceil(W/p) tokens (Flux and SD3 pad odd sizes).

    The conditioning must appear unchanged, in one piece, in the text stream, and the latent's tokens at the
    front of the image stream; otherwise UnrecognisedLayoutError, naming the ``foreign`` patches that changed
    the streams, since any other answer would be a guess. A ``refined`` text stream (a model's text-only refiner
    blocks ran on it, Z-Image's) holds the conditioning's tokens first, changed in value: they are its first
    rows."""
    height, width = latent_shape[-2:]
    grid = (-(-height // patch_size), -(-width // patch_size))
    image_tokens = grid[0] * grid[1]
    changed_by = f"; {foreign} changed them" if foreign else ""
    start = (0 if text.shape[1] >= conditioning.shape[1] else None) if refined else _offset_of_rows(conditioning, text)
    if start is None:
        raise UnrecognisedLayoutError(
            f"the text tokens the model's first block receives ({text.shape[1]}) do not hold the prompt's "
            f"{conditioning.shape[1]} conditioning tokens unchanged{changed_by}; the personalization nodes cannot "
            "tell which text tokens are the prompt's. Remove that patch or the personalization node.")
    if image.shape[1] < image_tokens or (latent is not None and not torch.equal(image[:, :image_tokens],
                                                                               latent[:, :image_tokens])):
        raise UnrecognisedLayoutError(
            f"the image tokens the model's first block receives ({image.shape[1]}) do not start with the sampled "
            f"latent's {image_tokens} tokens{changed_by}; the personalization nodes cannot tell which image tokens "
            "are the latent's. Remove that patch or the personalization node.")
    whole = start == 0 and conditioning.shape[1] == text.shape[1]
    return JointLayout(text.shape[1], grid, None if whole else slice(start, start + conditioning.shape[1]))


class QueryInputs:
    """What the image queries of the running block are computed from, recorded during one model call by hooks the
    node glue installs when a processor has its own projections: the image tokens' input of the block's query
    projection (written by each block in turn, so only the running block's is held) and the rotary position
    embedding of the call's tokens (Flux's ``pe``: ``(B, 1, L, d / 2, 2, 2)`` rotation matrices, ``[text | image]``
    order; None for families without one)."""

    def __init__(self, placement: Optional[Callable[[torch.Tensor], Callable]] = None):
        self.image_tokens: Optional[torch.Tensor] = None  # (B, image tokens, hidden)
        self.positions: Optional[torch.Tensor] = None
        #: the family's rotary placement (families.Family.query_placement): positions -> queries -> placed queries
        self.placement = placement


class UnrecognisedAttentionError(RuntimeError):
    """A DiT attention call whose token layout the dispatcher cannot read."""


def _queries_keys_values(args, kwargs):
    """(q, k, v, heads) of a wrap_attn call, whether ``heads`` came by position or by name."""
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    return q, k, v, heads


class JointAttentionDispatcher:
    """The attention override of one DiT clone (see the module docstring)."""

    def __init__(self, inner: Optional[Callable] = None, is_exact_attention: Optional[ExactAttentionCheck] = None):
        self.inner = inner
        self.is_exact_attention = is_exact_attention

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        chain: Optional[ProcessorChain] = options.get(CHAIN_KEY)
        record: Optional[LayoutRecord] = options.get(LAYOUT_KEY)
        block_type = options.get("block_type")
        if chain is None or record is None or block_type is None:
            return self._base(func, args, kwargs)
        layout = record.layout
        if layout is None:
            raise UnrecognisedLayoutError(
                f"an attention call of a {block_type} block ran before the model's first block received its text "
                "and image tokens (another pack's block replace does not run that block); the personalization "
                "nodes cannot tell its text from its image tokens.")
        q, k, v, heads = _queries_keys_values(args, kwargs)
        batched_heads = bool(kwargs.get("skip_reshape"))
        length = q.shape[2] if batched_heads else q.shape[1]
        text = self._text_tokens(length, layout, block_type)
        block = (block_type, int(options.get("block_index", 0)), 0)
        call = AttentionCall(options, func, q.shape[0], heads, (q.shape[-1] if batched_heads else q.shape[-1] // heads),
                             block, attn_precision=kwargs.get("attn_precision"), query_grid=layout.image_grid,
                             is_exact_attention=self.is_exact_attention)
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
            changing = owners + [p for p in crossing if any(p.overrides(hook) for hook in _SOFTMAX_HOOKS)]
            if changing:
                raise AttentionConflictError(
                    f"{changing[0].node_name} {'replaces' if owners else 'changes'} attention in block "
                    f"{block[0]}:{block[1]}, but {describe_foreign(self.inner)} already overrides DiT attention; "
                    "apply only one of them to this model.")
        if kwargs.get("mask") is not None:
            raise AttentionConflictError(
                f"{taking_part} cannot change attention in a call with an attention mask (block "
                f"{block[0]}:{block[1]}); remove the conditioning's attention mask or this node.")
        q, k, v = (merge_heads(t) if batched_heads else t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v))
        call.text_keys = layout.conditioning_columns if text else slice(0, 0)
        context = (k[:, :text], v[:, :text]) if text else None
        grid = layout.image_tokens
        if self.inner is not None:
            return self._around_inner(func, args, kwargs, q, k, v, text, grid, call, viewing, adding)
        if any(p.needs_hidden_states for p in crossing):
            _serve_query_inputs(call, options, text, grid)
        extras = _extra_keys(q[:, text:text + grid], call, crossing)
        viewed = _viewed_rows(call, viewing, q.shape[0]) if viewing else None
        latent_out = None
        if viewed == []:  # an uncond pass, and the processors view cond rows only
            viewing = []
        if viewing and not owners and all(_reads_text_columns_only(p) for p in viewing):
            latent_out = _text_view(q[:, text:text + grid], k, v, text, call, viewing, extras, viewed)
            if latent_out is not None:
                viewing = []
        if viewing and viewed is None:
            context, latent_out, call.context_bias = _cross_view(q[:, text:text + grid], k, v, text, call, viewing,
                                                                 owners[0] if owners else None, q.shape[1] - text,
                                                                 extras)
        elif viewing:
            latent_out, call.context_bias = _cross_view_of_cond_rows(q, k, v, text, grid, call, viewing,
                                                                     owners[0] if owners else None, extras, viewed)
        if owners:
            call.context = context
            if extras:
                _join_owner_context(call, q[:, text:text + grid], q.shape[1] - text, extras)
            image_out = owners[0].self_attention(q[:, text:], k[:, text:], v[:, text:], call)
        elif latent_out is not None or extras:
            if latent_out is None:
                latent_out = attention_with_extra_keys(q[:, text:text + grid], k, v, call, extras)
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

    def _around_inner(self, func, args, kwargs, q, k, v, text, grid, call, readers, adding):
        """Another pack's override computes the call; our processors that only read the probabilities or add an
        output compose with it: the reads from the cross view of the plain joint keys (what the U-Net dispatcher
        does around a foreign replace), the parallel outputs added to the latent's image rows of its output."""
        out = self.inner(func, *args, **kwargs)
        heads_first = bool(kwargs.get("skip_output_reshape"))
        merged = merge_heads(out) if heads_first else out
        if readers:
            _cross_view(q[:, text:text + grid], k, v, text, call, readers, None, q.shape[1] - text, output=False)
        if adding:
            image_out = _add_parallel_outputs(merged[:, text:], q[:, text:text + grid], call, adding)
            merged = torch.cat([merged[:, :text], image_out.to(merged.dtype)], dim=1)
        return split_heads(merged, call.heads) if heads_first else merged

    def _base(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)


def install_joint_dispatcher(existing: Optional[Callable],
                             is_exact_attention: Optional[ExactAttentionCheck] = None) -> JointAttentionDispatcher:
    """Ours if already installed, else a new one wrapping another pack's override (or none)."""
    if isinstance(existing, JointAttentionDispatcher):
        return existing
    return JointAttentionDispatcher(inner=existing, is_exact_attention=is_exact_attention)


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
#: cross-attention hooks that change the softmax another pack's override computes, so cannot compose with it
_SOFTMAX_HOOKS = ("edit_key_values", "edit_logits", "extra_key_values")


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


def _row_chunks(rows: int, bytes_per_row: int) -> list[slice]:
    """Query rows in chunks whose float32 logits stay under :data:`CROSS_VIEW_CHUNK_BYTES` (at least one row)."""
    size = max(1, CROSS_VIEW_CHUNK_BYTES // bytes_per_row)
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def _cross_view(queries, k, v, text: int, call: AttentionCall, crossing, owner, image_rows: int, extras=(),
                output: bool = True):
    """The cross view of a joint call for the processors ``crossing``: ``edit_key_values`` on the text keys/values,
    then the float32 logits ``(B, heads, N, L)`` of the latent's N image ``queries`` against the joint keys
    ``[text | image]`` and the ``extras`` keys (their own logits, after the joint keys' columns), served in chunks
    of query rows (``call.query_rows``; :data:`CROSS_VIEW_CHUNK_BYTES`) to ``survey_logits``, ``edit_logits`` and
    ``read_probs`` (the softmax of the edited logits), each chunk done before the next is made. Returns the edited
    text ``(keys, values)``; the latent's image output rows ``(B, N, heads*d)`` (that softmax times
    ``[text | image | extras]`` values), or None when a self-attention ``owner`` takes the call or no ``output`` is
    wanted (the reads only); and for the owner the text bias of the edits (:func:`_text_bias`) over its
    ``image_rows`` queries, else None."""
    text_keys, text_values = k[:, :text], v[:, :text]
    for processor in crossing:
        if processor.overrides("edit_key_values"):
            text_keys, text_values = processor.edit_key_values(text_keys, text_values, call)
    keys = torch.cat([text_keys, k[:, text:]], dim=1)
    extra_logits = torch.cat([joint_logits(queries, extra, call.heads) for extra in extras], dim=-1) if extras else None
    editors = [p for p in crossing if p.overrides("edit_logits")]
    readers = [p for p in crossing if p.overrides("read_probs")]
    columns = keys.shape[1] + (0 if extra_logits is None else extra_logits.shape[-1])
    chunks = _row_chunks(queries.shape[1], queries.shape[0] * call.heads * columns * 4)
    if len(chunks) > 1:
        _survey(queries, keys, extra_logits, call, editors, chunks)
    output = output and owner is None
    values = None if not output else split_heads(torch.cat([text_values, v[:, text:], *(extra.values.to(v.dtype)
                                                                                   for extra in extras)], dim=1),
                                            call.heads)
    outputs, biases = [], []
    for chunk in chunks:
        call.query_rows = chunk if len(chunks) > 1 else None
        plain = _chunk_logits(queries, keys, extra_logits, chunk, call.heads)
        logits = plain
        for processor in editors:  # processors return edited logits and leave their argument as it is
            logits = processor.edit_logits(logits, call)
        if owner:
            biases.append(_text_bias(logits, plain, text, owner, editors))
        del plain  # freed before the softmax is made (unless no processor edited it)
        probs = logits.softmax(dim=-1) if readers or output else None
        del logits
        for processor in readers:
            processor.read_probs(probs, call)
        if output:
            outputs.append(merge_heads(probs.to(values.dtype) @ values))
        del probs
    call.query_rows, call.surveys = None, {}
    if not owner:
        latent_out = (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]) if output else None
        return (text_keys, text_values), latent_out, None
    bias = torch.cat(biases, dim=2) if len(biases) > 1 else biases[0]
    if image_rows > bias.shape[2]:  # zero for image rows after the latent's (Flux Kontext's references)
        bias = torch.nn.functional.pad(bias, (0, 0, 0, image_rows - bias.shape[2]))
    return (text_keys, text_values), None, bias


def _reads_text_columns_only(processor) -> bool:
    return processor.reads_text_columns_only and not any(
        processor.overrides(hook) for hook in ("edit_key_values", "edit_logits", "survey_logits"))


def _text_view(queries, k, v, text: int, call: AttentionCall, readers, extras, rows) -> Optional[torch.Tensor]:
    """The latent's image output rows, and to ``readers`` that read the text columns only the probabilities of the
    first ``text`` joint keys for the query ``rows`` (None: all), from the fused kernel's log-sum-exp ``L`` of each
    query's joint softmax (extra keys included): ``exp(q·k_textᵀ/√d - L)``, exactly the cross view's columns at a
    twentieth of its cost at Flux's size, in row chunks as the cross view. None where no such kernel serves (the
    cross view serves them then)."""
    served = attention_with_extra_keys(queries, k, v, call, extras, with_logsumexp=True)
    if served is None:
        return None
    out, logsumexp = served
    view = call if rows is None else call.of_cond_rows()
    if rows is not None:
        index = row_index(rows, queries.device)
        queries, k, logsumexp = queries[index], k[index], logsumexp[index]
    text_keys = k[:, :text]
    chunks = _row_chunks(queries.shape[1], queries.shape[0] * call.heads * text * 4)
    for chunk in chunks:
        view.query_rows = chunk if len(chunks) > 1 else None
        probs = attention_logits(queries[:, chunk], text_keys, call.heads).sub_(logsumexp[:, :, chunk, None]).exp_()
        for reader in readers:
            reader.read_probs(probs, view)
        del probs
    view.query_rows, view.surveys = None, {}
    return out


def _viewed_rows(call: AttentionCall, viewing, batch: int) -> Optional[list[int]]:
    """The rows of the cond chunks when every viewing processor reads and edits only those (and none edits the
    keys every row attends to), else None: all rows."""
    if any(p.views_uncond_rows or p.overrides("edit_key_values") for p in viewing):
        return None
    rows = cond_row_indices(call.cond_or_uncond, batch)
    return None if len(rows) == batch else rows


def _cross_view_of_cond_rows(q, k, v, text: int, grid: int, call: AttentionCall, viewing, owner, extras, rows):
    """The cross view served to processors that view the cond ``rows`` only (:func:`_viewed_rows`): those rows'
    latent image output (None for an ``owner``) from the cross view of a call describing them, the other rows'
    through the fused function (with the ``extras`` keys they see); for an owner the text bias, zero on the other
    rows."""
    batch = q.shape[0]
    viewed, others = (row_index(r, q.device) for r in (rows, [r for r in range(batch) if r not in rows]))
    queries = q[:, text:text + grid]
    _, viewed_out, viewed_bias = _cross_view(queries[viewed], k[viewed], v[viewed], text, call.of_cond_rows(),
                                             viewing, owner, q.shape[1] - text, [e.of_rows(viewed) for e in extras])
    if owner:
        bias = viewed_bias.new_zeros(batch, *viewed_bias.shape[1:])
        bias[viewed] = viewed_bias
        return None, bias
    other_extras = [e.of_rows(others) for e in extras]
    other_out = (attention_with_extra_keys(queries[others], k[others], v[others], call, other_extras) if extras
                 else call.attention(queries[others], k[others], v[others]))
    out = viewed_out.new_empty(batch, *viewed_out.shape[1:])
    out[viewed], out[others] = viewed_out, other_out.to(out.dtype)
    return out, None


def _serve_query_inputs(call: AttentionCall, options: dict, text: int, grid: int) -> None:
    """``call.hidden_states`` and ``call.place_image_queries`` of the latent's image tokens, from the QueryInputs
    recorded during this model call."""
    inputs: Optional[QueryInputs] = options.get(QUERY_INPUTS_KEY)
    if inputs is None or inputs.image_tokens is None:
        raise RuntimeError("the input of this block's image query projection was not recorded; a processor with "
                           "needs_hidden_states must be added with nodes.patching.add_attention_processor")
    call._hidden_states = inputs.image_tokens[:, :grid]
    if inputs.positions is not None:
        call._image_query_placement = inputs.placement(inputs.positions[:, :, text:text + grid])


def _extra_keys(queries, call: AttentionCall, crossing) -> list[JointKeys]:
    """The keys ``extra_key_values`` processors add to the softmax of the latent's image ``queries``."""
    extras = []
    for processor in crossing:
        if processor.overrides("extra_key_values"):
            extra = processor.extra_key_values(queries, call)
            if extra is not None:
                extras.append(JointKeys.of(extra))
    return extras


def _join_owner_context(call: AttentionCall, queries, image_rows: int, extras: list[JointKeys]) -> None:
    """The extra keys after ``call.context`` of a self-attention owner, whose softmax scores every context key by
    the image queries: ``call.context_bias`` gains, on their columns, what their own logits (own queries, bias,
    rows) differ from that (-inf on image rows after the latent's, which never see them)."""
    keys, values = call.context
    call.context = (torch.cat([keys, *(extra.keys.to(keys.dtype) for extra in extras)], dim=1),
                    torch.cat([values, *(extra.values.to(values.dtype) for extra in extras)], dim=1))
    own = torch.cat([joint_logits(queries, extra, call.heads) for extra in extras], dim=-1)
    shared = attention_logits(queries, torch.cat([extra.keys for extra in extras], dim=1), call.heads)
    bias = own - shared
    if image_rows > bias.shape[2]:
        bias = torch.nn.functional.pad(bias, (0, 0, 0, image_rows - bias.shape[2]), value=float("-inf"))
    text_bias = call.context_bias if call.context_bias is not None else bias.new_zeros(*bias.shape[:3], keys.shape[1])
    call.context_bias = torch.cat([text_bias.to(bias.dtype), bias], dim=-1)


def _chunk_logits(queries, keys, extra_logits, chunk: slice, heads: int):
    """The cross view's float32 logits of the query rows ``chunk``: the joint keys', then the extra keys'."""
    logits = attention_logits(queries[:, chunk], keys, heads)
    return logits if extra_logits is None else torch.cat([logits, extra_logits[:, :, chunk]], dim=-1)


def _survey(queries, keys, extra_logits, call: AttentionCall, editors, chunks) -> None:
    """``call.surveys`` of the ``editors`` that survey the logits before editing them: one pass over the ``chunks``
    per such editor, its logits edited by the editors before it (whose surveys are then known)."""
    for position, editor in enumerate(editors):
        if not editor.overrides("survey_logits"):
            continue
        pieces = []
        for chunk in chunks:
            call.query_rows = chunk
            logits = _chunk_logits(queries, keys, extra_logits, chunk, call.heads)
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
