"""Low-rank PVA (attention.pva LowRank*Projection, pva-v2 files) in pure torch: at step 0 it computes exactly what
the paper's full-rank copy computes; after training, the block's own projection plus the change; block selections;
the file format's versions (pva-v1 files still load)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from personalization_nodes.attention.blocks import FLUX, UNET, selected_blocks
from personalization_nodes.attention.pva import (
    JointParallelProjection, LowRankJointProjection, LowRankParallelProjection, OwnProjections, ParallelProjection)
from personalization_nodes.attention.pva_weights import PVAFormatError, PVAWeights

HIDDEN, HEADS, DIM, RANK = 12, 2, 4, 3
INNER = HEADS * DIM


class FluxRMSNorm(nn.Module):
    """Flux's per-head RMSNorm (learned ``scale``)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(DIM) + 0.5)


def fused_block(dtype=torch.float32, seed=0):
    """A Flux double block's fused image and text qkv layers (with bias) and its query and key norms."""
    torch.manual_seed(seed)
    return SimpleNamespace(image_qkv=nn.Linear(HIDDEN, 3 * INNER).to(dtype), text_qkv=nn.Linear(HIDDEN, 3 * INNER).to(dtype),
                           query_norm=FluxRMSNorm(), key_norm=FluxRMSNorm())


def roles(block):
    rows = [slice(i * INNER, (i + 1) * INNER) for i in range(3)]
    return (block.image_qkv, rows[0]), (block.text_qkv, rows[1]), (block.text_qkv, rows[2])


def full_and_low(block, rank=RANK):
    query, key, value = roles(block)
    full = JointParallelProjection.copy_of(query, block.query_norm, key, value, block.key_norm, INNER)
    low = LowRankJointProjection.initial(HIDDEN, INNER, rank, block.query_norm, block.key_norm)
    return full, low, OwnProjections.of_layers(query, key, value)


def call_on(x):
    return SimpleNamespace(hidden_states=x, place_image_queries=lambda queries: queries)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_joint_projection_at_step_zero_is_the_full_rank_copy_bit_for_bit(dtype):
    """The paper's initialisation: the full-rank copy of the block's rows (stored in fp32, cast to the input's
    dtype) and the block's own rows read at run time plus a zero change give the same bits, model in fp32 or bf16."""
    block = fused_block(dtype)
    full, low, own = full_and_low(block)
    x, tokens = torch.randn(2, 5, HIDDEN).to(dtype), torch.randn(1, 3, HIDDEN).to(dtype)
    assert torch.equal(low.queries(call_on(x), own), full.queries(call_on(x)))
    for mine, theirs in zip(low.keys_values(tokens, own), full.keys_values(tokens)):
        assert torch.equal(mine, theirs)
    assert sum(p.numel() for p in low.to_visual_q.parameters()) == RANK * (HIDDEN + INNER)


def test_trained_low_rank_joint_projection_is_own_rows_plus_the_change():
    """After training: queries = norm((W_rows + up·down) x + b_rows), written out per output row."""
    block = fused_block(seed=1)
    _, low, own = full_and_low(block)
    with torch.no_grad():
        for change in (low.to_visual_q, low.to_visual_k, low.to_visual_v):
            change.up.normal_()
    x = torch.randn(1, 2, HIDDEN, dtype=torch.float64)
    weight, bias = block.image_qkv.weight[:INNER].double(), block.image_qkv.bias[:INNER].double()
    up, down = low.to_visual_q.up.double(), low.to_visual_q.down.double()
    expected = torch.zeros(1, 2, INNER, dtype=torch.float64)
    for n in range(2):
        for o in range(INNER):
            changed_row = weight[o] + sum(up[o, r] * down[r] for r in range(RANK))
            expected[0, n, o] = changed_row @ x[0, n] + bias[o]
    scale = block.query_norm.scale.double()
    for n in range(2):
        for h in range(HEADS):
            head = expected[0, n, h * DIM:(h + 1) * DIM]
            expected[0, n, h * DIM:(h + 1) * DIM] = head / (head.square().mean() + 1e-6).sqrt() * scale
    low.double()
    torch.testing.assert_close(low.queries(call_on(x), own), expected, rtol=1e-10, atol=1e-10)


def test_low_rank_unet_projection_at_step_zero_is_the_copy():
    """U-Net attn2 (no bias): the unprojected queries carry W_q + 0 (the copy's weight), keys and values equal."""
    torch.manual_seed(2)
    attn2 = SimpleNamespace(to_q=nn.Linear(HIDDEN, INNER, bias=False), to_k=nn.Linear(7, INNER, bias=False),
                            to_v=nn.Linear(7, INNER, bias=False))
    full = ParallelProjection.copy_of(attn2)
    low = LowRankParallelProjection(HIDDEN, 7, INNER, RANK)
    own = OwnProjections.of_layers(*((layer, slice(None)) for layer in (attn2.to_q, attn2.to_k, attn2.to_v)))
    x, tokens = torch.randn(2, 5, HIDDEN), torch.randn(1, 3, 7)
    mine, theirs = low.queries(call_on(x), own), full.queries(call_on(x))
    assert torch.equal(mine.weight, theirs.weight) and mine.bias is None and torch.equal(mine.project(), theirs.project())
    for mine, theirs in zip(low.keys_values(tokens, own), full.keys_values(tokens)):
        assert torch.equal(mine, theirs)
    assert low.context_dim == 7 and low.rank == RANK


