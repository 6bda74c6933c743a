"""Parallel Visual Attention (Xu et al., "Personalized Face Inpainting with Diffusion Models by Parallel
Visual Attention", WACV 2024): identity tokens join the text tokens in every cross-attention softmax.

Per cross-attention layer, with ``x`` the layer's normed hidden states, ``T`` the text context and ``I``
the identity tokens of the image's reference faces (specs/pva.md §2.3, official ``pva_forward``)::

    Q_t = to_q(x)          K_t = to_k(T)          V_t = to_v(T)           the layer's own projections
    Q_v = to_visual_q(x)   K_v = to_visual_k(I)   V_v = to_visual_v(I)    parallel copies, trained
    P   = softmax([Q_t K_tᵀ , Q_v K_vᵀ + ln s] / √d)   per head: ONE softmax over text + identity keys
    out = P · [V_t ; V_v]                                → the layer's own to_out

The identity keys compete with the text keys for attention mass; nothing is summed with a weight.
``s`` is the node's strength (not in the paper): it multiplies the identity keys' share of the softmax
before normalisation; 1 is the paper, 0 removes them (exactly plain cross-attention). The query side is
the one thing the dispatcher's text path does not have, hence ``needs_hidden_states``.

On a DiT (:class:`JointParallelProjection`) the identity tokens join the joint softmax of the latent's image
queries over ``[text | image]`` keys; text queries never see them. The parallel projections are initialised
from the block's own as in cross-attention: ``to_visual_q`` from the image stream's query projection (with a copy
of its per-head query norm; Flux then rotates it by the image token's position, as its own queries), and
``to_visual_k``/``to_visual_v`` from the text stream's key/value projections (with a copy of its key norm; no
rotation, as Flux's text tokens sit at position 0): the identity tokens take the place of text tokens, at the
block's hidden width.

Low rank (:class:`LowRankParallelProjection`, :class:`LowRankJointProjection`): a parallel projection that is the
block's own frozen projection ``W`` plus a trained low-rank change ``B·A`` (``attention.low_rank``, B zero at the
start). ``W`` is not held: it is read from the model at run time through :class:`OwnProjections`, so the adapter
holds ``rank · (in + out)`` numbers per projection instead of ``in · out``, and at step 0 it computes exactly what
the full-rank copy computes (the paper's initialisation). The full-rank classes (files of format pva-v1) stay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BlockKey
from .dispatcher import CROSS_ATTENTION, AttentionCall, AttentionProcessor, JointKeys, sigma_in_range
from .head_norm import HeadNorm
from .joint_softmax import ProjectedQueries
from .low_rank import LowRankChange

#: value of a cond chunk in ComfyUI's ``cond_or_uncond`` (``comfy.samplers.COND``).
COND = 0


def block_name(key: BlockKey) -> str:
    """Module-dict name of a transformer block, e.g. ``("input", 1, 0)`` → ``"input_1_0"``."""
    return "_".join(str(part) for part in key)


def _copy_outputs(layer: nn.Linear, source: nn.Linear, rows: slice) -> None:
    """``layer`` := the outputs ``rows`` of ``source`` (weight and bias), in float32."""
    with torch.no_grad():
        layer.weight.copy_(source.weight[rows].float())
        if layer.bias is not None:
            layer.bias.copy_(source.bias[rows].float())


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer on ``x``'s device and dtype (the weights live in their own ModelPatcher, in fp32)."""
    return F.linear(x, layer.weight.to(x), None if layer.bias is None else layer.bias.to(x))


