"""RealCustom nodes in the real ComfyUI on the tiny SD1.5 / SDXL models."""
import pytest
import torch
import torch.nn.functional as F
from harness.checkpoints import empty_latent, encode_prompt, sample, sdxl_conditioning
from harness.comfy_env import pack_module
from harness.pack_nodes import run_node
from harness.tensors import close

PROMPT = "a photo of a toy on the beach"
STEPS = 2
SD15_ADAPTER = "test_realcustom_sd15_v1.safetensors"
SDXL_ADAPTER = "test_realcustom_sdxl_v1.safetensors"
GUIDANCE_DEFAULTS = dict(prompt=PROMPT, word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                         update_fraction=1.0, map_source="text-only pass", uncond_image="black image", strength=1.0)


def reference(model, name, token_dim, seed=0, scoring=False):
    from harness.comfy_env import pack_module
    from harness.realcustom import TINY_CLIP_VISION, adapter_path, tiny_clip_vision
    blocks = pack_module("nodes.patching").transformer_blocks(model)
    adapter_path(name, blocks, TINY_CLIP_VISION["hidden_size"], token_dim, scoring=scoring)
    adapter = run_node("RealCustomLoader", adapter_name=name)[0]
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(seed))
    return run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(), image=image, crop=False)[0]


@pytest.fixture(scope="module")
def sd15_reference(comfy, sd15):
    return reference(sd15[0], SD15_ADAPTER, 768)


def guided(model, ref, clip, **overrides):
    return run_node("AdaptiveMaskGuidance", model=model, reference=ref, clip=clip, **{**GUIDANCE_DEFAULTS, **overrides})


def sd15_conds(clip, prompt=PROMPT):
    return encode_prompt(clip, prompt), encode_prompt(clip, "")


@pytest.mark.parametrize("batch,cfg", [(3, 1.0), (2, 7.0)])
def test_sd15_one_mask_per_image_per_step(sd15, sd15_reference, batch, cfg):
    model, clip, _ = sd15
    patched, masks = guided(model, sd15_reference, clip)
    positive, negative = sd15_conds(clip)
    out = sample(patched, positive, negative, empty_latent(batch), steps=STEPS, cfg=cfg)
    assert len(masks.steps) == STEPS
    for mask in masks.steps:
        # 64 px → latent 8; SD1.5's largest cross-attention maps are 8×8, so is the mask (paper §3.3)
        assert mask.shape == (batch, 8, 8)
        assert not torch.equal(mask[0], mask[1])  # each image its own map
        assert ((mask > 0).flatten(1).sum(1) <= 16).all()  # top 25 % of 64
        assert torch.allclose(mask.flatten(1).max(1).values, torch.ones(batch), atol=1e-4)  # max_norm, soft
    plain = sample(model, positive, negative, empty_latent(batch), steps=STEPS, cfg=cfg)
    assert not torch.allclose(out, plain, atol=1e-3)

    mask, preview = run_node("RealCustomMaskPreview", masks=masks, samples={"samples": out})
    assert mask.shape == (STEPS * batch, 64, 64) and preview.shape == (STEPS * batch, 64, 64, 3)
    assert 0.0 <= float(mask.min()) and float(mask.max()) <= 1.0


def test_sd15_text_only_pass_and_fast_mode_share_the_step0_mask(sd15, sd15_reference):
    model, clip, _ = sd15
    positive, negative = sd15_conds(clip)
    runs = {}
    for source in ("previous step", "text-only pass"):
        patched, masks = guided(model, sd15_reference, clip, map_source=source)
        sample(patched, positive, negative, empty_latent(1), steps=STEPS)
        runs[source] = masks.steps
    assert torch.allclose(runs["previous step"][0], runs["text-only pass"][0], atol=1e-5)
    assert len(runs["text-only pass"]) == STEPS