def test_block_selections():
    flux = [("double", i, 0) for i in range(19)] + [("single", i, 0) for i in range(38)]
    assert selected_blocks("all", flux) == flux
    assert selected_blocks("double", flux) == flux[:19]
    assert len(selected_blocks("every_2", flux)) == 29 and selected_blocks("every_2", flux)[:2] == [flux[0], flux[2]]
    assert len(selected_blocks("every_4", flux)) == 15
    sd3 = [("joint", i, 0) for i in range(38)]
    assert selected_blocks("double", sd3) == sd3, "SD3's joint blocks are all two-stream"
    with pytest.raises(ValueError, match="has none"):
        selected_blocks("double", [("input", 1, 0)])
    with pytest.raises(ValueError, match="unknown block selection"):
        selected_blocks("every_3", flux)


def low_rank_weights(selection="double"):
    projections = {name: full_and_low(fused_block(seed=i))[1] for i, name in enumerate(("double_0_0", "double_1_0"))}
    return PVAWeights.initial(projections, "clip_vision", 6, {"t5xxl": torch.randn(1, 16)}, family=FLUX, seed=3,
                              block_selection=selection, inner_width=8, layers=1, feedforward=16, heads=2)


def test_pva_v2_records_rank_blocks_and_the_narrow_token_transformer():
    weights = low_rank_weights()
    with torch.no_grad():
        weights.parallel["double_0_0"].to_visual_k.up.normal_()
    tensors, metadata = weights.state_and_metadata()
    assert metadata["format"] == "pva-v2" and metadata["rank"] == str(RANK) and metadata["blocks"] == "double"
    assert "parallel.double_0_0.to_visual_q.down" in tensors and "parallel.double_0_0.to_visual_q.weight" not in tensors
    assert tensors["token_transformer.project.weight"].shape == (HIDDEN, 8)
    again = PVAWeights.from_state(tensors, metadata)
    assert again.rank == RANK and again.block_selection == "double" and again.context_dim == HIDDEN
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in weights.state_dict().items())
    features = torch.randn(1, 2, 6)
    assert torch.equal(again.identity_tokens(features), weights.identity_tokens(features))
    with pytest.raises(PVAFormatError, match="records rank 'full'"):
        PVAWeights.from_state(tensors, {**metadata, "rank": "full"})


def test_pva_v1_files_load_as_full_rank_on_every_block():
    """A file written before low rank: format pva-v1, no rank or blocks metadata, full-rank keys."""
    torch.manual_seed(4)
    attn2 = SimpleNamespace(to_q=nn.Linear(HIDDEN, INNER, bias=False), to_k=nn.Linear(7, INNER, bias=False),
                            to_v=nn.Linear(7, INNER, bias=False))
    weights = PVAWeights.initial({"input_1_0": ParallelProjection.copy_of(attn2)}, "arcface", 6, {"l": torch.randn(1, 7)},
                                 family=UNET, layers=1, feedforward=16, heads=1)
    tensors = {k: v.detach() for k, v in weights.state_dict().items()}
    old = PVAWeights.from_state(tensors, {"format": "pva-v1", "encoder": "arcface", "heads": "1"})
    assert old.rank is None and old.block_selection == "all" and old.family == UNET
    assert all(torch.equal(v, old.state_dict()[k]) for k, v in tensors.items())
    assert old.state_and_metadata()[1]["rank"] == "full"


@pytest.mark.parametrize("ops", ["plain", "manual_cast", "scaled_fp8"])
def test_the_glue_reads_a_layers_rows_as_its_own_comfy_forward_uses_them(comfy, ops):
    """nodes.pva reads the base of a low-rank projection as the layer's ComfyUI forward computes: bf16 storage cast
    to the input's dtype, a low-VRAM LoRA patch applied at cast time (weight_function), the fp8 scale; so the rows'
    projection is the layer's own output rows."""
    import comfy.ops
    from personalization_nodes.nodes.pva import _live_rows
    operations = {"plain": comfy.ops.disable_weight_init, "manual_cast": comfy.ops.manual_cast,
                  "scaled_fp8": comfy.ops.scaled_fp8_ops()}[ops]
    torch.manual_seed(5)
    layer = operations.Linear(HIDDEN, 3 * INNER, bias=True, dtype=torch.float32 if ops == "plain" else torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape))
        layer.bias.copy_(torch.randn(layer.bias.shape))
        if ops == "scaled_fp8":
            layer.scale_weight.fill_(0.5)
    if ops != "plain":
        delta = torch.randn(layer.weight.shape)
        layer.weight_function = [lambda weight: weight + delta.to(weight)]  # a LoRA in low-VRAM mode
    rows = slice(INNER, 2 * INNER)
    x = torch.randn(2, 3, HIDDEN)
    weight, bias = _live_rows(layer, rows)(x)
    assert weight.dtype == x.dtype == bias.dtype
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), layer(x)[..., rows], rtol=0, atol=1e-5)