class ParallelProjection(nn.Module):
    """``to_visual_q/k/v`` of one cross-attention layer, shaped (and initialised) like its to_q/k/v."""

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_visual_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_visual_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_visual_v = nn.Linear(context_dim, inner_dim, bias=bias)

    @classmethod
    def copy_of(cls, attn2: nn.Module) -> "ParallelProjection":
        """The paper's initialisation: exact copies of the layer's to_q, to_k, to_v."""
        projection = cls(attn2.to_q.in_features, attn2.to_k.in_features, attn2.to_q.out_features,
                         bias=attn2.to_q.bias is not None)
        for mine, theirs in ((projection.to_visual_q, attn2.to_q), (projection.to_visual_k, attn2.to_k),
                             (projection.to_visual_v, attn2.to_v)):
            _copy_outputs(mine, theirs, slice(None))
        return projection

    @property
    def context_dim(self) -> int:
        """Width of the identity tokens the projections take."""
        return self.to_visual_k.in_features

    def queries(self, call: AttentionCall, own: Optional["OwnProjections"] = None) -> ProjectedQueries:
        """``to_visual_q`` of the layer's input, left for the dispatcher to fold into the identity keys (a full-rank
        copy needs no ``own`` projections)."""
        return ProjectedQueries(call.hidden_states, self.to_visual_q.weight, self.to_visual_q.bias)

    def keys_values(self, identity_tokens: torch.Tensor,
                    own: Optional["OwnProjections"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return _linear(self.to_visual_k, identity_tokens), _linear(self.to_visual_v, identity_tokens)


def _per_head(norm: Optional[HeadNorm], x: torch.Tensor) -> torch.Tensor:
    """``norm`` over each head of ``x`` (..., heads * d)."""
    return x if norm is None else norm(x.unflatten(-1, (-1, norm.weight.shape[0]))).flatten(-2)


class JointParallelProjection(nn.Module):
    """``to_visual_q/k/v`` of one DiT block (module docstring) with copies of its per-head query and key norms."""

    def __init__(self, hidden: int, inner: int, bias: bool, query_norm: Optional[HeadNorm],
                 key_norm: Optional[HeadNorm]):
        super().__init__()
        self.to_visual_q = nn.Linear(hidden, inner, bias=bias)
        self.to_visual_k = nn.Linear(hidden, inner, bias=bias)
        self.to_visual_v = nn.Linear(hidden, inner, bias=bias)
        self.query_norm, self.key_norm = query_norm, key_norm

    @classmethod
    def copy_of(cls, query: tuple[nn.Linear, slice], query_norm: Optional[nn.Module], key: tuple[nn.Linear, slice],
                value: tuple[nn.Linear, slice], key_norm: Optional[nn.Module], inner: int) -> "JointParallelProjection":
        """The paper's initialisation on a DiT block: ``to_visual_q`` = the image stream's query projection,
        ``to_visual_k``/``to_visual_v`` = the text stream's key and value projections, each given as (layer, its
        output rows: a fused qkv holds all three), the norms copied."""
        layer = query[0]
        projection = cls(layer.in_features, inner, layer.bias is not None, HeadNorm.copy_of(query_norm),
                         HeadNorm.copy_of(key_norm))
        for mine, (source, rows) in ((projection.to_visual_q, query), (projection.to_visual_k, key),
                                     (projection.to_visual_v, value)):
            _copy_outputs(mine, source, rows)
        return projection

    @property
    def context_dim(self) -> int:
        return self.to_visual_k.in_features

    def queries(self, call: AttentionCall, own: Optional["OwnProjections"] = None) -> torch.Tensor:
        """``(B, N, heads * d)`` parallel queries of the latent's image tokens, normalised and placed (rotated)
        as the block's own (a full-rank copy needs no ``own`` projections)."""
        queries = _per_head(self.query_norm, _linear(self.to_visual_q, call.hidden_states))
        return call.place_image_queries(queries)

    def keys_values(self, identity_tokens: torch.Tensor,
                    own: Optional["OwnProjections"] = None) -> tuple[torch.Tensor, torch.Tensor]:
        return (_per_head(self.key_norm, _linear(self.to_visual_k, identity_tokens)),
                _linear(self.to_visual_v, identity_tokens))


#: the rows of one of a block's own projections as the model holds them now: input ``x`` → ``(weight (out, in),
#: bias (out,) or None)`` on ``x``'s device and in its dtype.
WeightReader = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class OwnProjections:
    """The block's own query (image stream), key and value (text stream) projections, read from the loaded model
    when called: the frozen base of a low-rank parallel projection. The node glue reads them as ComfyUI computes
    the block (its dtype casts, fp8 scales and LoRA patches); :meth:`of_layers` reads plain torch layers."""

    query: WeightReader
    key: WeightReader
    value: WeightReader

    @classmethod
    def of_layers(cls, query: tuple[nn.Linear, slice], key: tuple[nn.Linear, slice],
                  value: tuple[nn.Linear, slice]) -> "OwnProjections":
        """Readers of the output rows of plain ``nn.Linear`` layers, each given as (layer, rows)."""
        def reader(layer: nn.Linear, rows: slice) -> WeightReader:
            return lambda x: (layer.weight[rows].to(x), None if layer.bias is None else layer.bias[rows].to(x))
        return cls(reader(*query), reader(*key), reader(*value))


def _own(reader: WeightReader, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, *reader(x))


class LowRankParallelProjection(nn.Module):
    """A U-Net attn2's parallel projections as its own to_q/k/v plus trained low-rank changes (module docstring).
    The queries stay unprojected (:class:`ProjectedQueries`) with the changed weight ``W_q + B·A``."""

    def __init__(self, query_dim: int, context_dim: int, inner_dim: int, rank: int):
        super().__init__()
        self.to_visual_q = LowRankChange(query_dim, inner_dim, rank)
        self.to_visual_k = LowRankChange(context_dim, inner_dim, rank)
        self.to_visual_v = LowRankChange(context_dim, inner_dim, rank)

    @property
    def context_dim(self) -> int:
        return self.to_visual_k.in_features

    @property
    def rank(self) -> int:
        return self.to_visual_q.rank

    def queries(self, call: AttentionCall, own: OwnProjections) -> ProjectedQueries:
        x = call.hidden_states
        weight, bias = own.query(x)
        return ProjectedQueries(x, weight + self.to_visual_q.weight_change().to(weight), bias)

    def keys_values(self, identity_tokens: torch.Tensor, own: OwnProjections) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.to_visual_k.added_to(_own(own.key, identity_tokens), identity_tokens),
                self.to_visual_v.added_to(_own(own.value, identity_tokens), identity_tokens))


class LowRankJointProjection(LowRankParallelProjection):
    """A DiT block's parallel projections as its own image query and text key/value projections plus trained
    low-rank changes, with copies of its per-head query and key norms (trained, as the full-rank copy's)."""

    def __init__(self, hidden: int, inner: int, rank: int, query_norm: Optional[HeadNorm],
                 key_norm: Optional[HeadNorm]):
        super().__init__(hidden, hidden, inner, rank)
        self.query_norm, self.key_norm = query_norm, key_norm

    @classmethod
    def initial(cls, hidden: int, inner: int, rank: int, query_norm: Optional[nn.Module],
                key_norm: Optional[nn.Module]) -> "LowRankJointProjection":
        """The paper's initialisation in low rank: no change yet, the block's norms copied."""
        return cls(hidden, inner, rank, HeadNorm.copy_of(query_norm), HeadNorm.copy_of(key_norm))

    def queries(self, call: AttentionCall, own: OwnProjections) -> torch.Tensor:
        x = call.hidden_states
        queries = _per_head(self.query_norm, self.to_visual_q.added_to(_own(own.query, x), x))
        return call.place_image_queries(queries)

    def keys_values(self, identity_tokens: torch.Tensor, own: OwnProjections) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().keys_values(identity_tokens, own)
        return _per_head(self.key_norm, keys), values


def identity_rows(cond_or_uncond: tuple[int, ...], batch: int, uncond_identity: bool) -> Optional[torch.Tensor]:
    """Which rows of a U-Net call see the identity: cond chunks always, uncond chunks only when
    ``uncond_identity`` (official ``extra_feat_neg``). None means every row."""
    if uncond_identity or not cond_or_uncond or all(c == COND for c in cond_or_uncond):
        return None
    per_chunk = batch // len(cond_or_uncond)
    return torch.tensor([c == COND for c in cond_or_uncond for _ in range(per_chunk)])


def tokens_per_row(identity_tokens: torch.Tensor, n_chunks: int, batch: int) -> torch.Tensor:
    """``(G, N, C)`` identities → ``(batch, N, C)``: one identity for all images, or one per image of
    each cond/uncond chunk (identity g → image g)."""
    per_chunk = batch // n_chunks
    identities = identity_tokens.shape[0]
    if identities == 1:
        return identity_tokens.expand(batch, -1, -1)
    if identities != per_chunk:
        raise ValueError(f"ParallelVisualAttention: the references hold {identities} identities but the latent batch "
                         f"has {per_chunk} images; give one identity for all images, or exactly one per image "
                         "(set images_per_identity so that references / images_per_identity = batch size).")
    return identity_tokens.repeat(n_chunks, 1, 1)


@dataclass(frozen=True, eq=False)
class ParallelVisualAttentionProcessor(AttentionProcessor):
    """Adds one identity's (or one per image) tokens to the joint softmax of every patched attn2."""

    projections: nn.ModuleDict  # block_name(key) -> one of this module's parallel projection classes
    identity_tokens: torch.Tensor  # (G, N, context_dim)
    strength: float = 1.0
    uncond_identity: bool = False
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    #: block_name(key) -> the block's own projections, the base of low-rank projections (full-rank ones need none)
    own_projections: Mapping[str, OwnProjections] = field(default_factory=dict)

    name = "pva"
    node_name = "ParallelVisualAttention"
    patch_point = CROSS_ATTENTION
    needs_hidden_states = True

    def active(self, call: AttentionCall) -> bool:
        return (self.strength > 0.0 and self.identity_tokens.shape[1] > 0 and call.block is not None
                and block_name(call.block) in self.projections
                and sigma_in_range(call.sigma, self.sigma_start, self.sigma_end))

    def extra_key_values(self, q, call: AttentionCall) -> Optional[JointKeys]:
        rows = identity_rows(call.cond_or_uncond, q.shape[0], self.uncond_identity)
        if rows is not None and not bool(rows.any()):
            return None  # e.g. an uncond-only pass: plain cross-attention, through the fused path
        name = block_name(call.block)
        projection, own = self.projections[name], self.own_projections.get(name)
        keys, values = (tokens_per_row(t, call.n_chunks, q.shape[0])  # each identity projected once
                        for t in projection.keys_values(self.identity_tokens.to(call.hidden_states), own))
        return JointKeys(keys, values, queries=projection.queries(call, own), rows=rows,
                         logit_bias=math.log(self.strength))