def test_new_nodes_read_the_map_on_the_released_schedule(comfy, sd15, sd15_reference):
    """Paper §3.3 and the released code read each step's map from a text-only pass at that step: a node with
    its widget defaults does, and "previous step" (the map of the guided pass, one step late) stays an option."""
    schema = comfy.nodes.NODE_CLASS_MAPPINGS["AdaptiveMaskGuidance"].GET_SCHEMA()
    defaults = {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}
    assert defaults["map_source"] == "text-only pass"
    model, clip, _ = sd15
    positive, negative = sd15_conds(clip)
    steps = {}
    for name, overrides in {"defaults": {}, "text-only pass": {"map_source": "text-only pass"},
                            "previous step": {"map_source": "previous step"}}.items():
        patched, masks = run_node("AdaptiveMaskGuidance", model=model, reference=sd15_reference, clip=clip,
                                  **{**defaults, "prompt": PROMPT, **overrides})
        sample(patched, positive, negative, empty_latent(1), steps=STEPS)
        steps[name] = masks.steps
    assert all(torch.equal(a, b) for a, b in zip(steps["defaults"], steps["text-only pass"], strict=True))
    assert not torch.equal(steps["defaults"][1], steps["previous step"][1])


def test_sd15_cascaded_guidance_is_paper_eq13(sd15, sd15_reference):
    """One Euler step ends at the denoised prediction, so the output IS the guidance's combination:
    eq. 13 = D(∅) + ω_t (D_T2I − D(∅)) + ω_i (D_TI2I − D_T2I), each term measured by its own run."""
    model, clip, _ = sd15
    positive, negative = sd15_conds(clip)
    released, _ = guided(model, sd15_reference, clip, map_source="text-only pass")
    cascaded, masks = guided(model, sd15_reference, clip, guidance="cascaded (paper eq. 13)", image_guidance=5.0)

    def one_step(patched, cfg):
        return sample(patched, positive, negative, empty_latent(2), steps=1, cfg=cfg)

    text_image = one_step(released, 1.0)  # CFG 1: the cond prediction alone
    text = one_step(model, 1.0)  # the text-only pass is the unpatched cond prediction
    uncond = 2.0 * text_image - one_step(released, 2.0)  # released CFG 2 = D(∅) + 2 (D_TI2I − D(∅))
    eq13 = uncond + 2.0 * (text - uncond) + 5.0 * (text_image - text)
    # eq. 13 is assembled from four runs in other batch layouts: equal up to their float rounding (measured 7e-6
    # of the largest value on an AVX2 CPU), while the released guidance misses it by a fifth of it
    assert close(one_step(cascaded, 2.0), eq13, rel=1e-4)
    assert not close(one_step(released, 2.0), eq13, rel=1e-2)  # the two guidances really differ here
    assert len(masks.steps) == 1
    cfg1 = uncond + 1.0 * (text - uncond) + 5.0 * (text_image - text)  # = text + 5 (text_image − text)
    assert close(one_step(cascaded, 1.0), cfg1, rel=1e-4)


def test_sd15_cascaded_guidance_with_equal_scales_is_the_released_cfg(sd15, sd15_reference):
    model, clip, _ = sd15
    positive, negative = sd15_conds(clip)
    released, _ = guided(model, sd15_reference, clip, map_source="text-only pass")
    cascaded, masks = guided(model, sd15_reference, clip, guidance="cascaded (paper eq. 13)", image_guidance=3.0)
    out = sample(cascaded, positive, negative, empty_latent(1), steps=STEPS, cfg=3.0)
    assert (out - sample(released, positive, negative, empty_latent(1), steps=STEPS, cfg=3.0)).abs().max() <= 1e-4
    assert len(masks.steps) == STEPS


def test_sd15_threshold_selection_keeps_values_above_one_minus_scope(sd15, sd15_reference):
    model, clip, _ = sd15
    patched, masks = guided(model, sd15_reference, clip, scope_selection="threshold", mask_scope=0.4)
    sample(patched, *sd15_conds(clip), empty_latent(2), steps=STEPS)
    for mask in masks.steps:
        kept = mask[mask > 0]
        assert kept.numel() > 0 and float(kept.min()) >= 0.6 - 1e-6


