"""ParallelVisualAttention (PVA) on the DiT families, through the joint-attention dispatcher (attention/joint.py).

First against a slow written-out formulation of what PVA computes in one joint text+image attention (per sample,
per head, per query, explicit softmax): the latent's image queries attend in ONE softmax to the joint keys
[text | image] (their own queries) and to the identity tokens' keys, scored by the parallel queries (the block's
input through to_visual_q, normalised per head, on Flux rotated by the token's position) with the strength's ln s
added; identity keys are the identity tokens through to_visual_k and the key norm, values through to_visual_v;
text queries and rows without the identity are the plain joint attention. Then in the real ComfyUI on the tiny
Flux dev and SD3.5 Large of harness.dit: the parallel queries of a file initialised from the model are exactly the
block's own queries (the recorded inputs, norms and rotary positions are the ones the model used), strength 0 is
bit-identical to unpatched sampling, CFG 1 and CFG > 1, batch 2 with one identity per image, a LoRA, a ControlNet,
files of another family refused, PVATextEncode's identity word in the T5 (and CLIP) sequences, and the trainers
(loss on a fixed probe, bit-exact resume, the saved file reloading to the same output)."""
from __future__ import annotations

import math

import pytest
import torch

from harness import dit
from harness.comfy_env import pack_module
from harness.dit import comfy_style_attention
from harness.tensors import relative_change
from personalization_nodes.attention.dispatcher import CHAIN_KEY, ProcessorChain
from personalization_nodes.attention.head_norm import HeadNorm
from personalization_nodes.attention.joint import (LAYOUT_KEY, QUERY_INPUTS_KEY, JointAttentionDispatcher,
                                                   JointLayout, QueryInputs)
from personalization_nodes.attention.pva import JointParallelProjection, ParallelVisualAttentionProcessor
from test_calibrated_cross_attn_dit import flat, slow_softmax

HEADS, DIM, HIDDEN = 2, 8, 12
GRID = (2, 3)
IMAGE = GRID[0] * GRID[1]
TEXT = 4
IDENTITY_TOKENS = 3
STRENGTH = 0.6


def projection(seed=0, norms=True):
    gen = torch.Generator().manual_seed(seed)
    out = JointParallelProjection(HIDDEN, HEADS * DIM, True, HeadNorm("rms", DIM) if norms else None,
                                  HeadNorm("rms", DIM) if norms else None).double()
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1))
    return out


