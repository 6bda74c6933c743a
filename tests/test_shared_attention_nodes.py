"""SharedAttentionBatch and friends inside the real ComfyUI, on tiny random SD1.5 / SDXL models."""
import logging

import pytest
import torch

from harness.checkpoints import empty_latent, encode_prompt, sample, sd15_controlnet_path, sdxl_conditioning
from harness.comfy_env import pack_module
from harness.pack_nodes import run_node, shared_attention
from harness.tensors import close as close_to

#: random-weight latents reach ~100, and ComfyUI batches differently: float32 kernels sum in another order per batch
#: layout, and 4 steps at CFG 6 grew that to 1.7e-5 of the largest value on an AVX2 CPU
BATCH_LAYOUT_ROUNDING = 1e-4


def close(a, b):
    """Equal up to the rounding of another batch layout (:data:`BATCH_LAYOUT_ROUNDING`)."""
    return close_to(a, b, rel=BATCH_LAYOUT_ROUNDING)


@pytest.fixture(scope="module")
def prompts(sd15):
    _model, clip, _vae = sd15
    return encode_prompt(clip, "a toy train, origami"), encode_prompt(clip, "blurry")


def split_passes(model):
    """A clone on which ComfyUI runs every cond/uncond pass separately (its own CALC_COND_BATCH hook),
    as it does when memory is short."""
    from comfy import patcher_extension as ext

    def one_pass_per_cond(executor, model_, conds, x, timestep, model_options):
        return [executor(model_, [cond], x, timestep, model_options)[0] for cond in conds]

    clone = model.clone()
    clone.add_wrapper(ext.WrappersMP.CALC_COND_BATCH, one_pass_per_cond)
    return clone


def test_input_model_is_unchanged_and_reference_image_is_identical(comfy, sd15, prompts):
    model = sd15[0]
    latent = empty_latent(3)
    before = sample(model, *prompts, latent, seed=3)
    patched = shared_attention(model, share_group_norm=True, shared_score_shift=0.69)
    styled = sample(patched, *prompts, latent, seed=3)
    after = sample(model, *prompts, latent, seed=3)
    assert torch.equal(before, after)
    assert "personalization" not in model.model_options["transformer_options"]
    assert not model.object_patches and "patches_replace" not in model.model_options["transformer_options"]
    modules = model.get_model_object("diffusion_model").modules()
    assert not any(type(m).__name__ == "ReferenceSharedGroupNorm" for m in modules), "norm patches restored"
    assert torch.equal(styled[0], before[0])
    assert not torch.allclose(styled[1:], before[1:], atol=1e-4)


def test_neutral_settings_equal_plain_sampling(comfy, sd15, prompts):
    model = sd15[0]
    latent = empty_latent(2)
    plain = sample(model, *prompts, latent, seed=5)
    never_active = shared_attention(model, start_percent=1.0, end_percent=1.0, share_group_norm=True)
    no_layers = shared_attention(model, skip_fraction=1.0)
    assert torch.equal(sample(never_active, *prompts, latent, seed=5), plain)
    assert torch.equal(sample(no_layers, *prompts, latent, seed=5), plain)


def test_batch_of_one_is_identity_with_a_warning(comfy, sd15, prompts, caplog):
    model = sd15[0]
    latent = empty_latent(1)
    with caplog.at_level(logging.WARNING):
        out = sample(shared_attention(model), *prompts, latent, seed=2)
    assert torch.equal(out, sample(model, *prompts, latent, seed=2))
    assert "holds one image" in caplog.text