def test_sd15_adapter_with_adaptive_scoring_scores_the_tokens_of_every_call(sd15):
    """Paper §3.2: tokens picked and weighted per call from the prompt, the masked model input and ᾱ_t."""
    import dataclasses
    model, clip, _ = sd15
    scored_ref = reference(model, "test_realcustom_sd15_scoring_v1.safetensors", 768, scoring=True)
    assert scored_ref.features is not None
    positive, negative = sd15_conds(clip)
    outputs = {}
    for cfg in (1.0, 5.0):
        patched, masks = guided(model, scored_ref, clip)
        outputs[cfg] = sample(patched, positive, negative, empty_latent(2), steps=STEPS, cfg=cfg)
        assert torch.isfinite(outputs[cfg]).all() and len(masks.steps) == STEPS
    unscored = dataclasses.replace(scored_ref, features=None)  # the same adapter's projector on all tokens
    assert not torch.allclose(outputs[5.0], sample(guided(model, unscored, clip)[0], positive, negative, empty_latent(2),
                                                   steps=STEPS, cfg=5.0), atol=1e-4)

    scorer = pack_module("nodes.realcustom")._ScoredTokens(scored_ref.adapter.adapter, scored_ref.features)
    x, context = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 768)
    tokens = scorer(x, context, [0, 1], torch.ones(2, 4, 4), torch.full((4,), 3.0))
    count = scored_ref.features.reference.shape[1]
    assert tokens.reference.shape == (2, round(0.8 * count), 768) and tokens.negative.shape == tokens.reference.shape
    masked = scorer(x, context, [0, 1], torch.zeros(2, 4, 4), torch.full((4,), 3.0))
    assert not torch.allclose(masked.reference, tokens.reference), "the word mask must reach the visual context"


def test_sd15_frozen_mask_is_reused(sd15, sd15_reference):
    model, clip, _ = sd15
    patched, masks = guided(model, sd15_reference, clip, update_fraction=0.5)  # 1 of 2 steps updates
    sample(patched, *sd15_conds(clip), empty_latent(1), steps=STEPS)
    assert all(torch.equal(masks.steps[0], m) for m in masks.steps[1:])


def test_sd15_strength_zero_leaves_sampling_unchanged_and_input_model_untouched(sd15, sd15_reference):
    model, clip, _ = sd15
    positive, negative = sd15_conds(clip)
    before = sample(model, positive, negative, empty_latent(1), steps=STEPS)
    patched, _ = guided(model, sd15_reference, clip, strength=0.0)
    off = sample(patched, positive, negative, empty_latent(1), steps=STEPS)
    # the map is still read, through an fp32 softmax instead of the fused kernel: equal up to rounding
    assert (off - before).abs().max() <= 1e-5 * before.abs().max()
    guided(model, sd15_reference, clip)
    assert torch.equal(sample(model, positive, negative, empty_latent(1), steps=STEPS), before)


def test_missing_word_is_a_clear_error(sd15, sd15_reference):
    model, clip, _ = sd15
    with pytest.raises(ValueError) as error:
        guided(model, sd15_reference, clip, word="dog")
    assert "AdaptiveMaskGuidance" in str(error.value) and "'dog'" in str(error.value) and PROMPT in str(error.value)


def test_prompt_that_differs_from_the_conditioning_is_explained(sd15, sd15_reference):
    model, clip, _ = sd15
    patched, _ = guided(model, sd15_reference, clip)
    long_positive = encode_prompt(clip, " ".join(["red"] * 80) + " toy")  # 154 tokens, not 77 x k of the prompt
    long_positive[0][0] = long_positive[0][0][:, :150]
    with pytest.raises(ValueError, match="same prompt"):
        sample(patched, long_positive, encode_prompt(clip, ""), empty_latent(1), steps=1)


def test_adapter_of_another_family_is_rejected(sd15, sdxl_model):
    ref = reference(sdxl_model, SDXL_ADAPTER, 2048)
    with pytest.raises(ValueError, match="width|no such cross-attention"):
        guided(sd15[0], ref, sd15[1])


def test_clip_vision_of_another_width_is_rejected(comfy, sd15):
    from harness.comfy_env import pack_module
    from harness.realcustom import adapter_path, tiny_clip_vision
    blocks = pack_module("nodes.patching").transformer_blocks(sd15[0])
    adapter_path("test_realcustom_wide_v1.safetensors", blocks, 64, 768)
    adapter = run_node("RealCustomLoader", adapter_name="test_realcustom_wide_v1.safetensors")[0]
    with pytest.raises(ValueError, match="32-d features"):
        run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(),
                 image=torch.rand(1, 32, 32, 3), crop=True)


