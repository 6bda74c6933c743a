"""The DiT joint-attention dispatcher (attention/joint.py) with StyleAligned, against a slow written-out
formulation of StyleAligned on a joint text+image attention: per chunk, per sample, per head, explicit
AdaIN statistics and an explicit softmax."""
import math

import pytest
import torch

from harness.dit import comfy_style_attention
from personalization_nodes.attention.dispatcher import CHAIN_KEY, AttentionConflictError, ProcessorChain
from personalization_nodes.attention.joint import (LAYOUT_KEY, JointAttentionDispatcher, JointLayout,
                                                  LayoutRecord, UnrecognisedAttentionError, UnrecognisedLayoutError,
                                                  read_joint_layout)
from personalization_nodes.attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings

HEADS, DIM = 2, 8
TEXT, GRID = 5, (3, 4)
IMAGE = GRID[0] * GRID[1]


def token_mean_std(x):
    """Per-channel mean and unbiased std (+1e-5 inside the root) over tokens, written out."""
    n = x.shape[0]
    mean = sum(x[i] for i in range(n)) / n
    var = sum((x[i] - mean) ** 2 for i in range(n)) / (n - 1)
    return mean, (var + 1e-5).sqrt()


def slow_style_aligned_joint(q, k, v, chunks: int, settings: StyleAlignedSettings, text: int, rows=None):
    """q/k/v: (B, heads, L, d), text tokens first. Sample 0 of each chunk is the reference. ``rows``: the query rows
    to compute (default all; the others stay 0)."""
    batch, heads, length, dim = q.shape
    per_chunk = batch // chunks
    out = torch.zeros_like(q)
    for c in range(chunks):
        ref = c * per_chunk
        for s in range(c * per_chunk, (c + 1) * per_chunk):
            for h in range(heads):
                for row in range(length) if rows is None else rows:
                    query = q[s, h, row]
                    keys, values, shifts = list(k[s, h]), list(v[s, h]), [0.0] * length
                    if s != ref and row >= text:
                        if settings.adain_queries:
                            mean, std = token_mean_std(q[s, h, text:])
                            ref_mean, ref_std = token_mean_std(q[ref, h, text:])
                            query = (query - mean) / std * ref_std + ref_mean
                        if settings.adain_keys:
                            mean, std = token_mean_std(k[s, h, text:])
                            ref_mean, ref_std = token_mean_std(k[ref, h, text:])
                            keys = keys[:text] + [(key - mean) / std * ref_std + ref_mean for key in keys[text:]]
                        keys += [settings.score_scale * key for key in k[ref, h, text:]]
                        values += list(v[ref, h, text:])
                        shifts += [settings.score_shift] * (length - text)
                    logits = [float(query @ key) / math.sqrt(dim) + shift for key, shift in zip(keys, shifts)]
                    top = max(logits)
                    weights = [math.exp(logit - top) for logit in logits]
                    total = sum(weights)
                    out[s, h, row] = sum(w / total * value for w, value in zip(weights, values))
    return out


def options(chain, cond_or_uncond=(1, 0), block=("double", 0), layout=JointLayout(TEXT, GRID)):
    return {CHAIN_KEY: chain, LAYOUT_KEY: LayoutRecord(layout), "cond_or_uncond": list(cond_or_uncond),
            "block_type": block[0], "block_index": block[1]}


def style_chain(settings=StyleAlignedSettings(), blocks=frozenset({("double", 0, 0)})):
    return ProcessorChain().with_processor(SharedAttentionProcessor(settings=settings, blocks=blocks))


def qkv(batch, length=TEXT + IMAGE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, HEADS, length, DIM, generator=gen, dtype=torch.float64) for _ in range(3)]


SETTINGS = [
    StyleAlignedSettings(),
    StyleAlignedSettings(score_shift=0.693, score_scale=0.5),
    StyleAlignedSettings(adain_queries=False, adain_keys=True, score_shift=-0.4),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["paper", "shift+scale", "keys only"])
@pytest.mark.parametrize("chunks,per_chunk", [(2, 3), (1, 2), (1, 4)])
def test_flux_layout_matches_the_written_out_formulation(settings, chunks, per_chunk):
    q, k, v = qkv(chunks * per_chunk)
    dispatcher = JointAttentionDispatcher()
    out = dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                     transformer_options=options(style_chain(settings), cond_or_uncond=[1, 0][:chunks]))
    expected = slow_style_aligned_joint(q, k, v, chunks, settings, TEXT)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(out.shape), rtol=1e-9, atol=1e-9)


def test_sd3_layout_values_by_head_and_the_output_layout_it_asks_for():
    """SD3 hands q/k as (B, L, heads*d) and v as (B, L, heads, d); skip_output_reshape asks for (B, heads, L, d)."""
    q, k, v = qkv(3)
    flat = [t.transpose(1, 2).reshape(3, TEXT + IMAGE, -1) for t in (q, k)]
    by_head = v.transpose(1, 2)
    out = JointAttentionDispatcher()(comfy_style_attention, flat[0], flat[1], by_head, heads=HEADS,
                                     skip_output_reshape=True,
                                     transformer_options=options(style_chain(), (0,), block=("joint", 0)) | {
                                         CHAIN_KEY: style_chain(blocks=frozenset({("joint", 0, 0)}))})
    torch.testing.assert_close(out, slow_style_aligned_joint(q, k, v, 1, StyleAlignedSettings(), TEXT))


