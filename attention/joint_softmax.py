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

Where a kernel returns the plain attention's per-query log-sum-exp ``L`` along with its output ``o``
(:func:`.sdpa.sdpa_with_logsumexp`), the widening is not needed: the joint softmax is the two parts weighted by
their shares of the joint normaliser (:func:`merged_joint_attention`, exact)::

    out = (e^L · o + Σ_j e^ℓ_j · v_extra_j) / (e^L + Σ_j e^ℓ_j)

so the text keys cost exactly the plain call, and the extra keys ``M/Nk`` of it plus one pass over the output.

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
    """``(B, heads, M, Nq)`` logits ``queries_h · keys_hᵀ / √d + bias`` of ``M`` extra keys ``(B, M, heads*d)``,
    for queries given as ``(B, Nq, heads*d)`` or as :class:`ProjectedQueries`. Keys first: the few keys are the
    rows of one product over all queries, and the softmax's sums over keys run along contiguous queries."""
    keys_h = keys.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, M, d)
    keys_h = keys_h * keys_h.shape[-1] ** -0.5  # scaling the few keys costs less than scaling the logits
    if isinstance(queries, ProjectedQueries):
        weight_h = queries.weight.to(keys).unflatten(0, (heads, -1))  # (heads, d, C_in)
        keys_in = torch.einsum("hec,bhme->bhmc", weight_h, keys_h).flatten(1, 2)  # keys back in input space
        logits = (keys_in @ queries.inputs.to(keys).transpose(1, 2)).unflatten(1, (heads, -1))
        if queries.bias is not None:
            logits = logits + torch.einsum("he,bhme->bhm", queries.bias.to(keys).unflatten(0, (heads, -1)),
                                           keys_h).unsqueeze(-1)
    else:
        logits = keys_h @ queries.to(keys).unflatten(-1, (heads, -1)).permute(0, 2, 3, 1)
    return logits + bias if bias != 0.0 else logits


def fused_joint_attention(q, k, v, extra_logits: torch.Tensor, extra_values: torch.Tensor, heads: int,
                          attention: Callable) -> torch.Tensor:
    """The joint softmax of ``q`` against the keys ``k`` and ``M`` extra keys whose logits are given, through
    ONE call ``attention(q, k, v) -> (B, Nq, heads*W)`` over widened heads (module docstring).

    ``q`` (B, Nq, heads*d), ``k``/``v`` (B, Nk, heads*d), ``extra_logits`` (B, heads, M, Nq) from
    :func:`extra_key_logits`, ``extra_values`` (B, M, heads*d). Returns (B, Nq, heads*d)."""
    batch, n_queries, channels = q.shape
    d = channels // heads
    m = extra_logits.shape[-2]
    width = -(-(d + m) // HEAD_WIDTH_MULTIPLE) * HEAD_WIDTH_MULTIPLE
    queries = torch.cat([q.unflatten(-1, (heads, d)), extra_logits.permute(0, 3, 1, 2).to(q.dtype),
                         q.new_zeros(batch, n_queries, heads, width - d - m)], dim=-1)
    text_keys = F.pad(k.unflatten(-1, (heads, d)) * math.sqrt(width / d), (0, width - d))
    unit_keys = torch.zeros(m, width, dtype=k.dtype, device=k.device)
    unit_keys[:, d:d + m] = torch.eye(m, dtype=k.dtype, device=k.device) * math.sqrt(width)
    keys = torch.cat([text_keys, unit_keys.expand(batch, heads, m, width).transpose(1, 2)], dim=1)
    values = F.pad(torch.cat([v.unflatten(-1, (heads, d)), extra_values.to(v.dtype).unflatten(-1, (heads, d))],
                             dim=1), (0, width - d))
    out = attention(queries.flatten(2), keys.flatten(2), values.flatten(2))
    return out.unflatten(-1, (heads, width))[..., :d].flatten(2)


def merged_joint_attention(out: torch.Tensor, logsumexp: torch.Tensor, extra_logits: torch.Tensor,
                           extra_values: torch.Tensor, heads: int) -> torch.Tensor:
    """The joint softmax from the plain attention's output ``out`` (B, Nq, heads*d) and its per-query log-sum-exp
    ``logsumexp`` (B, heads, Nq), and ``M`` extra keys' logits (B, heads, M, Nq) from :func:`extra_key_logits` and
    values (B, M, heads*d): each part weighted by its share of the joint normaliser (module docstring), the weights
    in float32. Returns the joint softmax's output and each query's log-sum-exp over all its keys (B, heads, Nq).
    For inference: ``out``, a kernel's fresh output, is overwritten and returned (a new tensor of that size would
    cost more in page faults than the arithmetic of the merge)."""
    logsumexp, logits = logsumexp.float(), extra_logits.float()
    top = torch.maximum(logsumexp, logits.amax(dim=-2))  # every exponent <= 0: nothing overflows
    extra_weights = (logits - top.unsqueeze(-2)).exp_()
    plain_weight = (logsumexp - top).exp_()
    normaliser = extra_weights.sum(dim=-2).add_(plain_weight)
    extra_weights = extra_weights.div_(normaliser.unsqueeze(-2)).transpose(-1, -2).to(out.dtype)  # (B, heads, Nq, M)
    out_h = out.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, Nq, d), a view of out
    out_h.mul_(plain_weight.div_(normaliser).unsqueeze(-1))
    values_h = extra_values.to(out.dtype).unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, M, d)
    for row in range(out.shape[0]):
        torch.baddbmm(out_h[row], extra_weights[row], values_h[row], out=out_h[row])
    return out, top.add_(normaliser.log_())
