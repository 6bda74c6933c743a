"""Extra keys with their own queries in one softmax, computed by one fused attention call.

A joint softmax over text keys (scored by the layer's queries ``q``) and ``M`` extra keys scored by other
queries ``q'`` (PVA's parallel query projection) is per head::

    softmax([q·k_textᵀ / √d , q'·k_extraᵀ / √d + bias]) · [v_text ; v_extra]

Materialising those logits costs several times the fused attention at real sizes. The same softmax is
one call of any attention function (ComfyUI's, whatever backend the user picked) over widened heads of
width ``W = d + M`` (rounded up to a multiple of 8, as fused kernels want):

    query  = [q , ℓ_1 … ℓ_M , 0]          ℓ_j = q'·k_extra_jᵀ / √d + bias: the extra logits, only (Nq, M)
    text key j  = [k_text_j · √(W/d) , 0 , 0]
    extra key j = [0 , √W · e_j , 0]        e_j: the j-th unit vector
    values = [v_text ; v_extra], zero-padded to W, and the output cut back to d

With the kernel's own scale ``1/√W`` the text logits are ``q·k_textᵀ/√d`` and extra key j's logit is
``ℓ_j``: the scale is folded into the keys because ComfyUI's attention functions take none. Width ``d + M``
beats the ``2d`` of stacking ``[q, q']`` against ``[[k_text, 0], [0, k_extra]]`` whenever ``M < d`` (PVA: 10
identity tokens, d >= 40), and carries the bias with no extra feature.

When the extra queries are a linear projection of the layer's input ``x`` (:class:`ProjectedQueries`), the
logits are ``x · (Wᵀ k_extraᵀ)``: projecting the few keys back costs ``M/d`` of projecting every query.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

#: fused attention kernels want head widths in multiples of this
HEAD_WIDTH_MULTIPLE = 8


@dataclass(frozen=True)
class ProjectedQueries:
    """Queries ``inputs @ weightᵀ + bias`` left unprojected, since only their logits against a few keys are
    needed (see the module docstring)."""

    inputs: torch.Tensor  # (B, Nq, C_in)
    weight: torch.Tensor  # (heads * d, C_in)
    bias: Optional[torch.Tensor] = None  # (heads * d,)

    def project(self) -> torch.Tensor:
        return F.linear(self.inputs, self.weight, self.bias)

    def take_rows(self, index) -> "ProjectedQueries":
        return ProjectedQueries(self.inputs[index], self.weight, self.bias)


def extra_key_logits(queries, keys: torch.Tensor, heads: int, bias: float = 0.0) -> torch.Tensor:
    """``(B, Nq, heads, M)`` logits ``queries_h · keys_hᵀ / √d + bias`` of ``M`` extra keys ``(B, M, heads*d)``,
    for queries given as ``(B, Nq, heads*d)`` or as :class:`ProjectedQueries`."""
    keys_h = keys.unflatten(-1, (heads, -1))  # (B, M, heads, d)
    keys_h = keys_h * keys_h.shape[-1] ** -0.5  # scaling the few keys costs less than scaling the logits
    if isinstance(queries, ProjectedQueries):
        weight_h = queries.weight.to(keys).unflatten(0, (heads, -1))  # (heads, d, C_in)
        keys_in = torch.einsum("hec,bmhe->bchm", weight_h, keys_h).flatten(2)  # keys back in input space
        logits = (queries.inputs.to(keys) @ keys_in).unflatten(-1, (heads, -1))
        if queries.bias is not None:
            logits = logits + torch.einsum("he,bmhe->bhm", queries.bias.to(keys).unflatten(0, (heads, -1)),
                                           keys_h).unsqueeze(1)
    else:
        logits = torch.einsum("bnhe,bmhe->bnhm", queries.to(keys).unflatten(-1, (heads, -1)), keys_h)
    return logits + bias if bias != 0.0 else logits


def fused_joint_attention(q, k, v, extra_logits: torch.Tensor, extra_values: torch.Tensor, heads: int,
                          attention: Callable) -> torch.Tensor:
    """The joint softmax of ``q`` against the keys ``k`` and ``M`` extra keys whose logits are given, through
    ONE call ``attention(q, k, v) -> (B, Nq, heads*W)`` over widened heads (module docstring).

    ``q`` (B, Nq, heads*d), ``k``/``v`` (B, Nk, heads*d), ``extra_logits`` (B, Nq, heads, M) from
    :func:`extra_key_logits`, ``extra_values`` (B, M, heads*d). Returns (B, Nq, heads*d)."""
    batch, n_queries, channels = q.shape
    d = channels // heads
    m = extra_logits.shape[-1]
    width = -(-(d + m) // HEAD_WIDTH_MULTIPLE) * HEAD_WIDTH_MULTIPLE
    queries = torch.cat([q.unflatten(-1, (heads, d)), extra_logits.to(q.dtype),
                         q.new_zeros(batch, n_queries, heads, width - d - m)], dim=-1)
    text_keys = F.pad(k.unflatten(-1, (heads, d)) * math.sqrt(width / d), (0, width - d))
    unit_keys = torch.zeros(m, width, dtype=k.dtype, device=k.device)
    unit_keys[:, d:d + m] = torch.eye(m, dtype=k.dtype, device=k.device) * math.sqrt(width)
    keys = torch.cat([text_keys, unit_keys.expand(batch, heads, m, width).transpose(1, 2)], dim=1)
    values = F.pad(torch.cat([v.unflatten(-1, (heads, d)), extra_values.to(v.dtype).unflatten(-1, (heads, d))],
                             dim=1), (0, width - d))
    out = attention(queries.flatten(2), keys.flatten(2), values.flatten(2))
    return out.unflatten(-1, (heads, width))[..., :d].flatten(2)
