"""DETEX nodes in the real ComfyUI on the tiny SD1.5 and a tiny CLIP vision model (64×64, a few steps)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import uuid

import pytest
import torch
from safetensors.torch import load_file

from harness.checkpoints import empty_latent, encode_prompt, sample
from harness.pva_assets import tiny_clip_vision
from harness.comfy_env import models_dir, pack_module
from harness.pack_nodes import run_node, user_cancels_at_step
from harness.text_encoders import sdxl_tokenizer_clip

SIZE = 64
TRAIN = dict(class_word="dog", steps=2, learning_rate=1e-3, mapper_learning_rate=1e-3, batch_size=1,
             grad_accumulation=1, seed=1, template="photo of a {V} {class}[ with {P} pose][ in {B} background]",
             attribute_source="mappers", subject_branch_probability=0.5, mask_normalization="all elements",
             augmented_views=2, resolution=SIZE, mask_dilation=0, checkpoint_every=1)


def subject_images(count: int = 3):
    """A coloured square (the subject) at a different place in each image, on a plain light background."""
    images = torch.full((count, SIZE, SIZE, 3), 0.85)
    masks = torch.zeros(count, SIZE, SIZE)
    for i in range(count):
        top, left = 8 + 6 * i, 10 + 9 * i
        images[i, top:top + 24, left:left + 20] = torch.tensor([0.7, 0.2, 0.1])
        masks[i, top:top + 24, left:left + 20] = 1
    noise = torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(0)) * 0.04
    return images + noise, masks


def _attribute_files(name: str, count: int = 3):
    return [models_dir() / "embeddings" / f"{name}_{kind}_{i}.safetensors" for kind in ("pose", "bg") for i in range(count)]


def _files(name: str, count: int = 3):
    """The files a run with the mappers writes: LoRA, mappers, then the embeddings."""
    return [models_dir() / "loras" / f"{name}_detex_kv.safetensors",
            models_dir() / "detex" / f"{name}_detex_mappers.safetensors",
            models_dir() / "embeddings" / f"{name}_V.safetensors", *_attribute_files(name, count)]


@pytest.fixture
def run_name(comfy):
    name = f"detex_test_{uuid.uuid4().hex[:12]}"  # torch's RNG repeats: earlier code seeds it
    yield name
    for path in _files(name):
        path.unlink(missing_ok=True)


def _train(sd15, name, images=None, masks=None, **overrides):
    model, clip, vae = sd15
    if images is None:
        images, masks = subject_images()
    inputs = {**TRAIN, "clip_vision": tiny_clip_vision(), **overrides}
    return run_node("DecoupledTokenTrainer", model=model, clip=clip, vae=vae, images=images, masks=masks,
                    name=name, **inputs)


def test_mask_node_finds_the_subject_and_previews_what_the_mappers_see(comfy):
    images, masks = subject_images()
    found, foreground, background = run_node("DecoupledTokenMask", images=images, threshold=0.12, smoothing=1, dilation=0)
    assert found.shape == masks.shape
    assert (found != masks).float().mean() < 0.01
    torch.testing.assert_close(foreground, images * found[..., None])
    torch.testing.assert_close(background, images * (1 - found[..., None]))
    grown = run_node("DecoupledTokenMask", images=images, threshold=0.12, smoothing=1, dilation=2)[0]
    assert grown.sum() > found.sum()


@pytest.fixture(scope="module")
def trained(comfy, sd15):
    """One small training run with the mappers, regularisation images and the attention regulariser:
    (model, clip, name, loss_map),
    and what the input model and CLIP gave before it ran."""
    model, clip, _ = sd15
    positive, negative = encode_prompt(clip, "photo of a dog"), encode_prompt(clip, "")
    before = (positive[0][0].clone(), sample(model, positive, negative, empty_latent(1), steps=1))
    name = f"detex_test_{os.getpid()}_trained"
    class_images = torch.rand(2, 48, 56, 3, generator=torch.Generator().manual_seed(3))  # resized to the training size
    outputs = _train(sd15, name, regularization_images=class_images, regularization_prompt="a photo of a {class}",
                     attention_regularizer=True)
    yield outputs, before
    for path in _files(name):
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_exports_load_in_stock_nodes_and_reproduce_the_trained_model(comfy, sd15, trained):
    model, clip, _ = sd15
    (trained_model, trained_clip, name, loss_map), _ = trained
    assert len(loss_map["loss"]) == TRAIN["steps"]
    lora = load_file(str(models_dir() / "loras" / f"{name}_detex_kv.safetensors"))
    cross = [b for b in pack_module("nodes.patching").transformer_blocks(model) if b.has_cross_attention]
    assert len(lora) == 2 * len(cross) and all(k.endswith((".to_k.diff", ".to_v.diff")) for k in lora)
    assert all(t.abs().max() > 0 for t in lora.values())
    for path in _files(name)[2:]:
        assert load_file(str(path))["clip_l"].shape == (1, 768)

    text = (f"photo of a embedding:{name}_V dog with embedding:{name}_pose_1 pose "
            f"in embedding:{name}_bg_1 background")
    stock_model = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"{name}_detex_kv.safetensors", 1.0)[0]
    negative = encode_prompt(clip, "")
    latent = empty_latent(1)
    ours = sample(trained_model, encode_prompt(trained_clip, text), negative, latent, steps=1)
    stock = sample(stock_model, encode_prompt(clip, text), negative, latent, steps=1)
    assert (ours - stock).abs().max() <= 1e-4
    plain = sample(model, encode_prompt(clip, "photo of a dog"), negative, latent, steps=1)
    assert (ours - plain).abs().max() > 1e-3, "training changed nothing"


@pytest.mark.slow
def test_trainer_leaves_the_input_model_and_clip_unchanged(comfy, sd15, trained):
    model, clip, _ = sd15
    _, (encoded_before, sampled_before) = trained
    positive = encode_prompt(clip, "photo of a dog")
    torch.testing.assert_close(positive[0][0], encoded_before)
    torch.testing.assert_close(sample(model, positive, encode_prompt(clip, ""), empty_latent(1), steps=1), sampled_before)


@pytest.mark.slow
def test_interrupt_then_resume_equals_uninterrupted(comfy, sd15, run_name):
    straight = f"{run_name}_straight"
    try:
        _train(sd15, straight, steps=2, checkpoint_every=0)
        reference = {p.name.replace(straight, ""): load_file(str(p)) for p in _files(straight)}

        with user_cancels_at_step(1):
            _train(sd15, run_name, steps=2, checkpoint_every=0)
        assert not (models_dir() / "embeddings" / f"{run_name}_V.safetensors").exists()
        _train(sd15, run_name, steps=2, checkpoint_every=0)
        resumed = {p.name.replace(run_name, ""): load_file(str(p)) for p in _files(run_name)}
    finally:
        for path in _files(straight):
            path.unlink(missing_ok=True)
    assert resumed.keys() == reference.keys()
    for file, tensors in reference.items():
        for key, tensor in tensors.items():
            torch.testing.assert_close(resumed[file][key], tensor, atol=1e-6, rtol=1e-5, msg=f"{file} {key}")


def _internals(sd15, settings):
    """The trainer's internals for one small run (mappers on the tiny CLIP vision)."""
    detex = pack_module("nodes.detex")
    glue = pack_module("nodes.training_glue")
    templates = pack_module("training.detex_prompts")
    data = pack_module("training.detex_data")
    model, clip, vae = sd15
    images, masks = subject_images()
    with glue.training_mode():
        return detex.DetexTraining(model, clip, vae, tiny_clip_vision(), data.prepare_subject(images, masks, SIZE),
                                   templates.PromptTemplate.parse(TRAIN["template"]), "dog", "mappers", settings,
                                   seed=0, augmented_views=2, regularization_images=None, reg_caption="")