@pytest.mark.parametrize("batch", [2, 4])
@pytest.mark.parametrize("cfg", [1.0, 6.0])
def test_cfg_and_separate_cond_passes(comfy, sd15, prompts, batch, cfg):
    model = sd15[0]
    latent = empty_latent(batch)
    patched = shared_attention(model, share_group_norm=True)
    joint = sample(patched, *prompts, latent, seed=11, cfg=cfg)
    separate = sample(split_passes(patched), *prompts, latent, seed=11, cfg=cfg)
    plain = sample(model, *prompts, latent, seed=11, cfg=cfg)
    assert joint.shape == (batch, 4, 8, 8) and torch.isfinite(joint).all()
    # the same per-chunk reference rule whichever way ComfyUI batches the passes
    assert close(joint, separate)
    assert close(joint[0], plain[0])
    assert not torch.allclose(joint[1:], plain[1:], atol=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_sdxl(comfy, sdxl_model, batch):
    positive, negative = sdxl_conditioning(batch, seed=1), sdxl_conditioning(batch, seed=2)
    latent = empty_latent(batch)
    plain = sample(sdxl_model, positive, negative, latent, seed=4, steps=2)
    styled = sample(shared_attention(sdxl_model, share_group_norm=True), positive, negative, latent, seed=4, steps=2)
    assert styled.shape == plain.shape and torch.isfinite(styled).all()
    assert close(styled[0], plain[0])
    if batch > 1:
        assert not torch.allclose(styled[1:], plain[1:], atol=1e-4)


def test_block_selection_and_full_share_are_real_variants(comfy, sd15, prompts):
    model = sd15[0]
    latent = empty_latent(3)
    full = sample(shared_attention(model), *prompts, latent, seed=8)
    middle_only = sample(shared_attention(model, blocks="middle"), *prompts, latent, seed=8)
    full_share = sample(shared_attention(model, full_attention_share=True), *prompts, latent, seed=8)
    assert not torch.allclose(full, middle_only, atol=1e-5)
    assert not torch.allclose(full, full_share, atol=1e-5)
    with pytest.raises(ValueError, match="matches no transformer block"):
        shared_attention(model, blocks="output:99")


def test_chained_nodes_keep_one_dispatcher_and_the_last_settings(comfy, sd15, prompts):
    model = sd15[0]
    latent = empty_latent(2)
    once = shared_attention(model, shared_score_shift=0.5)
    twice = shared_attention(shared_attention(model, shared_score_shift=-1.0), shared_score_shift=0.5)
    assert len(twice.model_options["transformer_options"]["personalization"].processors) == 1
    assert torch.equal(sample(twice, *prompts, latent, seed=1), sample(once, *prompts, latent, seed=1))


def test_reference_gets_zero_controlnet_residuals(comfy, sd15, prompts):
    model, _clip, _vae = sd15
    nodes = comfy.nodes
    control_net = nodes.ControlNetLoader().load_controlnet(sd15_controlnet_path().name)[0]
    hint = torch.rand(1, 64, 64, 3)
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(*prompts, control_net, hint, 1.0, 0.0, 1.0)
    latent = empty_latent(2)
    with_control = sample(shared_attention(model), positive, negative, latent, seed=9)
    without_control = sample(shared_attention(model), *prompts, latent, seed=9)
    controlled_reference = sample(shared_attention(model, controlnet_on_reference=True), positive, negative, latent, seed=9)
    assert close(with_control[0], without_control[0])
    assert not torch.allclose(with_control[1], without_control[1], atol=1e-4)
    assert not torch.allclose(controlled_reference[0], with_control[0], atol=1e-4)


def test_prompt_batch_encodes_one_conditioning_per_line(comfy, sd15):
    clip = sd15[1]
    conditioning, count = run_node("SharedAttentionPromptBatch", clip=clip,
                                   prompts="a cat\n\na very long prompt " + "word " * 90 + "\na dog", style="origami")
    cond, extras = conditioning[0]
    assert count == 3 and cond.shape[0] == 3 and cond.shape[1] % 77 == 0
    assert extras["pooled_output"].shape[0] == 3
    single = encode_prompt(clip, "a cat, origami")[0][0]
    assert torch.allclose(cond[:1, :77], single, atol=1e-5)
    with pytest.raises(ValueError, match="at least one prompt"):
        run_node("SharedAttentionPromptBatch", clip=clip, prompts="\n \n", style="")


@pytest.mark.parametrize("backend", ["attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"])
def test_score_shift_mask_works_with_every_comfy_attention_backend(comfy, backend):
    """Users pick ComfyUI's attention backend by flag; the reference-key bias must mean the same in all."""
    import comfy.ldm.modules.attention as comfy_attention

    style_aligned = pack_module("attention.style_aligned")
    sdpa = pack_module("attention.sdpa")
    heads = 4
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 20, heads * 8) for _ in range(3))
    settings = style_aligned.StyleAlignedSettings(score_shift=0.693, score_scale=0.7)
    function = getattr(comfy_attention, backend)

    def comfy_backend(q_, k_, v_, mask=None):
        return function(q_, k_, v_, heads, mask=mask)

    def reference(q_, k_, v_, mask=None):
        return sdpa.sdpa_attention(q_, k_, v_, heads, mask=mask)

    ours = style_aligned.shared_self_attention(q, k, v, 2, settings, comfy_backend)
    expected = style_aligned.shared_self_attention(q, k, v, 2, settings, reference)
    assert (ours - expected).abs().max() <= 1e-5
