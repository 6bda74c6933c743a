"""DisenDiff nodes in the real ComfyUI on the tiny SD1.5 (64×64, a few steps)."""
from __future__ import annotations

import uuid

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoints import empty_latent, encode_prompt, sample
from harness.comfy_env import models_dir, pack_module
from harness.pack_nodes import run_node, user_cancels_at_step
from harness.tensors import changed_keys, unpatched_state

TRAIN = dict(class_words="cat, dog", steps=2, learning_rate=1e-3, batch_size=2, grad_accumulation=1,
             resolution=64, seed=1, checkpoint_every=1, augment=False)


def _image():
    return torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def run_name(comfy):
    name = f"dd_test_{uuid.uuid4().hex[:12]}"  # torch's RNG repeats: earlier code seeds it
    yield name
    for path in [models_dir() / "loras" / f"{name}_disendiff_kv.safetensors",
                 *[models_dir() / "embeddings" / f"{name}_new{i}.safetensors" for i in (1, 2)]]:
        path.unlink(missing_ok=True)


def _train(sd15, name, **overrides):
    model, clip, vae = sd15
    return run_node("DisenDiffTrainer", model=model, clip=clip, vae=vae, image=_image(), name=name,
                    **{**TRAIN, **overrides})


@pytest.mark.slow
def test_exports_load_in_stock_nodes_and_reproduce_the_trained_model(comfy, sd15, run_name):
    trained_model, trained_clip, prompt, lora_name = _train(sd15, run_name)
    assert prompt == f"photo of a embedding:{run_name}_new1 cat and embedding:{run_name}_new2 dog"
    lora = load_file(str(models_dir() / "loras" / lora_name))
    assert len(lora) == 2 * 7 and all(k.endswith((".to_k.diff", ".to_v.diff")) for k in lora)  # every attn2 layer
    assert any(t.abs().max() > 0 for t in lora.values())
    embedding = load_file(str(models_dir() / "embeddings" / f"{run_name}_new1.safetensors"))
    assert embedding["clip_l"].shape == (1, 768)

    model, clip, _ = sd15
    stock_model = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    negative = encode_prompt(clip, "")
    latent = empty_latent(1)
    ours = sample(trained_model, encode_prompt(trained_clip, prompt), negative, latent, steps=1)
    stock = sample(stock_model, encode_prompt(clip, prompt), negative, latent, steps=1)
    plain = sample(model, encode_prompt(clip, prompt), negative, latent, steps=1)
    assert (ours - stock).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-3, "training changed nothing"


@pytest.mark.slow
def test_interrupt_then_resume_equals_uninterrupted(comfy, sd15, run_name):
    """With fresh augmented views per target sample and randomly mirrored regularisation images."""
    data = dict(augment=True, reg_images=torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1)),
                reg_captions="a cat and a dog")
    straight = load_file_after(_train, sd15, run_name + "_a", **data)
    with user_cancels_at_step(1):
        _train(sd15, run_name, **data)
    resumed = load_file_after(_train, sd15, run_name, **data)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


class RecordingVAE:
    """The real VAE, recording the pixels of every encode call."""

    def __init__(self, vae):
        self.vae, self.calls = vae, []

    def encode(self, pixels):
        self.calls.append(pixels.clone())
        return self.vae.encode(pixels)

    def __getattr__(self, name):  # the rest of the real VAE (its weights identify the training run)
        return getattr(self.vae, name)


def test_every_micro_batch_encodes_fresh_views_of_the_target(comfy, sd15, run_name):
    """As the official MaskBase: each target sample is a new augmented view, VAE-encoded when drawn (there
    was one pool of 16 views encoded up front)."""
    model, clip, vae = sd15
    recording = RecordingVAE(vae)
    run_node("DisenDiffTrainer", model=model, clip=clip, vae=recording, image=_image(), name=run_name,
             **{**TRAIN, "steps": 3, "checkpoint_every": 0, "augment": True})
    assert [call.shape[0] for call in recording.calls] == [2, 2, 2], "one encode of 2 views per micro-batch"
    views = torch.cat(recording.calls)
    assert len({view.numpy().tobytes() for view in views}) > 1