@pytest.fixture(scope="module")
def training(comfy, sd15):
    return _internals(sd15, pack_module("training.detex").DetexSettings(micro_batch=2))


@contextlib.contextmanager
def _settings(training, settings):
    original = training.step.settings
    training.step.settings = settings
    try:
        yield
    finally:
        training.step.settings = original


def _fixed_batch_loss(training, seed=5):
    loop = pack_module("training.loop")
    return training.step(loop.MicroStep(0, 0, torch.Generator().manual_seed(seed)))


def test_gradient_reaches_only_the_subject_word_kv_and_mappers(comfy, sd15, training):
    glue = pack_module("nodes.training_glue")
    params = training.parameters()
    kv = [k for k in params if k.startswith("kv.")]
    model, clip, vae = sd15
    cross = [b for b in pack_module("nodes.patching").transformer_blocks(model) if b.has_cross_attention]
    assert len(kv) == 2 * len(cross) and all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in kv)
    assert set(params) - set(kv) == {"subject"} | {k for k in params if k.startswith("attributes.mappers.")}
    full_branch_only = dataclasses.replace(training.step.settings, subject_branch_probability=0.0, micro_batch=1)
    with glue.training_mode(), _settings(training, full_branch_only):
        for p in params.values():
            p.grad = None
        _fixed_batch_loss(training).backward()
    assert params["subject"].grad.abs().sum() > 0
    assert all(params[k].grad is not None and params[k].grad.abs().sum() > 0 for k in kv)
    for attribute in ("pose", "background"):
        last = params[f"attributes.mappers.{attribute}.cls_branch.6.weight"]
        assert last.grad is not None and last.grad.abs().sum() > 0
    frozen = [*model.model.parameters(), *clip.cond_stage_model.parameters(), *vae.first_stage_model.parameters(),
              *tiny_clip_vision().model.parameters()]
    assert all(p.grad is None for p in frozen)
    assert all(not b.requires_grad for b in training.attributes.buffers())
    for p in params.values():
        p.grad = None


