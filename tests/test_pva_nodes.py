"""PVA nodes inside the real ComfyUI: a tiny 9-channel inpainting checkpoint and the tiny SD1.5."""
import pytest
import torch

from harness.checkpoints import empty_latent, encode_prompt, sample
from harness.pack_nodes import run_node
from harness.pva_assets import arcface_path, faces, pva_model, pva_path, sd15_inpaint_checkpoint_path, tiny_clip_vision
from harness.tensors import close

STEPS = 2  # sampling is the slow part on shared CPU cores; the layouts are unit-tested in test_pva_math


@pytest.fixture(scope="module")
def arcface_pva(comfy):
    arcface_path()
    return run_node("PVALoader", pva_name=pva_path("arcface").name)[0]


@pytest.fixture(scope="module")
def inpainting(comfy):
    """(model, clip, vae) of the tiny 9-channel inpainting checkpoint."""
    model, clip, vae = comfy.nodes.CheckpointLoaderSimple().load_checkpoint(sd15_inpaint_checkpoint_path().name)[:3]
    assert model.model.concat_keys == ("mask", "masked_image"), "detected as an inpainting model"
    return model, clip, vae


def test_inpainting_model_identity_changes_the_hole_and_leaves_the_input_model(comfy, arcface_pva, inpainting):
    model, clip, vae = inpainting
    pixels = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(2, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    positive, negative, latent = comfy.nodes.InpaintModelConditioning().encode(
        encode_prompt(clip, "photo of a person"), encode_prompt(clip, "photo of a person"), pixels, vae, mask)
    before = sample(model, positive, negative, latent, seed=1, cfg=1.0, steps=STEPS)
    patched = pva_model(model, arcface_pva, faces(3))
    out = sample(patched, positive, negative, latent, seed=1, cfg=1.0, steps=STEPS)
    assert out.shape == before.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, before, atol=1e-4)
    assert torch.equal(sample(model, positive, negative, latent, seed=1, cfg=1.0, steps=STEPS), before)
    options = model.model_options["transformer_options"]
    assert "personalization" not in options and "patches" not in options and not model.additional_models
    assert arcface_pva.patcher in patched.get_additional_models()


def test_vae_encode_for_inpaint_flow(comfy, arcface_pva, inpainting):
    model, clip, vae = inpainting
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "photo of a person")
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 8:40] = 1.0
    latent = comfy.nodes.VAEEncodeForInpaint().encode(vae, faces(1, seed=3), mask, grow_mask_by=6)[0]
    out = sample(pva_model(model, arcface_pva, faces(2)), positive, negative, latent, seed=2, cfg=1.0, steps=STEPS)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_cfg_on_off_and_uncond_identity(comfy, arcface_pva, sd15):
    model, clip, _vae = sd15
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "blurry")
    latent = empty_latent(1)
    cond_only, both = (pva_model(model, arcface_pva, faces(2), uncond_identity=flag) for flag in (False, True))
    for cfg in (1.0, 6.0):
        plain = sample(model, positive, negative, latent, seed=4, cfg=cfg, steps=STEPS)
        out = sample(cond_only, positive, negative, latent, seed=4, cfg=cfg, steps=STEPS)
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert not torch.allclose(out, plain, atol=1e-4)
    with_identity = sample(both, positive, negative, latent, seed=4, cfg=6.0, steps=STEPS)
    assert torch.isfinite(with_identity).all()
    assert not torch.allclose(with_identity, out, atol=1e-4), "the negative pass sees the identity or not"


def test_the_two_exact_joint_softmaxes_sample_alike(comfy, arcface_pva, sd15, monkeypatch):
    """On the CPU ComfyUI's attention is exact, so the identity keys join each layer's plain attention by its
    log-sum-exp; widening the heads of ComfyUI's own attention call instead (what other attention functions get)
    samples the same, up to float32 rounding."""
    from harness.comfy_env import pack_module
    model, clip, _vae = sd15
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "blurry")
    dispatcher, patching = pack_module("attention.dispatcher"), pack_module("nodes.patching")
    merges = []
    merged = dispatcher.merged_joint_attention
    monkeypatch.setattr(dispatcher, "merged_joint_attention", lambda *args: merges.append(1) or merged(*args))
    by_logsumexp = sample(pva_model(model, arcface_pva, faces(1)), positive, negative, empty_latent(1), seed=4,
                          steps=STEPS)
    assert merges, "ComfyUI's CPU attention takes the log-sum-exp merge"
    merges.clear()
    monkeypatch.setattr(patching, "computes_exact_attention", lambda attention, options: False)
    widened = sample(pva_model(model, arcface_pva, faces(1)), positive, negative, empty_latent(1), seed=4, steps=STEPS)
    assert not merges and close(widened, by_logsumexp, 1e-4)


