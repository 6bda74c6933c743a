"""StyleAligned shared self-attention (Hertz et al., CVPR 2024), over ComfyUI's projected q/k/v.

For every target image t of a cond/uncond chunk with reference r (sample 0 of the chunk):

    q̂_t = AdaIN(q_t, q_r)   k̂_t = AdaIN(k_t, k_r)   (v̂_t = AdaIN(v_t, v_r) if enabled)
    out_t = softmax([q̂_t k̂_tᵀ ; s·q̂_t k_rᵀ + b] / √d) [v̂_t ; v_r]

with s = ``score_scale`` and b = ``score_shift`` = ln λ. The paper's formula leaves the reference's
own output unchanged (its two key halves are identical; AdaIN with its own statistics is the
identity), so the reference rows are computed as plain attention: bit-identical to unpatched
sampling rather than equal up to float rounding.

On a DiT the dispatcher hands the processor the image tokens of each joint text+image attention (and of
SD3.5 Medium's image-only attention) with the sample's own text keys/values as ``call.context``: image
queries are normalised and share the reference's IMAGE keys/values, never its text tokens, and still see
their own text as in the unpatched joint softmax. Text queries are left to the dispatcher (unchanged).
Where cross-attention processors share the joint call (DisenDiff calibration), their edits of the image
queries' text logits come as ``call.context_bias`` and are added to the text columns of every softmax here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .adain import adain
from .blocks import BlockKey
from .dispatcher import SELF_ATTENTION, AttentionCall, AttentionProcessor, sigma_in_range
from .layout import merge_chunks, split_chunks


@dataclass(frozen=True)
class StyleAlignedSettings:
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    score_scale: float = 1.0
    score_shift: float = 0.0
    full_attention_share: bool = False


def shared_self_attention(q, k, v, n_chunks: int, settings: StyleAlignedSettings, attention,
                          context: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                          context_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """StyleAligned self-attention for ``(n_chunks * B, N, C)`` image-token q/k/v.

    ``attention(q, k, v, mask=None)`` computes plain attention over ``(B, N, C)`` tensors (heads are
    the callee's business). A chunk of one sample is plain attention.

    ``context``: ``(keys, values)`` of shape ``(n_chunks * B, T, C)`` that each sample's image queries also
    attend to, in front of the image keys, as they are: a DiT's text tokens of the same sample, whose joint
    softmax covers text and image keys. They are neither normalised nor shared between samples. None on a
    U-Net, whose self-attention sees image tokens only.

    ``context_bias``: ``(n_chunks * B, heads, N, T)`` logits added to each sample's queries' logits of its
    context keys (the edits of cross-attention processors in the same joint call), or None.
    """
    qs, ks, vs = (split_chunks(t, n_chunks) for t in (q, k, v))
    batch, tokens, channels = qs.shape[1], qs.shape[2], qs.shape[3]
    context_keys, context_values = (split_chunks(t, n_chunks) for t in context) if context is not None else (None, None)
    biases = split_chunks(context_bias, n_chunks) if context_bias is not None else None

    def logit_mask(samples: slice, n_keys: int, shift: float = 0.0):
        """Additive mask over ``n_keys`` keys (context first) of the samples' queries: their context bias, and
        ``shift`` on the last ``tokens`` keys (the reference's); None when neither applies."""
        if biases is None:
            if shift == 0.0:
                return None
            mask = torch.zeros(1, 1, n_keys, dtype=q.dtype, device=q.device)
        else:
            bias = biases[:, samples]
            mask = F.pad(rows(bias), (0, n_keys - bias.shape[-1])).to(q.dtype)
        if shift != 0.0:
            mask[..., -tokens:] += shift
        return mask

    def own_context_first(keys, values, samples: slice):
        """Each sample's keys/values behind its own context tokens."""
        if context_keys is None:
            return keys, values
        return (torch.cat([context_keys[:, samples], keys], dim=2),
                torch.cat([context_values[:, samples], values], dim=2))

    def rows(t):
        return t.reshape(-1, *t.shape[2:])

    if batch < 2:
        keys, values = own_context_first(ks, vs, slice(None))
        return attention(q, rows(keys), rows(values), mask=logit_mask(slice(None), keys.shape[2]))
    if settings.full_attention_share:
        def every_image(t):
            return t.reshape(n_chunks, 1, batch * tokens, channels)
        if context_keys is None:  # one attention over the chunk's tokens, queries included
            return attention(*(every_image(t)[:, 0] for t in (q, k, v))).reshape(q.shape)
        keys, values = own_context_first(every_image(ks).expand(-1, batch, -1, -1),
                                         every_image(vs).expand(-1, batch, -1, -1), slice(None))
        return attention(q, rows(keys), rows(values), mask=logit_mask(slice(None), keys.shape[2]))

    q_ref, k_ref, v_ref = qs[:, :1], ks[:, :1], vs[:, :1]
    q_tgt, k_tgt, v_tgt = qs[:, 1:], ks[:, 1:], vs[:, 1:]
    if settings.adain_queries:
        q_tgt = adain(q_tgt, q_ref)
    if settings.adain_keys:
        k_tgt = adain(k_tgt, k_ref)
    if settings.adain_values:
        v_tgt = adain(v_tgt, v_ref)
    targets = batch - 1
    shared_keys = k_ref if settings.score_scale == 1.0 else k_ref * settings.score_scale
    keys, values = own_context_first(torch.cat([k_tgt, shared_keys.expand(-1, targets, -1, -1)], dim=2),
                                     torch.cat([v_tgt, v_ref.expand(-1, targets, -1, -1)], dim=2), slice(1, None))
    out = torch.empty_like(qs)
    ref_keys, ref_values = own_context_first(k_ref, v_ref, slice(0, 1))
    out[:, 0] = attention(q_ref[:, 0], ref_keys[:, 0], ref_values[:, 0], mask=logit_mask(slice(0, 1), ref_keys.shape[2]))
    out[:, 1:] = attention(rows(q_tgt), rows(keys), rows(values),
                           mask=logit_mask(slice(1, None), keys.shape[2], settings.score_shift)
                           ).view(n_chunks, targets, tokens, channels)
    return merge_chunks(out)


@dataclass(frozen=True)
class SharedAttentionProcessor(AttentionProcessor):
    """The StyleAligned processor: shares self-attention in the selected blocks and sigma range."""

    settings: StyleAlignedSettings
    blocks: frozenset[BlockKey]
    sigma_start: float = float("inf")
    sigma_end: float = 0.0

    name = "style_aligned"
    node_name = "SharedAttentionBatch"
    patch_point = SELF_ATTENTION

    def active(self, call: AttentionCall) -> bool:
        return call.block in self.blocks and sigma_in_range(call.sigma, self.sigma_start, self.sigma_end)

    def self_attention(self, q, k, v, call: AttentionCall) -> torch.Tensor:
        return shared_self_attention(q, k, v, call.n_chunks, self.settings, call.attention, call.context,
                                     call.context_bias)