def test_loss_decreases_when_fitting_one_batch(comfy, training):
    glue = pack_module("nodes.training_glue")
    loop = pack_module("training.loop")
    recipe = pack_module("training.detex")
    params = training.parameters()
    start = {k: v.detach().clone() for k, v in params.items()}
    try:
        settings = recipe.DetexSettings(learning_rate=1e-3, mapper_learning_rate=1e-3, micro_batch=1)
        with glue.training_mode(), _settings(training, settings):
            before = _fixed_batch_loss(training).item()
            loop.train(params, lambda micro: _fixed_batch_loss(training), recipe.optimizer_factory(
                settings, training.mapper_parameters()), loop.LoopSettings(steps=5))
            with torch.no_grad():
                after = _fixed_batch_loss(training).item()
        assert after < 0.9 * before
    finally:
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(start[k])


def test_attention_regularizer_adds_to_the_loss_and_its_gradient_reaches_only_the_trainables(comfy, sd15):
    """[R] Break-A-Scene's attention loss: the switch raises the loss of the same batch, and the added
    term's gradient reaches [V], the map layers' K and both mappers, nothing frozen."""
    glue = pack_module("nodes.training_glue")
    recipe = pack_module("training.detex")
    weight = pack_module("training.detex_loss").ATTENTION_LOSS_WEIGHT
    regularised = _internals(sd15, recipe.DetexSettings(micro_batch=2, attention_loss_weight=weight))
    full_branch = dataclasses.replace(regularised.step.settings, subject_branch_probability=0.0)
    with glue.training_mode():
        with _settings(regularised, dataclasses.replace(full_branch, attention_loss_weight=0.0)):
            plain = _fixed_batch_loss(regularised)
        with _settings(regularised, full_branch):
            with_attention = _fixed_batch_loss(regularised)
        assert with_attention.item() > plain.item()
        (with_attention - plain).backward()
    params = regularised.parameters()
    assert params["subject"].grad.abs().sum() > 0
    map_blocks = regularised.step.recorder.blocks
    model, clip, vae = sd15
    blocks = {b.module_path: b.key for b in pack_module("nodes.patching").transformer_blocks(model)}
    map_keys = [k for k in params if k.endswith("to_k.weight") and any(
        f"diffusion_model.{path}.attn2" in k for path, key in blocks.items() if key in map_blocks)]
    assert map_keys and all(params[k].grad.abs().sum() > 0 for k in map_keys)
    for attribute in ("pose", "background"):
        assert params[f"attributes.mappers.{attribute}.cls_branch.6.weight"].grad.abs().sum() > 0
    frozen = [*model.model.parameters(), *clip.cond_stage_model.parameters(), *vae.first_stage_model.parameters(),
              *tiny_clip_vision().model.parameters()]
    assert all(p.grad is None for p in frozen)