def rotations(batch, length, seed=5):
    """Flux-style position matrices (B, 1, L, d/2, 2, 2), random angles."""
    angles = torch.rand(batch, 1, length, DIM // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    return torch.stack([torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)], -2)


def slow_rms(vector, weight):
    rms = math.sqrt(sum(float(x.detach()) ** 2 for x in vector) / len(vector) + 1e-6)
    return torch.stack([vector[i] / rms * weight[i] for i in range(len(vector))])


def slow_rotate(vector, matrices):
    out = []
    for pair in range(len(vector) // 2):
        m = matrices[pair]
        a, b = vector[2 * pair], vector[2 * pair + 1]
        out += [m[0, 0] * a + m[0, 1] * b, m[1, 0] * a + m[1, 1] * b]
    return torch.stack(out)


def slow_pva_joint_attention(q, k, v, hidden, tokens, proj, positions, rows_with_identity, strength):
    """(B, heads, L, d): every row of the joint attention; the latent's image rows of samples in
    ``rows_with_identity`` also attend to the identity keys, one head and query at a time."""
    batch, heads, length, dim = q.shape
    out = torch.zeros_like(q)
    wq, bq = proj.to_visual_q.weight, proj.to_visual_q.bias
    wk, bk = proj.to_visual_k.weight, proj.to_visual_k.bias
    wv, bv = proj.to_visual_v.weight, proj.to_visual_v.bias
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            id_keys, id_values = [], []
            for t in range(tokens.shape[1]):
                key = wk[cols] @ tokens[b, t] + bk[cols]
                id_keys.append(slow_rms(key, proj.key_norm.weight) if proj.key_norm is not None else key)
                id_values.append(wv[cols] @ tokens[b, t] + bv[cols])
            for row in range(length):
                logits = [float(q[b, h, row] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                values = [v[b, h, key] for key in range(length)]
                if TEXT <= row < TEXT + IMAGE and b in rows_with_identity:
                    query = wq[cols] @ hidden[b, row - TEXT] + bq[cols]
                    if proj.query_norm is not None:
                        query = slow_rms(query, proj.query_norm.weight)
                    if positions is not None:
                        query = slow_rotate(query, positions[b, 0, row])
                    logits += [float(query @ key) / math.sqrt(dim) + math.log(strength) for key in id_keys]
                    values += id_values
                out[b, h, row] = sum(p * value for p, value in zip(slow_softmax(logits), values))
    return out


def pva_options(processor, cond_or_uncond, hidden, positions, block=("double", 0)):
    inputs = QueryInputs()
    inputs.image_tokens, inputs.positions = hidden, positions
    return {CHAIN_KEY: ProcessorChain().with_processor(processor), LAYOUT_KEY: JointLayout(TEXT, GRID),
            QUERY_INPUTS_KEY: inputs, "cond_or_uncond": list(cond_or_uncond), "block_type": block[0],
            "block_index": block[1]}


@pytest.mark.parametrize("uncond_identity", [False, True])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_joint_call_matches_the_written_out_parallel_attention(family, uncond_identity):
    """Flux: (B, heads, L, d) with skip_reshape, RMS-normed and rotated parallel queries; SD3 (no qk norm, as
    SD3.0): (B, L, heads*d) q/k, (B, L, heads, d) v, (B, heads, L, d) back. CFG batch uncond then cond, one
    identity per image of the chunk."""
    batch, length = 4, TEXT + IMAGE
    gen = torch.Generator().manual_seed(1)
    q, k, v = (2 * torch.randn(batch, HEADS, length, DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    hidden = torch.randn(batch, IMAGE, HIDDEN, generator=gen, dtype=torch.float64)
    identities = torch.randn(2, IDENTITY_TOKENS, HIDDEN, generator=gen, dtype=torch.float64)
    proj = projection(norms=family == "flux")
    processor = ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"double_0_0" if family == "flux" else "joint_0_0": proj}),
                                                 identities, strength=STRENGTH, uncond_identity=uncond_identity)
    positions = rotations(batch, length) if family == "flux" else None
    block = ("double", 0) if family == "flux" else ("joint", 0)
    options = pva_options(processor, (1, 0), hidden, positions, block)
    tokens_per_row = identities.repeat(2, 1, 1)
    expected = slow_pva_joint_attention(q, k, v, hidden, tokens_per_row, proj, positions,
                                        {0, 1, 2, 3} if uncond_identity else {2, 3}, STRENGTH)
    if family == "flux":
        out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                         transformer_options=options)
        plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
        expected = flat(expected)
    else:
        out = JointAttentionDispatcher()(comfy_style_attention, flat(q), flat(k), v.transpose(1, 2), heads=HEADS,
                                         skip_output_reshape=True, transformer_options=options)
        plain = comfy_style_attention(flat(q), flat(k), flat(v), HEADS, skip_output_reshape=True)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    rows = slice(None, None) if family == "flux" else slice(None)
    changed = (out - plain).abs().flatten(2).amax(-1)[rows]  # (B, L)
    if family == "sd3":
        changed = (out - plain).abs().amax(dim=(1, 3))
    assert changed[2:, TEXT:].min() > 1e-3
    assert (changed[:2, TEXT:].min() > 1e-3) == uncond_identity


def test_text_rows_and_rows_without_the_identity_are_the_plain_call_bit_for_bit():
    """At DiT head sizes torch's SDPA computes each query row on its own (see test_joint_attention)."""
    gen = torch.Generator().manual_seed(2)
    dim = 64
    q, k, v = (torch.randn(2, HEADS, TEXT + IMAGE, dim, generator=gen) for _ in range(3))
    proj = JointParallelProjection(HIDDEN, HEADS * dim, True, HeadNorm("rms", dim), HeadNorm("rms", dim))
    processor = ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"double_0_0": proj}),
                                                 torch.randn(1, IDENTITY_TOKENS, HIDDEN, generator=gen))
    angles = torch.rand(2, 1, TEXT + IMAGE, dim // 2, generator=gen)
    positions = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                             torch.stack([angles.sin(), angles.cos()], -1)], -2)
    options = pva_options(processor, (1, 0), torch.randn(2, IMAGE, HIDDEN, generator=gen), positions)
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=options)
    plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
    assert torch.equal(out[:, :TEXT], plain[:, :TEXT]) and torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1, TEXT:], plain[1, TEXT:])
