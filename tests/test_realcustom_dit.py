"""AdaptiveMaskGuidance (RealCustom) on the DiT families, through the joint-attention dispatcher (attention/joint.py).

First against a slow written-out formulation of what the dispatcher serves RealCustom on a joint text+image
attention (per sample, per head, per query, explicit softmax): the word map is the head mean of the image
queries' probabilities over the WHOLE joint key set, read on the word's text columns; the image branch is a
softmax of the latent's image queries over the projected reference tokens, gated by the mask and added to the
image rows of the joint output (text rows untouched)."""
from __future__ import annotations

import math

import pytest
import torch

from personalization_nodes.attention.dispatcher import ProcessorChain
from personalization_nodes.attention.joint import JointAttentionDispatcher
from personalization_nodes.attention.realcustom import (COND, RUN_KEY, ImageBranchWeights, ImageTokens,
                                                        MaskedImageBranch, MaskGuidanceRun, MaskSettings,
                                                        WordMapReader)
from personalization_nodes.attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings
from test_calibrated_cross_attn_dit import (GRID, HEADS, IMAGE, PROMPT_LENGTH, comfy_style_attention, flat,
                                            joint_options, qkv, slow_joint_attention, slow_softmax,
                                            slow_style_aligned_with_edits)

WORD = (2, 4)  # the word's tokens in the 6-token prompt
REFERENCE_TOKENS, TOKEN_DIM = 5, 6
STRENGTH = 0.7


def indicator():
    out = torch.zeros(PROMPT_LENGTH)
    out[list(WORD)] = 1.0
    return out


def branch_weights(block=("double", 0, 0), dim=8, seed=1):
    torch.manual_seed(seed)
    return ImageBranchWeights({block: (HEADS * dim, TOKEN_DIM)}).double().requires_grad_(False)


def image_tokens(negative=True, seed=2):
    gen = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, REFERENCE_TOKENS, TOKEN_DIM, generator=gen, dtype=torch.float64)
    return ImageTokens(reference, torch.randn(1, REFERENCE_TOKENS, TOKEN_DIM, generator=gen, dtype=torch.float64)
                       if negative else None)


def guidance_run(tokens, capturing, injecting, mask=None):
    run = MaskGuidanceRun(MaskSettings(scope=1.0), indicator(), total_steps=2, update_fraction=1.0,
                          text_only_pass=True, tokens=tokens)
    run.capturing, run.injecting, run.mask = capturing, injecting, mask
    return run