def test_prompt_node_keeps_or_drops_the_attributes(comfy, trained):
    (_, trained_clip, name, _), _ = trained
    prompt = "photo of a {V} dog[ with {P} pose][ in {B} background] on the beach"

    def build(**keep):
        return run_node("DecoupledTokenPrompt", clip=trained_clip, name=name, prompt=prompt,
                        **{"image_index": 2, "keep_pose": False, "keep_background": False, **keep})
    subject_only, with_pose, everything = build(), build(keep_pose=True), build(keep_pose=True, keep_background=True)
    assert subject_only[1] == f"photo of a embedding:{name}_V dog on the beach"
    assert with_pose[1] == f"photo of a embedding:{name}_V dog with embedding:{name}_pose_2 pose on the beach"
    assert everything[1] == (f"photo of a embedding:{name}_V dog with embedding:{name}_pose_2 pose "
                             f"in embedding:{name}_bg_2 background on the beach")
    for conditioning, text in (subject_only, with_pose, everything):
        torch.testing.assert_close(conditioning[0][0], encode_prompt(trained_clip, text)[0][0])
    with pytest.raises(FileNotFoundError, match=f"{name}_pose_7"):
        build(keep_pose=True, image_index=7)


@pytest.fixture
def reference_name(comfy):
    name = f"detex_reference_{uuid.uuid4().hex[:12]}"
    yield name
    for path in _attribute_files(name):
        path.unlink(missing_ok=True)


@pytest.mark.slow
def test_exported_mappers_make_words_for_new_images(comfy, trained, reference_name):
    """The mapper file reproduces a training image's words from that image alone; a new image without a
    mask gets words through border keying; DecoupledTokenPrompt uses them through attributes_name."""
    from safetensors import safe_open

    (_, trained_clip, name, _), _ = trained
    mapper_file = f"{name}_detex_mappers.safetensors"
    with safe_open(str(models_dir() / "detex" / mapper_file), "pt") as f:
        metadata = f.metadata()
    assert metadata["clip_layer"] == "last_hidden_state" and metadata["attribute_source"] == "mappers"
    assert "image * mask" in metadata["inputs"] and metadata["resolution"] == str(SIZE)
    images, masks = subject_images()

    def attributes(**inputs):
        return run_node("DecoupledTokenAttributes", clip=trained_clip, mappers=mapper_file,
                        clip_vision=tiny_clip_vision(), name=reference_name, **inputs)
    clip, returned_name = attributes(image=images[1:2], mask=masks[1])
    assert returned_name == reference_name
    for kind in ("pose", "bg"):
        ours = load_file(str(models_dir() / "embeddings" / f"{reference_name}_{kind}_0.safetensors"))["clip_l"]
        trained_word = load_file(str(models_dir() / "embeddings" / f"{name}_{kind}_1.safetensors"))["clip_l"]
        torch.testing.assert_close(ours, trained_word, atol=1e-5, rtol=1e-4)

    new_image = images[2:3].flip(2)  # the subject where no training image had it
    keyed = run_node("DecoupledTokenMask", images=new_image, threshold=0.12, smoothing=2, dilation=0)[0]
    clip, _ = attributes(image=new_image)
    by_border_key = load_file(str(models_dir() / "embeddings" / f"{reference_name}_pose_0.safetensors"))["clip_l"]
    attributes(image=new_image, mask=keyed)
    torch.testing.assert_close(by_border_key, load_file(
        str(models_dir() / "embeddings" / f"{reference_name}_pose_0.safetensors"))["clip_l"])

    prompt = "photo of a {V} dog[ with {P} pose][ in {B} background] on the beach"
    conditioning, text = run_node("DecoupledTokenPrompt", clip=clip, name=name, prompt=prompt, image_index=0,
                                  keep_pose=True, keep_background=True, attributes_name=reference_name)
    assert text == (f"photo of a embedding:{name}_V dog with embedding:{reference_name}_pose_0 pose "
                    f"in embedding:{reference_name}_bg_0 background on the beach")
    torch.testing.assert_close(conditioning[0][0], encode_prompt(clip, text)[0][0])


