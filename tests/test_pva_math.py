"""PVA's joint softmax, identity encoder and weights file, in pure torch against explicit formulations."""
import math

import pytest
import torch
from torch import nn

from personalization_nodes.attention.dispatcher import (
    CHAIN_KEY, CROSS_ATTENTION, AttentionDispatcher, ProcessorChain, stash_hidden_states)
from personalization_nodes.attention.pva import (
    ParallelProjection, ParallelVisualAttentionProcessor, block_name, identity_rows, tokens_per_row)
from personalization_nodes.attention.pva_identity import IdentityTokenTransformer, IResNet, arcface_crop
from personalization_nodes.attention.pva_weights import PVAFormatError, PVAWeights, load_pva, save_pva
from personalization_nodes.attention.sdpa import sdpa_attention

HEADS, DIM_HEAD, QUERY_DIM, CONTEXT_DIM = 2, 8, 16, 12
INNER = HEADS * DIM_HEAD
BLOCK = ("input", 1, 0)


class Attn2(nn.Module):
    """The projections of a ComfyUI CrossAttention (no bias, as in SD)."""

    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(QUERY_DIM, INNER, bias=False)
        self.to_k = nn.Linear(CONTEXT_DIM, INNER, bias=False)
        self.to_v = nn.Linear(CONTEXT_DIM, INNER, bias=False)


def plain(q, k, v, heads=HEADS, mask=None, **_):
    return sdpa_attention(q, k, v, heads, mask=mask)


@pytest.fixture
def layer():
    torch.manual_seed(0)
    attn2 = Attn2()
    projection = ParallelProjection.copy_of(attn2)
    with torch.no_grad():  # a trained pathway differs from its initial copy
        for p in projection.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return attn2, projection


def run_dispatcher(attn2, projection, x, text, tokens, cond_or_uncond, is_exact_attention=None, **settings):
    processor = ParallelVisualAttentionProcessor(nn.ModuleDict({block_name(BLOCK): projection}), tokens, **settings)
    options = {"n_heads": HEADS, "dim_head": DIM_HEAD, "block": BLOCK[:2], "block_index": BLOCK[2],
               "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([3.0]),
               CHAIN_KEY: ProcessorChain().with_processor(processor)}
    n, context, value = stash_hidden_states(x, text, text, options)  # what ComfyUI's attn2_patch call does
    with torch.no_grad():
        q, k, v = attn2.to_q(n), attn2.to_k(context), attn2.to_v(value)
        return AttentionDispatcher(CROSS_ATTENTION, plain, is_exact_attention=is_exact_attention)(q, k, v, options)


def reference(attn2, projection, x, text, row_tokens, sees_identity, strength=1.0):
    """The official pva_forward, one row and one head at a time, with explicit concatenation."""
    out = torch.zeros(x.shape[0], x.shape[1], INNER)
    with torch.no_grad():
        for b in range(x.shape[0]):
            for h in range(HEADS):
                cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
                q_t = attn2.to_q.weight[cols] @ x[b].T
                k_t, v_t = text[b] @ attn2.to_k.weight[cols].T, text[b] @ attn2.to_v.weight[cols].T
                scores = [q_t.T @ k_t.T / math.sqrt(DIM_HEAD)]
                values = [v_t]
                if sees_identity[b]:
                    q_v = x[b] @ projection.to_visual_q.weight[cols].T
                    k_v = row_tokens[b] @ projection.to_visual_k.weight[cols].T
                    scores.append(q_v @ k_v.T / math.sqrt(DIM_HEAD) + math.log(strength))
                    values.append(row_tokens[b] @ projection.to_visual_v.weight[cols].T)
                probs = torch.cat(scores, dim=1).softmax(dim=1)
                out[b, :, cols] = probs @ torch.cat(values, dim=0)
    return out


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0), (0, 1), (1,)])
@pytest.mark.parametrize("uncond_identity", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.4])
@pytest.mark.parametrize("exact_attention", [False, True], ids=["widened heads", "merged by log-sum-exp"])
def test_joint_softmax_equals_explicit_concatenation(layer, cond_or_uncond, uncond_identity, strength, exact_attention):
    attn2, projection = layer
    per_chunk = 2
    batch = per_chunk * len(cond_or_uncond)
    x, text = torch.randn(batch, 9, QUERY_DIM), torch.randn(batch, 5, CONTEXT_DIM)
    tokens = torch.randn(1, 3, CONTEXT_DIM)
    out = run_dispatcher(attn2, projection, x, text, tokens, cond_or_uncond, strength=strength,
                         uncond_identity=uncond_identity,
                         is_exact_attention=(lambda fn, options: True) if exact_attention else None)
    sees = [uncond_identity or c == 0 for c in cond_or_uncond for _ in range(per_chunk)]
    expected = reference(attn2, projection, x, text, tokens.expand(batch, -1, -1), sees, strength)
    assert (out - expected).abs().max() <= 1e-5