def slow_word_maps(q, k, text, registers, rows, repeats):
    """(len(rows), IMAGE) word map per cond sample: for each head and image query of the latent, the explicit
    softmax of q.k/sqrt(d) over ALL joint keys [text | image]; the probabilities on the word's text keys (every
    repeat of the prompt, after the register tokens) summed; the mean over heads."""
    _batch, heads, length, dim = q.shape
    words = [registers + p + r * PROMPT_LENGTH for r in range(repeats) for p in WORD]
    maps = torch.zeros(len(rows), IMAGE, dtype=torch.float64)
    for i, b in enumerate(rows):
        for h in range(heads):
            for n in range(IMAGE):
                logits = [float(q[b, h, text + n] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                probs = slow_softmax(logits)
                maps[i, n] += sum(probs[key] for key in words) / heads
    return maps


def slow_branch(q, text, weights, tokens, mask, chunks, block="double_0_0"):
    """(B, heads, L, d) image branch: zero on text rows; on the latent's image row n of sample b (chunk kind
    COND: the reference's tokens, else the black image's, or nothing without them), per head the explicit softmax
    of q.K_i/sqrt(d) over the projected reference tokens K_i = W_k t, weighted sum of V_i = W_v t, times the mask
    at n's grid position of b's image, times the strength."""
    batch, heads, length, dim = q.shape
    per_chunk = batch // len(chunks)
    w_k, w_v = weights.to_k_vision[block].weight, weights.to_v_vision[block].weight
    out = torch.zeros_like(q)
    for b in range(batch):
        kind = chunks[b // per_chunk]
        source = tokens.reference if kind == COND else tokens.negative
        if source is None:
            continue
        for h in range(heads):
            keys = [w_k[h * dim:(h + 1) * dim] @ t for t in source[0]]
            values = [w_v[h * dim:(h + 1) * dim] @ t for t in source[0]]
            for n in range(IMAGE):
                probs = slow_softmax([float(q[b, h, text + n] @ key) / math.sqrt(dim) for key in keys])
                gate = float(mask[b % per_chunk, n // GRID[1], n % GRID[1]])
                out[b, h, text + n] = STRENGTH * gate * sum(p * value for p, value in zip(probs, values))
    return out


def call_dispatcher(family, q, k, v, options):
    """Flux hands (B, heads, L, d) with skip_reshape; SD3 (B, L, heads*d) q/k, (B, L, heads, d) v and asks for
    (B, heads, L, d) back. The output as (B, L, heads*d)."""
    if family == "flux":
        return JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                          transformer_options=options)
    out = JointAttentionDispatcher()(comfy_style_attention, flat(q), flat(k), v.transpose(1, 2), heads=HEADS,
                                     skip_output_reshape=True, transformer_options=options)
    return flat(out)


LAYOUTS = pytest.mark.parametrize("cond_or_uncond,repeats,registers", [((1, 0), 1, 0), ((0,), 2, 0), ((0, 1), 1, 2)],
                                  ids=["cfg: uncond then cond", "cfg 1: cond only, prompt repeated", "register tokens"])


@LAYOUTS
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_word_map_is_read_on_the_text_columns_of_the_joint_softmax(family, cond_or_uncond, repeats, registers):
    """The text-only pass: the reader takes the cond rows' probabilities; the output is the plain joint
    attention (explicit softmax over all joint keys)."""
    text = registers + PROMPT_LENGTH * repeats
    batch = 2 * len(cond_or_uncond)
    q, k, v = qkv(batch, text + IMAGE, seed=repeats + registers)
    run = guidance_run(image_tokens(), capturing=True, injecting=False)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(branch_weights()))
    block = ("double", 0) if family == "flux" else ("joint", 0)
    options = {**joint_options(chain, cond_or_uncond, text, registers, block=block), RUN_KEY: run}
    out = call_dispatcher(family, q, k, v, options)
    torch.testing.assert_close(out, flat(slow_joint_attention(q, k, v, text, torch.zeros(batch, HEADS, IMAGE, text))),
                               rtol=1e-5, atol=1e-5)
    run.finish_text_only_pass()
    first_cond = cond_or_uncond.index(COND) * 2
    maps = slow_word_maps(q, k, text, registers, [first_cond, first_cond + 1], repeats)
    expected = (maps / (maps.max(dim=1, keepdim=True).values + 1e-6)).view(2, *GRID)  # max_norm, scope 1: all kept
    torch.testing.assert_close(run.mask.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3), "each image its own map"


@LAYOUTS
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("negative", [True, False], ids=["black image", "no uncond image"])
def test_image_branch_is_added_to_the_image_rows_of_the_joint_output(family, cond_or_uncond, repeats, registers,
                                                                      negative):
    """The guided pass with the released schedule: no logits needed, the plain joint attention plus the gated
    branch on the latent's image rows; text rows are the plain joint attention's (the branch is zero there)."""
    text = registers + PROMPT_LENGTH * repeats
    batch = 2 * len(cond_or_uncond)
    q, k, v = qkv(batch, text + IMAGE, seed=5 + repeats + registers)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block = ("double", 0) if family == "flux" else ("joint", 0)
    weights, tokens = branch_weights((*block, 0)), image_tokens(negative)
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(weights, STRENGTH))
    options = {**joint_options(chain, cond_or_uncond, text, registers, block=block), RUN_KEY: run}
    out = call_dispatcher(family, q, k, v, options)
    plain = slow_joint_attention(q, k, v, text, torch.zeros(batch, HEADS, IMAGE, text))
    branch = slow_branch(q, text, weights, tokens, mask, cond_or_uncond, block="_".join(map(str, (*block, 0))))
    torch.testing.assert_close(out, flat(plain + branch), rtol=1e-6, atol=1e-6)
    assert branch[:, :, text:].abs().max() > 1e-2


def test_map_read_and_branch_added_in_one_call():
    """"previous step": the guided pass both reads the map (of the joint softmax without the branch, which is
    an output added after it) and adds the branch; a block the adapter has no projections for is left alone."""
    text, chunks = PROMPT_LENGTH, (1, 0)
    q, k, v = qkv(4, text + IMAGE, seed=9)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights, tokens = branch_weights(), image_tokens()
    run = guidance_run(tokens, capturing=True, injecting=True, mask=mask)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(weights, STRENGTH))
    out = call_dispatcher("flux", q, k, v, {**joint_options(chain, chunks, text), RUN_KEY: run})
    plain = slow_joint_attention(q, k, v, text, torch.zeros(4, HEADS, IMAGE, text))
    torch.testing.assert_close(out, flat(plain + slow_branch(q, text, weights, tokens, mask, chunks)),
                               rtol=1e-5, atol=1e-5)
    run.finish_text_only_pass()
    maps = slow_word_maps(q, k, text, 0, [2, 3], 1)
    torch.testing.assert_close(run.mask.double(), (maps / (maps.max(1, keepdim=True).values + 1e-6)).view(2, *GRID),
                               rtol=1e-5, atol=1e-6)
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    other_block = {**joint_options(chain, chunks, text, block=("single", 0)), RUN_KEY: run}
    assert torch.equal(call_dispatcher("flux", q, k, v, other_block), call_dispatcher("flux", q, k, v, {}))


def test_branch_is_added_to_style_aligned_image_rows():
    """SharedAttentionBatch owns the joint call's image rows; the branch is added to its output."""
    text, chunks, settings = PROMPT_LENGTH, (1, 0), StyleAlignedSettings(score_shift=0.4)
    q, k, v = qkv(4, text + IMAGE, seed=11)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, tokens = branch_weights(), image_tokens()
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    shared = SharedAttentionProcessor(settings=settings, blocks=frozenset({("double", 0, 0)}))
    chain = ProcessorChain().with_processor(shared).with_processor(MaskedImageBranch(weights, STRENGTH))
    out = call_dispatcher("flux", q, k, v, {**joint_options(chain, chunks, text), RUN_KEY: run})
    expected = slow_style_aligned_with_edits(q, k, v, 2, settings, text, torch.zeros(4, HEADS, IMAGE, text))
    torch.testing.assert_close(out, flat(expected + slow_branch(q, text, weights, tokens, mask, chunks)),
                               rtol=1e-5, atol=1e-5)