def test_attributes_node_needs_the_trainers_clip_vision_and_a_mapper_file(comfy, trained, reference_name):
    from harness.realcustom import tiny_clip_vision as narrower_clip_vision

    (_, trained_clip, name, _), _ = trained
    images, masks = subject_images()
    with pytest.raises(ValueError, match="features 64 wide.*gives 32"):
        run_node("DecoupledTokenAttributes", clip=trained_clip, mappers=f"{name}_detex_mappers.safetensors",
                 clip_vision=narrower_clip_vision(), image=images[:1], name=reference_name, mask=masks[0])
    with pytest.raises(ValueError, match="DecoupledTokenAttributes: .*768-wide.*clip_g.*1280"):
        run_node("DecoupledTokenAttributes", clip=sdxl_tokenizer_clip(), mappers=f"{name}_detex_mappers.safetensors",
                 clip_vision=tiny_clip_vision(), image=images[:1], name=reference_name, mask=masks[0])
    assert not any(path.exists() for path in _attribute_files(reference_name, 1))
    not_mappers = models_dir() / "detex" / f"{reference_name}_kv.safetensors"
    shutil.copy(models_dir() / "loras" / f"{name}_detex_kv.safetensors", not_mappers)
    try:
        with pytest.raises(ValueError, match="not a DETEX mapper file"):
            run_node("DecoupledTokenAttributes", clip=trained_clip, mappers=not_mappers.name,
                     clip_vision=tiny_clip_vision(), image=images[:1], name=reference_name, mask=masks[0])
    finally:
        not_mappers.unlink()


# ---- bad inputs ------------------------------------------------------------------------------------

def test_wrong_mask_size_is_a_clear_error(comfy, sd15, run_name):
    images, masks = subject_images()
    with pytest.raises(ValueError, match="one mask per image with the image's size"):
        _train(sd15, run_name, images=images, masks=masks[:, :32, :32])


def test_empty_mask_is_a_clear_error(comfy, sd15, run_name):
    images, masks = subject_images()
    masks[2] = 0
    with pytest.raises(ValueError, match=r"mask of image\(s\) \[2\].*empty"):
        _train(sd15, run_name, images=images, masks=masks)


def test_one_image_only_is_a_clear_error(comfy, sd15, run_name):
    images, masks = subject_images(1)
    with pytest.raises(ValueError, match="3 to 10 images of one subject, got 1"):
        _train(sd15, run_name, images=images, masks=masks)


def test_mappers_without_clip_vision_and_bad_templates_are_clear_errors(comfy, sd15, run_name):
    with pytest.raises(ValueError, match="need a CLIP vision encoder"):
        _train(sd15, run_name, clip_vision=None)
    with pytest.raises(ValueError, match="needs a clause with \\{B\\}"):
        _train(sd15, run_name, template="photo of a {V} {class}[ with {P} pose]")
    with pytest.raises(ValueError, match="class_word"):
        _train(sd15, run_name, class_word="embedding:x")
    with pytest.raises(ValueError, match="no regularization_images"):
        _train(sd15, run_name, regularization_prompt="photo of a dog")


def test_non_sd1_models_are_refused(comfy, sd15, sdxl_model, run_name):
    from harness.text_encoders import sdxl_tokenizer_clip
    _, _, vae = sd15
    images, masks = subject_images()
    with pytest.raises(ValueError, match="SD1.x"):
        run_node("DecoupledTokenTrainer", model=sdxl_model, clip=sdxl_tokenizer_clip(), vae=vae, images=images,
                 masks=masks, name=run_name, **{**TRAIN, "clip_vision": tiny_clip_vision()})


def test_prompt_node_rejects_missing_subject_embedding(comfy, sd15):
    _, clip, _ = sd15
    with pytest.raises(FileNotFoundError, match="never_trained_V"):
        run_node("DecoupledTokenPrompt", clip=clip, name="never_trained", prompt="a {V} dog", image_index=0,
                 keep_pose=False, keep_background=False)


def test_template_longer_than_one_clip_window_is_a_clear_error(comfy, sd15, run_name):
    long_template = "photo of a {V} {class}" + " very" * 80 + "[ with {P} pose][ in {B} background]"
    with pytest.raises(ValueError, match="longer than CLIP's 75 tokens"):
        _train(sd15, run_name, template=long_template, attribute_source="free vectors", clip_vision=None)