def test_strength_zero_and_empty_step_range_equal_plain_sampling(comfy, arcface_pva, sd15):
    model, clip, _vae = sd15
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "blurry")
    latent = empty_latent(1)
    plain = sample(model, positive, negative, latent, seed=6, steps=STEPS)
    off = pva_model(model, arcface_pva, faces(1), strength=0.0)
    assert torch.equal(sample(off, positive, negative, latent, seed=6, steps=STEPS), plain)
    never = pva_model(model, arcface_pva, faces(1), start_percent=1.0, end_percent=1.0)
    assert torch.equal(sample(never, positive, negative, latent, seed=6, steps=STEPS), plain)


def test_batch_with_one_identity_per_image(comfy, arcface_pva, sd15):
    model, clip, _vae = sd15
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "blurry")
    latent = empty_latent(2)
    alice, bob = faces(2, seed=10), faces(2, seed=11)
    per_image = pva_model(model, arcface_pva, torch.cat([alice, bob]), images_per_identity=2)
    alice_only = pva_model(model, arcface_pva, alice)
    mixed = sample(per_image, positive, negative, latent, seed=7, steps=STEPS)
    same = sample(alice_only, positive, negative, latent, seed=7, steps=STEPS)
    # other batch layouts round differently (1.3e-5 of the largest value on an AVX2 CPU); identity 1 moves image 1 by
    # 2.6e-4 of it
    assert close(mixed[0], same[0], rel=5e-5), "image 0 gets identity 0"
    assert not torch.allclose(mixed[1], same[1], atol=1e-4), "image 1 gets identity 1"
    with pytest.raises(ValueError, match="2 identities but the latent batch has 3 images"):
        sample(per_image, positive, negative, empty_latent(3), seed=7, steps=STEPS)


def test_bad_inputs_are_clear_errors(comfy, arcface_pva, sd15, sdxl_model, monkeypatch):
    model = sd15[0]
    with pytest.raises(ValueError, match="no reference image"):
        pva_model(model, arcface_pva, torch.zeros(0, 64, 64, 3))
    with pytest.raises(ValueError, match="cannot be split into identities of 2"):
        pva_model(model, arcface_pva, faces(3), images_per_identity=2)
    with pytest.raises(ValueError, match="must be square"):
        pva_model(model, arcface_pva, torch.rand(1, 64, 48, 3))
    with pytest.raises(ValueError, match="disconnect clip_vision"):
        pva_model(model, arcface_pva, faces(1), clip_vision=tiny_clip_vision())
    with pytest.raises(ValueError, match="trained for a model with the cross-attention blocks"):
        pva_model(sdxl_model, arcface_pva, faces(1))
    folder_paths = comfy.folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "pva",
                        ([str(pva_path("arcface").parent / "nowhere")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "get_full_path",
                        lambda folder, name: str(pva_path("arcface")) if name == pva_path("arcface").name else None)
    with pytest.raises(FileNotFoundError, match="ms1mv3_arcface_r50.safetensors"):
        run_node("PVALoader", pva_name=pva_path("arcface").name)


def test_clip_vision_encoder(comfy, sd15):
    model, clip, _vae = sd15
    pva = run_node("PVALoader", pva_name=pva_path("clip_vision").name)[0]
    positive, negative = encode_prompt(clip, "photo of a person"), encode_prompt(clip, "blurry")
    latent = empty_latent(1)
    with pytest.raises(ValueError, match="connect the same CLIP vision model"):
        pva_model(model, pva, faces(2))
    patched = pva_model(model, pva, faces(2), clip_vision=tiny_clip_vision())
    out = sample(patched, positive, negative, latent, seed=8, steps=STEPS)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, sample(model, positive, negative, latent, seed=8, steps=STEPS), atol=1e-4)


def test_identity_word_takes_one_token_slot(comfy, arcface_pva, sd15):
    clip = sd15[1]
    conditioning = run_node("PVATextEncode", clip=clip, pva=arcface_pva, text="photo of a <new1> person",
                            identity_word="<new1>")[0]
    plain_word = encode_prompt(clip, "photo of a <new1> person")
    assert conditioning[0][0].shape == plain_word[0][0].shape == (1, 77, 768)
    assert not torch.allclose(conditioning[0][0], plain_word[0][0], atol=1e-4)
    # the same tokens, built by hand: the placeholder's 4 BPE tokens → one slot with the learned vector
    tokens = clip.tokenize("photo of a <new1> person")
    ids = [t[0] for t in tokens["l"][0]]
    placeholder = [t[0] for t in clip.tokenize("<new1>")["l"][0][1:-1] if t[0] != ids[-1]]
    start = ids.index(placeholder[0])
    vector = arcface_pva.weights.identity_word["l"].detach().reshape(-1)
    expected = tokens["l"][0][:start] + [(vector, 1.0)] + tokens["l"][0][start + len(placeholder):]
    expected += [tokens["l"][0][-1]] * (len(placeholder) - 1)
    by_hand = clip.encode_from_tokens_scheduled({"l": [expected]})
    assert torch.equal(conditioning[0][0], by_hand[0][0])
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        run_node("PVATextEncode", clip=clip, pva=arcface_pva, text="photo of a person", identity_word="<new1>")