def test_low_rank_export_loads_in_stock_nodes_and_matches_the_model_output(comfy, sd15, run_name):
    trained_model, trained_clip, prompt, lora_name = _train(sd15, run_name, lora_rank=2)
    lora = load_file(str(models_dir() / "loras" / lora_name))
    ups = [t for k, t in lora.items() if k.endswith(".lora_up.weight")]
    assert len(ups) == 2 * 7 and all(t.shape[1] == 2 for t in ups)
    model, clip, _ = sd15
    stock_model = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    negative, latent = encode_prompt(clip, ""), empty_latent(1)
    ours = sample(trained_model, encode_prompt(trained_clip, prompt), negative, latent, steps=1)
    stock = sample(stock_model, encode_prompt(clip, prompt), negative, latent, steps=1)
    assert (ours - stock).abs().max() <= 1e-4


def sdxl_clip_reading_the_embeddings_folder():
    """The harness's reduced SDXL CLIP, on a tokenizer copy that resolves embedding: names from
    models/embeddings like a checkpoint loader's CLIP."""
    import copy

    import folder_paths
    from harness.text_encoders import reduced_clip

    clip = reduced_clip("sdxl").clone()
    clip.tokenizer = copy.copy(clip.tokenizer)
    for encoder in ("clip_l", "clip_g"):
        sub = copy.copy(getattr(clip.tokenizer, encoder))
        sub.embedding_directory = folder_paths.get_folder_paths("embeddings")
        setattr(clip.tokenizer, encoder, sub)
    return clip


@pytest.mark.slow
def test_sdxl_training_exports_both_encoders_and_stock_files_reproduce_the_model(comfy, sd15, sdxl_model, run_name):
    clip, vae = sdxl_clip_reading_the_embeddings_folder(), sd15[2]
    trained_model, trained_clip, prompt, lora_name = run_node(
        "DisenDiffTrainer", model=sdxl_model, clip=clip, vae=vae, image=_image(), name=run_name, **TRAIN)
    embedding = load_file(str(models_dir() / "embeddings" / f"{run_name}_new1.safetensors"))
    assert embedding["clip_l"].shape == (1, 768) and embedding["clip_g"].shape == (1, 1280)
    blocks = pack_module("nodes.patching").transformer_blocks(sdxl_model)
    lora = load_file(str(models_dir() / "loras" / lora_name))
    assert len(lora) == 2 * sum(b.has_cross_attention for b in blocks)

    stock_model = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(sdxl_model, lora_name, 1.0)[0]
    negative, latent = encode_prompt(clip, ""), empty_latent(1)
    ours = sample(trained_model, encode_prompt(trained_clip, prompt), negative, latent, steps=1)
    stock = sample(stock_model, encode_prompt(clip, prompt), negative, latent, steps=1)
    plain = sample(sdxl_model, encode_prompt(clip, prompt), negative, latent, steps=1)
    assert (ours - stock).abs().max() <= 1e-4
    assert (ours - plain).abs().max() > 1e-3, "training changed nothing"


def load_file_after(train, sd15, name, **overrides):
    lora_name = train(sd15, name, **overrides)[3]
    try:
        return load_file(str(models_dir() / "loras" / lora_name))
    finally:
        for path in [models_dir() / "loras" / lora_name,
                     *[models_dir() / "embeddings" / f"{name}_new{i}.safetensors" for i in (1, 2)]]:
            path.unlink(missing_ok=True)


def test_bad_inputs_are_clear_errors(comfy, sd15, run_name, sdxl_model):
    with pytest.raises(ValueError, match="2 or more class words"):
        _train(sd15, run_name, class_words="cat")
    with pytest.raises(ValueError, match="SD1.x .*SDXL.* context_dim 2048 and text encoders \\['clip_l'\\]"):
        run_node("DisenDiffTrainer", model=sdxl_model, clip=sd15[1], vae=sd15[2], image=_image(), name=run_name, **TRAIN)
    with pytest.raises(ValueError, match="output name '../..' holds '/'"):
        _train(sd15, "../..")


def test_calibration_strength_zero_is_plain_sampling_and_strength_changes_it(comfy, sd15):
    model, clip, _ = sd15
    prompt = "photo of a small cat and a big dog"
    args = dict(model=model, clip=clip, prompt=prompt, modifiers="small, big", class_words="cat, dog",
                start_percent=0.0, end_percent=1.0)
    positive, negative, latent = encode_prompt(clip, prompt), encode_prompt(clip, ""), empty_latent(2)
    plain = sample(model, positive, negative, latent, steps=2)
    off = sample(run_node("CalibratedCrossAttn", strength=0.0, **args)[0], positive, negative, latent, steps=2)
    on = sample(run_node("CalibratedCrossAttn", strength=2.0, **args)[0], positive, negative, latent, steps=2)
    assert torch.equal(plain, off)
    assert (on - plain).abs().max() > 1e-4
    cfg1 = sample(run_node("CalibratedCrossAttn", strength=2.0, **args)[0], positive, negative, latent, steps=2, cfg=1.0)
    assert torch.isfinite(cfg1).all()
    assert torch.equal(sample(model, positive, negative, latent, steps=2), plain), "patch leaked into the input model"