@pytest.mark.parametrize("batch,cfg", [(2, 5.0), (1, 1.0)])
def test_sdxl_masks_per_step(comfy, sdxl_model, batch, cfg):
    from harness.text_encoders import sdxl_tokenizer_clip
    ref = reference(sdxl_model, SDXL_ADAPTER, 2048)
    patched, masks = guided(sdxl_model, ref, sdxl_tokenizer_clip(), map_source="text-only pass")
    positive, negative = sdxl_conditioning(batch=1, seed=1), sdxl_conditioning(batch=1, seed=2)
    out = sample(patched, positive, negative, empty_latent(batch), steps=STEPS, cfg=cfg)
    assert out.shape == (batch, 4, 8, 8)
    # no attention at SDXL's full resolution: its largest maps, and so the mask, are half the latent (as released)
    assert len(masks.steps) == STEPS and all(m.shape == (batch, 4, 4) for m in masks.steps)


# --- released weights ------------------------------------------------------------------------------------

def official_state_dict(vision_dim=2176, token_dim=2048, layers=None):
    """Tensors with the released RealCustom_highres shapes (diffusers U-Net keys) plus an unrelated U-Net key
    the conversion must skip. Every tensor is a distinct window of one random buffer, so the 1.3 GB of
    official shapes cost no memory beyond the buffer."""
    buffer = torch.randn(max(4 * vision_dim * vision_dim, 1280 * token_dim) + 1, generator=torch.Generator().manual_seed(0))
    offsets = iter(range(0, 10 ** 9, 7919))

    def rand(*shape):
        start = next(offsets) % (buffer.numel() - torch.Size(shape).numel())
        return buffer[start:start + torch.Size(shape).numel()].view(*shape)
    sd = {"conv_in.weight": rand(320, 4, 3, 3)}
    layers = layers or ([(f"down_blocks.1.attentions.{a}", 2, 640) for a in range(2)]
                        + [(f"down_blocks.2.attentions.{a}", 10, 1280) for a in range(2)]
                        + [("mid_block.attentions.0", 10, 1280)]
                        + [(f"up_blocks.0.attentions.{a}", 10, 1280) for a in range(3)]
                        + [(f"up_blocks.1.attentions.{a}", 2, 640) for a in range(3)])
    for prefix, depth, inner in layers:
        for t in range(depth):
            for name in ("to_k_vision", "to_v_vision"):
                sd[f"{prefix}.transformer_blocks.{t}.attn2.{name}.weight"] = rand(inner, token_dim)
    p = "encoder_hidden_states_vision_projection."
    for norm in ("norm1", "norm2"):
        sd[f"{p}min_attention.{norm}.weight"], sd[f"{p}min_attention.{norm}.bias"] = rand(vision_dim), rand(vision_dim)
    for proj in ("to_q", "to_k", "to_v"):
        sd[f"{p}min_attention.{proj}.weight"] = rand(vision_dim, vision_dim)
    shapes = {0: (4 * vision_dim, vision_dim), 2: (token_dim, 4 * vision_dim), 4: (token_dim, token_dim)}
    for index, (out_dim, in_dim) in shapes.items():
        sd[f"{p}projector.{index}.weight"], sd[f"{p}projector.{index}.bias"] = rand(out_dim, in_dim), rand(out_dim)
    sd[f"{p}projector.5.weight"], sd[f"{p}projector.5.bias"] = rand(token_dim), rand(token_dim)
    sd[f"{p}projector_base.weight"], sd[f"{p}projector_base.bias"] = rand(token_dim, vision_dim), rand(token_dim)
    return sd