def test_one_identity_per_image_of_each_chunk(layer):
    attn2, projection = layer
    x, text = torch.randn(6, 9, QUERY_DIM), torch.randn(6, 5, CONTEXT_DIM)
    tokens = torch.randn(3, 4, CONTEXT_DIM)  # identities of images 0, 1, 2
    out = run_dispatcher(attn2, projection, x, text, tokens, (0, 1), uncond_identity=True)
    expected = reference(attn2, projection, x, text, tokens.repeat(2, 1, 1), [True] * 6)
    assert (out - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="3 identities but the latent batch has 2 images"):
        run_dispatcher(attn2, projection, x[:4], text[:4], tokens, (0, 1))


def test_no_identity_tokens_or_zero_strength_is_exactly_plain_cross_attention(layer):
    attn2, projection = layer
    x, text = torch.randn(4, 9, QUERY_DIM), torch.randn(4, 5, CONTEXT_DIM)
    with torch.no_grad():
        expected = plain(attn2.to_q(x), attn2.to_k(text), attn2.to_v(text))
    no_tokens = run_dispatcher(attn2, projection, x, text, torch.zeros(1, 0, CONTEXT_DIM), (1, 0))
    zero_strength = run_dispatcher(attn2, projection, x, text, torch.randn(1, 3, CONTEXT_DIM), (1, 0), strength=0.0)
    uncond_only = run_dispatcher(attn2, projection, x, text, torch.randn(1, 3, CONTEXT_DIM), (1,))
    for out in (no_tokens, zero_strength, uncond_only):
        assert torch.equal(out, expected)


def test_uncond_rows_without_identity_match_plain_attention(layer):
    attn2, projection = layer
    x, text = torch.randn(4, 9, QUERY_DIM), torch.randn(4, 5, CONTEXT_DIM)
    out = run_dispatcher(attn2, projection, x, text, torch.randn(1, 3, CONTEXT_DIM), (1, 0))
    with torch.no_grad():
        expected = plain(attn2.to_q(x[:2]), attn2.to_k(text[:2]), attn2.to_v(text[:2]))
    assert (out[:2] - expected).abs().max() <= 1e-6
    assert identity_rows((1, 0), 4, False).tolist() == [False, False, True, True]
    assert identity_rows((1, 0), 4, True) is None


def test_processor_without_stashed_hidden_states_is_a_clear_error(layer):
    attn2, projection = layer
    processor = ParallelVisualAttentionProcessor(nn.ModuleDict({block_name(BLOCK): projection}), torch.randn(1, 3, CONTEXT_DIM))
    options = {"n_heads": HEADS, "dim_head": DIM_HEAD, "block": BLOCK[:2], "block_index": 0,
               CHAIN_KEY: ProcessorChain().with_processor(processor)}
    q, k = torch.randn(2, 9, INNER), torch.randn(2, 5, INNER)
    with pytest.raises(RuntimeError, match="hidden states were not stashed"):
        AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, k, options)