def test_calibration_rejects_missing_words(comfy, sd15):
    model, clip, _ = sd15
    with pytest.raises(ValueError):
        run_node("CalibratedCrossAttn", model=model, clip=clip, prompt="a cat", modifiers="small, big",
                 class_words="cat, dog", strength=1.0, start_percent=0.0, end_percent=1.0)


@pytest.mark.slow
def test_training_lowers_the_loss_and_touches_only_the_trainables(comfy, sd15):
    """Fitting one fixed micro-batch: the loss falls; base U-Net, CLIP and VAE stay bitwise unchanged."""
    model, clip, vae = sd15
    nodes_disendiff = pack_module("nodes.disendiff")
    glue = pack_module("nodes.training_glue")
    recipe = pack_module("training.disendiff")
    loop = pack_module("training.loop")
    frozen = {f"unet.{k}": v for k, v in unpatched_state(model.model).items()}
    frozen.update({f"clip.{k}": v for k, v in unpatched_state(clip.cond_stage_model).items()})
    settings = recipe.DisenDiffSettings(steps=6, learning_rate=2e-3, micro_batch=2, grad_accumulation=1, augment=False)
    with glue.training_mode():
        run = nodes_disendiff.prepare_training(model, clip, vae, _image(), ["cat", "dog"], "loss_test", settings,
                                               seed=1, resolution=64)

        def fixed_batch(micro):
            return run.step(loop.MicroStep(0, 0, loop.micro_step_generator(1, 0, 0)))

        before = fixed_batch(None).item()
        result = loop.train(run.params, fixed_batch, lambda t: torch.optim.AdamW(t, lr=2e-3, weight_decay=0.01),
                            loop.LoopSettings(steps=6))
        after = fixed_batch(None).item()
    assert after < before and result.losses[-1] < result.losses[0]
    assert all(v.grad is None for v in run.params.values())
    assert any(d.diff.abs().max() > 0 for d in run.deltas.values())
    assert run.vectors.keys() == {"loss_test_new1", "loss_test_new2"}
    assert all(v.abs().max() > 0 for per_encoder in run.vectors.values() for v in per_encoder.values())
    current = {f"unet.{k}": v for k, v in unpatched_state(model.model).items()}
    current.update({f"clip.{k}": v for k, v in unpatched_state(clip.cond_stage_model).items()})
    assert current.keys() == frozen.keys()
    assert not changed_keys(frozen, current)


def test_map_preview_shows_each_concept_and_needs_a_calibrated_model(comfy, sd15):
    model, clip, _ = sd15
    prompt = "photo of a small cat and a big dog"
    calibrated = run_node("CalibratedCrossAttn", model=model, clip=clip, prompt=prompt, modifiers="small, big",
                          class_words="cat, dog", strength=1.0, start_percent=0.0, end_percent=1.0)[0]
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    images, masks = run_node("CalibratedCrossAttnMaps", model=calibrated, positive=encode_prompt(clip, prompt),
                             latent=latent, noise_level=0.5, seed=0)
    assert images.shape == (4, 64, 64, 3) and masks.shape == (2, 64, 64)
    assert images.min() >= 0 and images.max() <= 1 and masks.flatten(1).amax(1).min() > 0.99
    assert not torch.equal(masks[0], masks[1])
    with pytest.raises(ValueError, match="MODEL output of CalibratedCrossAttn"):
        run_node("CalibratedCrossAttnMaps", model=model, positive=encode_prompt(clip, prompt), latent=latent,
                 noise_level=0.5, seed=0)


def test_regularisation_images_from_the_frozen_model(comfy, sd15):
    model, clip, vae = sd15
    images, caption = run_node("DisenDiffRegularization", model=model, clip=clip, vae=vae, class_prompt="a cat and a dog",
                               count=2, steps=1, cfg=6.0, size=64, seed=3)
    assert images.shape == (2, 64, 64, 3) and caption == "a cat and a dog"
    assert not torch.equal(images[0], images[1])