def test_image_only_attention_shares_like_a_unet_self_attention():
    """SD3.5 Medium's second attention runs over the image tokens alone: no text context."""
    q, k, v = qkv(2, length=IMAGE)
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=options(style_chain(), (0,)))
    expected = slow_style_aligned_joint(q, k, v, 1, StyleAlignedSettings(), text=0)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(out.shape))


def test_reference_rows_and_every_text_row_are_bit_identical_to_the_plain_call():
    """Rows computed apart are bit-identical when the attention kernel computes each sample and query row on its
    own, as torch's SDPA does at DiT head sizes (64, 128) and the U-Net path relies on too."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, HEADS, TEXT + IMAGE, 64, generator=gen) for _ in range(3))
    plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=options(style_chain(), (0,)))
    assert torch.equal(out[0], plain[0])
    assert torch.equal(out[1:, :TEXT], plain[1:, :TEXT])
    assert not torch.allclose(out[1:, TEXT:], plain[1:, TEXT:])


def test_blocks_outside_the_selection_and_calls_outside_a_layout_are_plain_calls():
    q, k, v = qkv(2)
    plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
    dispatcher = JointAttentionDispatcher()
    assert torch.equal(dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                  transformer_options=options(style_chain(), block=("single", 0))), plain)
    no_layout = options(style_chain())
    del no_layout[LAYOUT_KEY]  # an attention that is not part of a sampled model call
    assert torch.equal(dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                  transformer_options=no_layout), plain)


def test_a_token_count_the_layout_cannot_explain_is_a_clear_error():
    q, k, v = qkv(2, length=IMAGE + 2)
    with pytest.raises(UnrecognisedAttentionError, match="cannot tell its text from its image tokens"):
        JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                   transformer_options=options(style_chain(), (0,)))


def test_another_packs_override_runs_where_ours_is_idle_and_conflicts_where_ours_replaces_attention():
    seen = []

    def foreign_override(func, *args, **kwargs):
        seen.append(kwargs["transformer_options"]["block_type"])
        return 2 * func(*args, **kwargs)

    q, k, v = qkv(2)
    dispatcher = JointAttentionDispatcher(inner=foreign_override)
    idle = dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                      transformer_options=options(style_chain(), block=("single", 3)))
    assert seen == ["single"]
    assert torch.equal(idle, 2 * comfy_style_attention(q, k, v, HEADS, skip_reshape=True))
    with pytest.raises(AttentionConflictError, match="SharedAttentionBatch replaces attention in block double:0"):
        dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True, transformer_options=options(style_chain()))


def test_attention_masks_are_refused_not_ignored():
    q, k, v = qkv(2)
    mask = torch.zeros(2, 1, TEXT + IMAGE, TEXT + IMAGE, dtype=q.dtype)
    with pytest.raises(AttentionConflictError, match="attention mask"):
        JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True, mask=mask,
                                   transformer_options=options(style_chain(), (0,)))


def streams(batch, counts, width=8, seed=0):
    """Random ``(batch, n, width)`` token streams, one per count."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, width, generator=gen) for n in counts]


def test_layout_of_a_model_call_as_its_first_block_receives_it():
    conditioning, latent = streams(2, (77, 30))
    # plain: the conditioning is the text; a 9 x 12 latent pads to 5 x 6 tokens of 2 x 2
    assert read_joint_layout((2, 16, 9, 12), 2, conditioning, latent, conditioning, latent) == JointLayout(77, (5, 6))
    # SD3: learned register tokens in front of the conditioning, positions added to the image tokens
    registers, positioned = streams(2, (4, 30), seed=1)
    layout = read_joint_layout((2, 16, 9, 12), 2, torch.cat([registers, conditioning], 1), positioned, conditioning)
    assert (layout.text_tokens, layout.conditioning_columns) == (81, slice(4, 81))
    # another pack's post_input patch prepends style tokens (ComfyUI's USO) and appends others
    style, after = streams(2, (9, 3), seed=2)
    layout = read_joint_layout((2, 16, 9, 12), 2, torch.cat([style, conditioning, after], 1), latent, conditioning,
                               latent)
    assert (layout.text_tokens, layout.conditioning_columns) == (89, slice(9, 86))


def test_a_layout_that_cannot_be_read_is_refused_naming_the_patch():
    conditioning, latent = streams(1, (20, 16))
    with pytest.raises(UnrecognisedLayoutError, match="20 conditioning tokens unchanged; the post_input patch X"):
        read_joint_layout((1, 16, 8, 8), 2, 2 * conditioning, latent, conditioning, latent, "the post_input patch X")
    style, = streams(1, (5,), seed=3)
    with pytest.raises(UnrecognisedLayoutError, match="latent's 16 tokens"):
        read_joint_layout((1, 16, 8, 8), 2, conditioning, torch.cat([style, latent], 1), conditioning, latent)
    with pytest.raises(UnrecognisedLayoutError, match="latent's 16 tokens"):
        read_joint_layout((1, 16, 8, 8), 2, conditioning, latent[:, :12], conditioning)