def test_official_weights_convert_key_by_key(comfy):
    import comfy.utils
    from harness.comfy_env import pack_module
    weights = pack_module("attention.realcustom_weights")
    official = official_state_dict()
    adapter = weights.adapter_from_state_dict(weights.convert_official(official), weights.OFFICIAL_FORMAT)

    # ComfyUI's own diffusers → ldm table for the real SDXL U-Net decides where each layer must land
    unet = dict(comfy.utils.unet_to_diffusers({"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
                                               "transformer_depth": [0, 0, 2, 2, 10, 10],
                                               "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                                               "transformer_depth_middle": 10}))
    block_name = pack_module("attention.realcustom").block_name
    converted = 0
    for key, tensor in official.items():
        if ".attn2.to_" in key:
            ldm = unet[key.replace("_vision.weight", ".weight")].split(".")  # input_blocks.4.1.transformer_blocks.0...
            if ldm[0] == "middle_block":
                block = ("middle", 0, int(ldm[3]))
            else:
                block = (ldm[0].split("_")[0], int(ldm[1]), int(ldm[4]))
            projection = "to_k_vision" if ".to_k_vision." in key else "to_v_vision"
            assert torch.equal(getattr(adapter.branch, projection)[block_name(block)].weight, tensor)
            converted += 1
        elif key.startswith("encoder_hidden_states_vision_projection."):
            own = adapter.projector.state_dict()[key[len("encoder_hidden_states_vision_projection."):]]
            assert torch.equal(own, tensor)
    assert converted == 140 and len(adapter.branch.to_k_vision) == 70
    with torch.no_grad():
        tokens = adapter.projector(torch.randn(1, 729, 2176), torch.randn(1, 2916, 2176))
    assert tokens.shape == (1, 729, 2048)


def test_loader_reads_a_released_layout_file(comfy):
    from harness.comfy_env import models_dir
    from harness.realcustom import write_adapter
    official = official_state_dict(vision_dim=128, token_dim=64, layers=[("mid_block.attentions.0", 2, 1280)])
    path = models_dir() / "realcustom" / "test_official_layout.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(path, official, None)
    try:
        loaded = run_node("RealCustomLoader", adapter_name=path.name)[0]
    finally:
        path.unlink()
    assert loaded.adapter.format_name == "realcustom.official_sdxl"
    assert set(loaded.adapter.branch.blocks()) == {("middle", 0, 0), ("middle", 0, 1)}
    weight = official["mid_block.attentions.0.transformer_blocks.1.attn2.to_v_vision.weight"]
    assert torch.equal(loaded.adapter.branch.to_v_vision["middle_0_1"].weight, weight)


def test_loader_rejects_a_file_without_realcustom_weights(comfy):
    from harness.comfy_env import models_dir
    from harness.realcustom import write_adapter
    path = models_dir() / "realcustom" / "test_not_realcustom.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(path, {"conv_in.weight": torch.zeros(2, 2)}, None)
    try:
        with pytest.raises(ValueError, match="no RealCustom visual projections"):
            run_node("RealCustomLoader", adapter_name=path.name)
    finally:
        path.unlink()


def test_released_adapter_without_dinov2_says_which_encoders_it_needs(comfy, sd15):
    from harness.comfy_env import pack_module
    from harness.realcustom import tiny_clip_vision
    weights = pack_module("attention.realcustom_weights")
    sd = official_state_dict(vision_dim=128, token_dim=64, layers=[("mid_block.attentions.0", 1, 1280)])
    released = weights.adapter_from_state_dict(weights.convert_official(sd), weights.OFFICIAL_FORMAT)
    adapter = pack_module("nodes.realcustom").LoadedAdapter(released, None, "RealCustom_highres.safetensors")
    with pytest.raises(ValueError, match="SigLIP-so400m-patch14-384 AND DINOv2-L/14 with 4 registers.*RealCustomDINOv2Loader"):
        run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(),
                 image=torch.rand(1, 32, 32, 3), crop=False)


def released_layout_adapter(model, vision_dim: int, name: str):
    """A random adapter of the released format (HighResMinAttn projector) for ``model``'s cross-attention
    layers, written to models/realcustom and loaded by RealCustomLoader."""
    from harness.checkpoints import randomize_
    from harness.comfy_env import models_dir, pack_module
    from harness.realcustom import write_adapter
    weights, realcustom = pack_module("attention.realcustom_weights"), pack_module("attention.realcustom")
    blocks = [b for b in pack_module("nodes.patching").transformer_blocks(model) if b.has_cross_attention]
    adapter = weights.RealCustomAdapter(weights.OFFICIAL_FORMAT, weights.HighResMinAttnProjector(vision_dim, 2048),
                                        realcustom.ImageBranchWeights({b.key: (b.channels, 2048) for b in blocks}))
    randomize_(adapter, seed=5, std=0.05)
    path = models_dir() / "realcustom" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(path, adapter.state_dict(), weights.OFFICIAL_FORMAT)
    return run_node("RealCustomLoader", adapter_name=name)[0]


def test_released_model_encodes_its_views_through_siglip_and_dinov2_and_guides_sdxl(comfy, sdxl_model):
    """Released path end to end on reduced encoders: the global view and the four polyphase local views of
    the 768-px reference go through SigLIP (CLIP_VISION) and DINOv2 with registers (penultimate blocks),
    channel-concatenated, locals interleaved token by token, into the released projector; then guidance."""
    from harness.realcustom import TINY_DINOV2, tiny_dinov2_path, tiny_siglip_vision
    siglip = tiny_siglip_vision()
    dinov2 = run_node("RealCustomDINOv2Loader", dinov2_name=tiny_dinov2_path().name)[0]
    assert dinov2.model.pos_embed.shape[1] == 27 * 27, "the 518-px grid is resampled to the 384-px views"
    adapter = released_layout_adapter(sdxl_model, 64 + TINY_DINOV2["dim"], "test_released_layout_sdxl.safetensors")
    image = torch.rand(1, 50, 70, 3, generator=torch.Generator().manual_seed(3))
    encoded = run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=siglip, image=image, crop=False,
                       dinov2=dinov2)[0]

    def features(views):  # (N, 3, 384, 384) → SigLIP ‖ DINOv2 penultimate patch tokens
        with torch.no_grad():
            sig = siglip.encode_image(views.movedim(1, -1), crop=False)["penultimate_hidden_states"]
            return torch.cat([sig.float(), dinov2.model(views).float()], dim=-1)
    images = torch.cat([image, torch.zeros_like(image)]).movedim(-1, 1)
    big = F.interpolate(images, size=(768, 768), mode="bilinear", align_corners=False)
    quantise = lambda x: torch.floor(x.clamp(0, 1) * 255) / 255  # noqa: E731 (ToPILImage → ToTensor)
    global_views = quantise(F.interpolate(big, size=(384, 384), mode="bilinear", align_corners=True))
    local_views = quantise(torch.stack([big[:, :, r::2, c::2] for r in (0, 1) for c in (0, 1)], dim=1).flatten(0, 1))
    local = features(local_views).view(2, 4, 729, -1).transpose(1, 2).reshape(2, 4 * 729, -1)
    with torch.no_grad():
        expected = adapter.adapter.projector(features(global_views), local)
    assert encoded.tokens.reference.shape == (1, 729, 2048)
    assert torch.allclose(encoded.tokens.reference, expected[:1], atol=1e-4)
    assert torch.allclose(encoded.tokens.negative, expected[1:], atol=1e-4), "the negative is the black image"

    from harness.text_encoders import sdxl_tokenizer_clip
    patched, masks = guided(sdxl_model, encoded, sdxl_tokenizer_clip())
    positive, negative = sdxl_conditioning(batch=1, seed=1), sdxl_conditioning(batch=1, seed=2)
    out = sample(patched, positive, negative, empty_latent(1), steps=2)
    plain = sample(sdxl_model, positive, negative, empty_latent(1), steps=2)
    assert torch.isfinite(out).all() and len(masks.steps) == 2
    assert not torch.allclose(out, plain, atol=1e-4), "the released branch changes the picture"


def test_dinov2_loader_refuses_other_vision_files(comfy):
    from harness.realcustom import vitl_clip_vision_path
    with pytest.raises(ValueError, match="tiny_vitl.*not a DINOv2-with-registers file"):
        run_node("RealCustomDINOv2Loader", dinov2_name=vitl_clip_vision_path().name)


def test_pickle_checkpoints_are_not_offered(comfy):
    assert comfy.folder_paths.folder_names_and_paths["realcustom"][1] == {".safetensors"}


def test_composes_with_lora_and_shared_attention_batch(sd15, sd15_reference):
    from harness.checkpoints import sd15_lora_path
    from harness.comfy_env import boot_comfy
    from harness.pack_nodes import shared_attention
    model, clip, _ = sd15
    lora = boot_comfy().nodes.LoraLoaderModelOnly().load_lora_model_only(model, sd15_lora_path().name, 1.0)[0]
    patched, masks = guided(shared_attention(lora), sd15_reference, clip)
    positive, negative = sd15_conds(clip)
    out = sample(patched, positive, negative, empty_latent(2), steps=STEPS)
    assert torch.isfinite(out).all() and len(masks.steps) == STEPS
    without_branch = sample(guided(shared_attention(lora), sd15_reference, clip, strength=0.0)[0], positive, negative,
                            empty_latent(2), steps=STEPS)
    assert not torch.allclose(out, without_branch, atol=1e-3)


def test_sdxl_missing_word_is_a_clear_error(comfy, sdxl_model):
    from harness.text_encoders import sdxl_tokenizer_clip
    ref = reference(sdxl_model, SDXL_ADAPTER, 2048)
    with pytest.raises(ValueError, match="'plush toy' does not occur"):
        guided(sdxl_model, ref, sdxl_tokenizer_clip(), word="plush toy")