def test_initial_projections_are_copies_of_the_layer():
    attn2 = Attn2()
    projection = ParallelProjection.copy_of(attn2)
    assert torch.equal(projection.to_visual_q.weight, attn2.to_q.weight)
    assert torch.equal(projection.to_visual_k.weight, attn2.to_k.weight)
    assert torch.equal(projection.to_visual_v.weight, attn2.to_v.weight)


def test_tokens_per_row_layout():
    tokens = torch.arange(2.0).view(2, 1, 1)
    assert tokens_per_row(tokens, 2, 4).flatten().tolist() == [0, 1, 0, 1]
    assert tokens_per_row(tokens[:1], 3, 6).flatten().tolist() == [0] * 6


def _randomize(module, seed):
    """Random parameters and buffers (BatchNorm statistics too), so every layer shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.3)
    return module


def official_transform_network(state, features, heads, eps=1e-5):
    """PVA's TransformNetwork (lib/pva.py) written out from its own weight names: a Sequential of the
    input Linear ``0`` and a post-norm ``nn.TransformerEncoder`` ``1`` (ReLU feed-forward, final LayerNorm),
    learnable ``q_tokens`` appended to the features, the last ``num_q_token`` outputs kept, plus ``pos_enc``."""
    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def layer_norm(x, name):
        mean = x.sum(-1, keepdim=True) / x.shape[-1]
        variance = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]
        return (x - mean) / (variance + eps).sqrt() * state[f"{name}.weight"] + state[f"{name}.bias"]

    def self_attention(x, name):
        width = x.shape[-1]
        d = width // heads
        qkv = x @ state[f"{name}.in_proj_weight"].T + state[f"{name}.in_proj_bias"]
        q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            for h in range(heads):
                part = slice(h * d, (h + 1) * d)
                logits = q[b, :, part] @ k[b, :, part].T / math.sqrt(d)
                weights = (logits - logits.max(-1, keepdim=True).values).exp()
                out[b, :, part] = weights / weights.sum(-1, keepdim=True) @ v[b, :, part]
        return linear(out, f"{name}.out_proj")

    num_q_token = state["q_tokens"].shape[0]
    x = torch.cat([features, state["q_tokens"][None].repeat(features.shape[0], 1, 1)], 1)
    x = linear(x, "0")
    layers = len({key.split(".")[2] for key in state if key.startswith("1.layers.")})
    for i in range(layers):
        name = f"1.layers.{i}"
        x = layer_norm(x + self_attention(x, f"{name}.self_attn"), f"{name}.norm1")
        feed_forward = linear(linear(x, f"{name}.linear1").clamp_min(0), f"{name}.linear2")
        x = layer_norm(x + feed_forward, f"{name}.norm2")
    x = layer_norm(x, "1.norm")
    return x[:, -num_q_token:] + state["pos_enc"][None]


def test_token_transformer_matches_the_official_formulation():
    transformer = _randomize(IdentityTokenTransformer(feature_dim=6, width=16, num_tokens=3, layers=2, heads=8,
                                                      feedforward=32), seed=1).eval()
    # the official weight names: its 0.* is our lift.*, its 1.* our encoder.* (the docstring's mapping)
    official = {key.replace("lift.", "0.", 1).replace("encoder.", "1.", 1): tensor.detach()
                for key, tensor in transformer.state_dict().items()}
    features = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = transformer(features)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, official_transform_network(official, features, heads=8), rtol=1e-4, atol=1e-5)
    assert transformer(features[:, :1]).shape == (2, 3, 16), "any number of references"
    config = IdentityTokenTransformer.config_from_state_dict(transformer.state_dict(), heads=8)
    assert config == dict(feature_dim=6, width=16, num_tokens=3, layers=2, heads=8, feedforward=32, output_width=None)


def official_iresnet(state, x, eps=1e-5):
    """InsightFace's arcface_torch iresnet (lib/face_net.py in PVA) in eval mode, from its weight names:
    conv1–bn1–PReLU; four stages of IBasicBlocks (BN → conv3×3 → BN → PReLU → conv3×3 with the stage's
    stride 2 in the first block → BN, plus the identity, through a 1×1 conv + BN downsample in the first
    block); then bn2, flatten, fc, and the BatchNorm1d ``features``."""
    def batch_norm(x, name):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean, variance = state[f"{name}.running_mean"].view(shape), state[f"{name}.running_var"].view(shape)
        return (x - mean) / (variance + eps).sqrt() * state[f"{name}.weight"].view(shape) + state[f"{name}.bias"].view(shape)

    def prelu(x, name):
        return torch.where(x > 0, x, state[f"{name}.weight"].view(1, -1, 1, 1) * x)

    def conv(x, name, stride=1):
        weight = state[f"{name}.weight"]
        return torch.nn.functional.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2)

    x = prelu(batch_norm(conv(x, "conv1"), "bn1"), "prelu")
    for stage in range(1, 5):
        blocks = len({key.split(".")[1] for key in state if key.startswith(f"layer{stage}.")})
        for index in range(blocks):
            name, stride = f"layer{stage}.{index}", 2 if index == 0 else 1
            out = batch_norm(x, f"{name}.bn1")
            out = prelu(batch_norm(conv(out, f"{name}.conv1"), f"{name}.bn2"), f"{name}.prelu")
            out = batch_norm(conv(out, f"{name}.conv2", stride), f"{name}.bn3")
            identity = batch_norm(conv(x, f"{name}.downsample.0", stride), f"{name}.downsample.1") if index == 0 else x
            x = out + identity
    x = batch_norm(x, "bn2").flatten(1)
    return batch_norm(x @ state["fc.weight"].T + state["fc.bias"], "features")


def test_iresnet_matches_the_official_formulation_and_crop_gives_arcface_input():
    net = _randomize(IResNet((1, 2, 1, 1), num_features=32), seed=2).eval()
    state = {k: v.detach() for k, v in net.state_dict().items()}
    faces = arcface_crop(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    assert faces.shape == (2, 3, 112, 112)
    with torch.no_grad():
        out = net(faces)
    assert out.shape == (2, 32)
    expected = official_iresnet(state, faces)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    loaded = IResNet.from_state_dict(net.state_dict())
    assert loaded.layers == (1, 2, 1, 1)
    with torch.no_grad():
        assert torch.equal(loaded(faces), out)
    r50 = IResNet().state_dict()
    assert "layer3.13.conv1.weight" in r50 and "layer3.14.conv1.weight" not in r50, "r50 layout: layers 3/4/14/3"
    with pytest.raises(ValueError, match="not an InsightFace iresnet"):
        IResNet.from_state_dict({"fc.weight": torch.zeros(512, 10)})


def test_weights_file_round_trip(tmp_path):
    torch.manual_seed(3)
    layers = {BLOCK: Attn2(), ("middle", 0, 0): Attn2()}
    projections = {block_name(key): ParallelProjection.copy_of(layer) for key, layer in layers.items()}
    weights = PVAWeights.initial(projections, "clip_vision", feature_dim=5, identity_word={"l": torch.randn(1, CONTEXT_DIM)},
                                 num_tokens=2, layers=1, heads=2, feedforward=8)
    assert weights.context_dim == CONTEXT_DIM
    save_pva(tmp_path / "alice.safetensors", weights)
    loaded = load_pva(tmp_path / "alice.safetensors")
    assert loaded.encoder == "clip_vision" and set(loaded.parallel) == {"input_1_0", "middle_0_0"}
    for key, tensor in weights.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    features = torch.randn(1, 3, 5)
    with torch.no_grad():
        assert torch.equal(loaded.identity_tokens(features), weights.identity_tokens(features))
    with pytest.raises(PVAFormatError, match="takes 5-d"):
        loaded.identity_tokens(torch.randn(1, 3, 7))
    with pytest.raises(PVAFormatError, match="only .safetensors"):
        load_pva(tmp_path / "alice.pth")
    with pytest.raises(PVAFormatError, match="not a PVA weights file"):
        PVAWeights.from_state(weights.state_dict(), {"format": "other"})