def test_calibration_on_sdxl(comfy, sdxl_model):
    from harness.text_encoders import reduced_clip
    clip = reduced_clip("sdxl")  # ComfyUI's SDXL CLIP (L + G), 3 layers deep: tokenizes and encodes as SDXL's
    prompt = "photo of a small cat and a big dog"
    args = dict(clip=clip, prompt=prompt, modifiers="small, big", class_words="cat, dog", start_percent=0.0,
                end_percent=1.0)
    positive, negative, latent = encode_prompt(clip, prompt), encode_prompt(clip, ""), empty_latent(2)
    plain = sample(sdxl_model, positive, negative, latent, steps=2)
    off = sample(run_node("CalibratedCrossAttn", model=sdxl_model, strength=0.0, **args)[0], positive, negative, latent, steps=2)
    on = sample(run_node("CalibratedCrossAttn", model=sdxl_model, strength=2.0, **args)[0], positive, negative, latent, steps=2)
    assert torch.equal(plain, off) and (on - plain).abs().max() > 1e-4


def test_conditioning_of_another_prompt_stops_sampling_naming_the_node(comfy, sd15):
    """The token positions come from the node's prompt: a positive conditioning of another prompt (same length,
    other words) used to move the edit onto other tokens silently, and one shorter than the positions was
    skipped silently."""
    model, clip, _ = sd15
    prompt = "photo of a small cat and a big dog"
    calibrated = run_node("CalibratedCrossAttn", model=model, clip=clip, prompt=prompt, modifiers="small, big",
                          class_words="cat, dog", strength=1.0, start_percent=0.0, end_percent=1.0)[0]
    negative, latent = encode_prompt(clip, ""), empty_latent(1)
    short = encode_prompt(clip, prompt)
    short[0][0] = short[0][0][:, :4]  # "photo of a small": the class words fall beyond the conditioning
    for positive in (encode_prompt(clip, "photo of a big cat and a small dog"), short):
        with pytest.raises(ValueError, match="CalibratedCrossAttn: the positive conditioning .* is not the node's prompt"):
            sample(calibrated, positive, negative, latent, steps=1)
    long_negative = encode_prompt(clip, ", ".join(["blurry"] * 60))  # 154 tokens: ComfyUI repeats the positive
    plain = sample(model, encode_prompt(clip, prompt), long_negative, latent, steps=2)
    calibrated_out = sample(calibrated, encode_prompt(clip, prompt), long_negative, latent, steps=2)
    assert (calibrated_out - plain).abs().max() > 1e-4


def test_multi_token_class_words_cover_all_their_tokens(comfy, sd15):
    """The official code silently takes only the first sub-token of a class word; here every token counts."""
    _, clip, _ = sd15
    nodes_disendiff = pack_module("nodes.disendiff")
    glue = pack_module("nodes.training_glue")
    recipe = pack_module("training.disendiff")
    names, words = ["mt_new1", "mt_new2"], ["teddy bear", "dog"]
    prompt = glue.PlaceholderPrompt(clip, recipe.training_caption(names, words), {n: 1 for n in names})
    first, second = nodes_disendiff.concept_positions(prompt, names, clip, words)
    assert first.modifier == (4,) and first.word == (5, 6)  # SOT photo of a <new1> teddy bear and <new2> dog
    assert second.modifier == (8,) and second.word == (9,)


def test_regularisation_images_are_encoded_with_their_captions(comfy, sd15):
    model, clip, vae = sd15
    nodes_disendiff = pack_module("nodes.disendiff")
    images = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    shared = nodes_disendiff._regularisation(model, clip, vae, images, "a cat and a dog", 64, 77, with_pooled=False)
    assert len(shared) == 3 and all(s.pooled is None and s.context.shape == (1, 77, 768) for s in shared)
    assert all(torch.equal(s.context, shared[0].context) for s in shared)
    assert not torch.equal(shared[0].latent, shared[1].latent)
    own = nodes_disendiff._regularisation(model, clip, vae, images, "a cat\na dog\na cat", 64, 77, with_pooled=True)
    assert torch.equal(own[0].context, own[2].context) and not torch.equal(own[0].context, own[1].context)
    assert own[0].pooled is not None and not torch.equal(own[0].context, shared[0].context)
