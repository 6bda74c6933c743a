"""DETEX nodes (Cai et al., "Decoupled Textual Embeddings for Customized Image Generation", AAAI 2024).

- DecoupledTokenMask: a subject mask per image by border keying, with foreground/background previews.
- DecoupledTokenTrainer: trains the subject word [V], per-image pose [P_i] / background [B_i] words from
  attribute mappers, and the cross-attention K/V; exports stock embedding and LoRA files.
- DecoupledTokenPrompt: conditioning with [V] alone, or with a training image's pose and/or background.
- DecoupledTokenAttributes: pose/background words of a NEW reference image from the exported mappers.
"""
from __future__ import annotations

import logging

import folder_paths
import torch

from ..attention.custom_diffusion import StartTokenDetach
from ..attention.token_maps import MapRecorder, map_block_keys
from ..training.detex import (
    DetexSettings, DetexStep, RegularisationView, attribute_parameters, build_pool, optimizer_factory)
from ..training.augmentation import center_square, encode_both_ways
from ..training.detex_data import (
    MAX_IMAGES, MIN_IMAGES, attribute_inputs, dilate, prepare_subject, split_foreground)
from ..training.detex_loss import ATTENTION_LOSS_WEIGHT, MASK_NORMALIZATIONS
from ..training.detex_mappers import (
    ATTRIBUTE_SOURCES, ATTRIBUTES, MAPPERS, AttributeEmbeddings, load_mappers, map_attributes, save_mappers)
from ..training.detex_masks import DEFAULT_SMOOTHING, DEFAULT_THRESHOLD, border_key_masks
from ..training.detex_prompts import CLASS, DEFAULT_TEMPLATE, PromptTemplate
from ..training.disendiff import init_token_ids
from ..training.exporters import save_embedding, save_lora
from ..training.loop import LoopSettings, fingerprint, train
from ..training.naming import output_path, checked_name
from ..training.runs import RUN_ID_KEY, ExportedFile, without_steps
from . import training_glue as glue
from .comfy_io import io
from .model_folders import register_model_folder
from .patching import add_attention_processor, transformer_blocks
from .validation import (checked_clip, require_finite, require_images, require_vectors_fit,
                         resolve_embedding)

CATEGORY = "personalization/detex"
CHECKPOINT_FOLDER = "detex_checkpoints"
#: models/detex holds the exported attribute mappers
MAPPER_FOLDER = "detex"
#: Custom Diffusion's initial word for a single new token, "ktn" (spec detex.md §3.4)
SUBJECT_INIT_TOKEN = init_token_ids(1)[0]
#: the attribute mappers start from the embedding of their attribute word [R]
ATTRIBUTE_INIT_WORDS = {"pose": "pose", "background": "background"}
DEFAULT_REGULARISATION_PROMPT = "photo of a {class}"
log = logging.getLogger(__name__)
register_model_folder(MAPPER_FOLDER)


#: what the trainer appends to the output name for each file it writes
SUBJECT_SUFFIX = "_V"
ATTRIBUTE_SUFFIXES = {"pose": "_pose_{index}", "background": "_bg_{index}"}
KV_SUFFIX = "_detex_kv"
MAPPERS_SUFFIX = "_detex_mappers"


def subject_name(name: str) -> str:
    return name + SUBJECT_SUFFIX


def attribute_name(name: str, attribute: str, index: int) -> str:
    return name + ATTRIBUTE_SUFFIXES[attribute].format(index=index)


def _check_sd1(model, clip) -> None:
    transformer_blocks(model, "DecoupledTokenTrainer")  # refuses DiT families by name
    context_dim = model.model.model_config.unet_config.get("context_dim")
    encoders = sorted(k for k in ("clip_l", "clip_g", "clip_h") if hasattr(getattr(clip, "tokenizer", None), k))
    if context_dim != 768 or encoders != ["clip_l"]:
        raise ValueError(f"DecoupledTokenTrainer: DETEX trains SD1.x models (CLIP-L text, context 768); this MODEL has "
                         f"context {context_dim} and the CLIP has text encoders {encoders or 'none'}.")


def mapper_file_name(name: str) -> str:
    return name + MAPPERS_SUFFIX


def _token_embedding_table(clip) -> torch.Tensor:
    return clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight


def _word_row(clip, word: str) -> torch.Tensor:
    ids = clip.tokenizer.clip_l.tokenizer(word)["input_ids"][1:-1]
    if len(ids) != 1:
        raise ValueError(f"the initial word {word!r} is {len(ids)} CLIP tokens; it must be one")
    return _token_embedding_table(clip)[ids[0]].detach().float().cpu().clone()


@torch.no_grad()
def _clip_vision_features(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """``[M, S, S, 3]`` → frozen last-layer hidden states ``[M, tokens, width]`` (ELITE's input)."""
    return clip_vision.encode_image(images)["last_hidden_state"].detach().float().cpu().clone()


def _kv_weight_keys(model) -> list[str]:
    return [f"diffusion_model.{block.module_path}.attn2.{proj}.weight"
            for block in transformer_blocks(model) if block.has_cross_attention for proj in ("to_k", "to_v")]


class DecoupledTokenMask(io.ComfyNode):
    """Subject masks for DETEX training when no segmenter is at hand (border keying).

    The background colour is the median of a thin strip along the image border; pixels whose largest
    channel difference from it exceeds ``threshold`` are subject; an opening + closing of radius
    ``smoothing`` removes specks and gaps; enclosed holes are filled; ``dilation`` grows (or, negative,
    shrinks) the result. Works for subjects on a plain backdrop (product shots, studio photos, a pet on
    a plain floor); for cluttered scenes use a segmentation node (SAM, rembg) instead.

    Inputs (safe ranges): images: the training images; threshold 0.05–0.3 (lower catches pale subjects,
    higher ignores shadows); smoothing 0–8 px; dilation −8..8 px.
    Outputs the MASK batch plus the foreground (x·m) and background-only (x·(1−m)) images DETEX's
    pose and background mappers will see, to check the masks before training.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DecoupledTokenMask",
            display_name="DETEX Subject Mask (personalization)",
            category=CATEGORY,
            description="Subject masks by border keying (plain backgrounds), with previews of what DETEX's mappers see.",
            inputs=[
                io.Image.Input("images", tooltip="The subject's training images (a batch)."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.01, max=1.0, step=0.01,
                               tooltip="Colour difference from the border's background colour that counts as subject (0.05–0.3)."),
                io.Int.Input("smoothing", default=DEFAULT_SMOOTHING, min=0, max=32,
                             tooltip="Radius in pixels of the opening/closing that removes specks and small gaps."),
                io.Int.Input("dilation", default=0, min=-32, max=32,
                             tooltip="Grow (positive) or shrink (negative) the mask by this many pixels."),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One subject mask per image (1 = subject)."),
                io.Image.Output(display_name="foreground", tooltip="Subject on black: what the pose mapper sees."),
                io.Image.Output(display_name="background", tooltip="Subject blacked out: what the background mapper sees."),
            ],
        )

    @classmethod
    def execute(cls, images, threshold, smoothing, dilation) -> io.NodeOutput:
        require_images("DecoupledTokenMask", "images", images)
        masks = dilate(border_key_masks(images, threshold, smoothing), dilation)
        empty = [i for i in range(masks.shape[0]) if not bool(masks[i].any())]
        if empty:
            log.warning("DecoupledTokenMask: no subject found in image(s) %s; lower the threshold.", empty)
        foreground, background = split_foreground(images[..., :3], masks)
        return io.NodeOutput(masks, foreground, background)


class DecoupledTokenTrainer(io.ComfyNode):
    """DETEX (Cai et al., AAAI 2024): a subject word decoupled from each image's pose and background.

    Every training image is described by the shared subject word [V] plus its own pose word [P_i] and
    background word [B_i], produced by attribute mappers (ELITE-style MLPs over CLIP-vision features of
    the foreground image and of the background-only image). Each sample trains either the full prompt
    ("photo of a [V] dog with [P_i] pose in [B_i] background") or, with a loss masked to the subject,
    the prompt without the background clause; the U-Net's cross-attention K/V are fine-tuned as in
    Custom Diffusion (start-of-text K/V detached). Parts of the paper could not be verified and are
    reconstructed (marked [R] in the docs): they are switchable here.

    Inputs (safe ranges):
    - model / clip / vae: an SD1.x checkpoint (the paper uses SD v1.4).
    - clip_vision: CLIP ViT-L/14 image encoder (clip_vision_vit_l); needed by the mappers.
    - images: 3–10 photos of one subject; masks: one subject mask per image, same size (DecoupledTokenMask
      or any segmenter).
    - class_word: the subject's class noun ("dog"), one CLIP token ideally.
    - name: prefix of the saved files (<name>_V, <name>_pose_<i>, <name>_bg_<i>, <name>_detex_kv, and with
      the mappers models/detex/<name>_detex_mappers for DecoupledTokenAttributes).
    - steps 250 (100–1000), learning_rate 8e-5 for K/V and [V] (1e-5 × batch 2 × accumulation 4, as
      Custom Diffusion), mapper_learning_rate 1e-4 [R], batch_size 2, grad_accumulation 4, seed.
    - template: training prompt with {V} {class} and the [ ] clauses holding {P} and {B} [R].
    - attribute_source: "mappers" (paper) or "free vectors" (one learnable vector per image) [R].
    - subject_branch_probability 0.5 [R]: share of samples trained without the background clause and
      with the subject-masked loss; mask_normalization "all elements" (Break-A-Scene) or "mask area" [R].
      Every sample's ε-MSE is a per-element mean (full-branch and regularisation samples over the
      augmentation mask), not Custom Diffusion's channel sum [R].
    - augmented_views 8: augmented views per image (Custom Diffusion scale/flip), 0 = image + mirror only.
    - resolution 512; mask_dilation −16..16 px; checkpoint_every 50 steps (0 = only at the end/interrupt).
    - regularization_images / regularization_prompt: optional class images (Custom Diffusion's prior,
      weight 1, half of the samples, mirrored with p 1/2) and their caption ("photo of a {class}" when empty).
    - attention_regularizer (off): Break-A-Scene's attention loss (λ 0.01, map layers = 16×16 at 512 px):
      the max-normalised map of [V] pulled towards the subject mask, that of [B_i] towards the background.
      [R], not confirmed for DETEX; costs explicit attention probabilities in the map layers.
    Run again: more steps continue the run from its checkpoint (output/detex_checkpoints/<name>/), the same
    settings find it finished; any other change starts a new run and keeps the earlier run's files under the
    next numbered name (<name>_00001_V, ...).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        settings = DetexSettings()
        return io.Schema(
            node_id="DecoupledTokenTrainer",
            display_name="DETEX Subject Trainer (personalization)",
            category=CATEGORY,
            description="DETEX: trains a subject word decoupled from per-image pose and background words, plus K/V.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x model to fine-tune (the input model is left unchanged)."),
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP text encoder."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the training images."),
                io.Image.Input("images", tooltip=f"{MIN_IMAGES}–{MAX_IMAGES} photos of one subject, as one batch."),
                io.Mask.Input("masks", tooltip="One subject mask per image, same size as the images (1 = subject)."),
                io.String.Input("class_word", default="dog", tooltip="The subject's class noun, e.g. 'dog'."),
                io.String.Input("name", default="detex_subject", tooltip="Prefix of the saved embedding and LoRA files."),
                io.Int.Input("steps", default=settings.steps, min=1, max=20000, tooltip="Optimizer steps (paper regime: 250)."),
                io.Float.Input("learning_rate", default=settings.learning_rate, min=0.0, max=1e-2, step=1e-6,
                               tooltip="Learning rate of K/V and the subject word (Custom Diffusion: 8e-5)."),
                io.Float.Input("mapper_learning_rate", default=settings.mapper_learning_rate, min=0.0, max=1e-2, step=1e-6,
                               tooltip="Learning rate of the attribute mappers or free vectors [R]."),
                io.Int.Input("batch_size", default=settings.micro_batch, min=1, max=16, tooltip="Samples per micro-batch."),
                io.Int.Input("grad_accumulation", default=settings.grad_accumulation, min=1, max=64,
                             tooltip="Micro-batches per optimizer step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of noise, timesteps, branches and augmentation."),
                io.String.Input("template", default=DEFAULT_TEMPLATE,
                                tooltip="Training prompt: {V} subject, {class} class word, [ ] clauses with {P} pose and {B} background."),
                io.Combo.Input("attribute_source", options=list(ATTRIBUTE_SOURCES), default=MAPPERS,
                               tooltip="Pose/background words from CLIP-vision mappers (paper) or free per-image vectors."),
                io.Float.Input("subject_branch_probability", default=settings.subject_branch_probability, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of samples without the background clause, with the loss masked to the subject [R]."),
                io.Combo.Input("mask_normalization", options=list(MASK_NORMALIZATIONS), default=settings.mask_normalization,
                               tooltip="Masked loss averaged over all latent elements (Break-A-Scene) or over the mask only."),
                io.Int.Input("augmented_views", default=8, min=0, max=64,
                             tooltip="Augmented views per image (Custom Diffusion scale/flip); 0 = image and mirror only."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Training resolution (square crop)."),
                io.Int.Input("mask_dilation", default=0, min=-64, max=64, tooltip="Grow (+) or shrink (−) the masks by pixels."),
                io.Int.Input("checkpoint_every", default=50, min=0, max=10000,
                             tooltip=glue.CHECKPOINT_EVERY_TOOLTIP),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP ViT-L/14 vision encoder for the attribute mappers (not needed for free vectors)."),
                io.Image.Input("regularization_images", optional=True,
                               tooltip="Optional class images (e.g. generated from the regularization prompt) for the prior loss."),
                io.String.Input("regularization_prompt", default="", optional=True,
                                tooltip="Caption of the regularization images; empty = 'photo of a {class}'."),
                io.Boolean.Input("attention_regularizer", default=False, optional=True,
                                 tooltip="[R], not confirmed for DETEX: Break-A-Scene's attention loss (λ 0.01) pulling "
                                         "[V]'s attention map to the subject mask and [B_i]'s to the background."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained K/V change (as the saved LoRA)."),
                io.Clip.Output(display_name="clip", tooltip="CLIP that knows embedding:<name>_V, _pose_<i>, _bg_<i> (as the saved files)."),
                io.String.Output(display_name="name", tooltip="The saved files' prefix, for DecoupledTokenPrompt."),
                io.Custom("LOSS_MAP").Output(display_name="loss_map", tooltip="Loss per step, for the stock Loss Graph node."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, images, masks, class_word, name, steps, learning_rate, mapper_learning_rate,
                batch_size, grad_accumulation, seed, template, attribute_source, subject_branch_probability,
                mask_normalization, augmented_views, resolution, mask_dilation, checkpoint_every,
                clip_vision=None, regularization_images=None, regularization_prompt="",
                attention_regularizer=False) -> io.NodeOutput:
        _check_sd1(model, clip)
        require_finite("DecoupledTokenTrainer", "images", images)
        if regularization_images is not None:
            require_images("DecoupledTokenTrainer", "regularization images", regularization_images)
        name = checked_name(name)
        class_word = class_word.strip()
        if not class_word or "embedding:" in class_word or any(c in class_word for c in "{}[]"):
            raise ValueError("DecoupledTokenTrainer: class_word must be a plain noun such as 'dog'.")
        parsed = PromptTemplate.parse(template)
        if (regularization_prompt or "").strip() and regularization_images is None:
            raise ValueError("DecoupledTokenTrainer: a regularization_prompt is set but no regularization_images are "
                             "connected; generate class images from it (e.g. DisenDiffRegularization) and connect them, "
                             "or clear the prompt.")
        if attribute_source == MAPPERS and clip_vision is None:
            raise ValueError("DecoupledTokenTrainer: the attribute mappers need a CLIP vision encoder; connect a "
                             "CLIPVisionLoader (ViT-L/14) to clip_vision, or choose attribute_source 'free vectors'.")
        settings = DetexSettings(steps=steps, learning_rate=learning_rate, mapper_learning_rate=mapper_learning_rate,
                                 micro_batch=batch_size, grad_accumulation=grad_accumulation,
                                 subject_branch_probability=subject_branch_probability,
                                 mask_normalization=mask_normalization,
                                 attention_loss_weight=ATTENTION_LOSS_WEIGHT if attention_regularizer else 0.0)
        with glue.training_mode():
            subject = prepare_subject(images.clone(), masks.clone(), resolution, mask_dilation)
            reg_caption = (regularization_prompt or "").strip() or DEFAULT_REGULARISATION_PROMPT
            trained = DetexTraining(model, clip, vae, clip_vision, subject, parsed, class_word, attribute_source,
                                    settings, seed, augmented_views, regularization_images, reg_caption)
            run_id = fingerprint(method="detex", images=subject.images, masks=subject.masks, class_word=class_word,
                                 template=template, attribute_source=attribute_source, settings=without_steps(settings),
                                 seed=seed, augmented_views=augmented_views, model=type(model.model).__name__,
                                 weights=glue.weights_sample(trained.trainable.model.diffusion_model),
                                 text_encoder=glue.weights_sample(trained.encoder.model),
                                 vae=glue.weights_sample(vae.first_stage_model),
                                 image_encoder=None if clip_vision is None else glue.weights_sample(clip_vision.model),
                                 regularization_images=regularization_images, regularization_caption=reg_caption)
            loop_settings = LoopSettings(steps=steps, grad_accumulation=grad_accumulation, seed=seed,
                                         checkpoint_every=checkpoint_every,
                                         checkpoints=glue.run_checkpoints(CHECKPOINT_FOLDER, name, run_id))
            result = train(trained.parameters(), trained.step, optimizer_factory(settings, trained.mapper_parameters()),
                           loop_settings, glue.progress_reporter("DecoupledTokenTrainer", steps), glue.check_interrupted)
            vectors = trained.export(name, class_word, template, steps, resolution, run_id)
        patched_clip = glue.clip_with_embeddings(clip, {n: {"clip_l": v} for n, v in vectors.items()})
        patched_model = glue.with_weight_deltas(model, trained.kv_deltas())
        return io.NodeOutput(patched_model, patched_clip, name, {"loss": list(result.losses)})


class DetexTraining:
    """What one DecoupledTokenTrainer run builds: the augmented pool, the mappers' CLIP-vision features,
    the trainables ([V], K/V deltas, mappers), the micro-batch step and the exports. Build it inside
    ``training_glue.training_mode()``. ``gradient_checkpointing`` None: where the model's size or the resolution
    needs it (glue.checkpoints_blocks)."""

    def __init__(self, model, clip, vae, clip_vision, subject, template, class_word, attribute_source, settings,
                 seed, augmented_views, regularization_images, reg_caption, gradient_checkpointing=None):
        self.subject = subject
        process_latent_in = model.model.process_latent_in
        device = model.load_device

        def encode_pixels(pixels):  # the VAE is frozen: its latents carry no graph into the steps
            return process_latent_in(glue.encode_images(vae, pixels)).to(device)

        self.pool = build_pool(subject, augmented_views, torch.Generator().manual_seed(seed), encode_pixels)
        features = None
        if attribute_source == MAPPERS:
            inputs = attribute_inputs(subject)
            features = {a: _clip_vision_features(clip_vision, inputs[a].flatten(0, 1)).unflatten(0, (subject.count, 2))
                        for a in ATTRIBUTES}
        self.attributes = AttributeEmbeddings(attribute_source, subject.count,
                                              {a: _word_row(clip, w) for a, w in ATTRIBUTE_INIT_WORDS.items()}, features,
                                              seed=seed)
        initial_subject = _token_embedding_table(clip)[SUBJECT_INIT_TOKEN].detach().float().cpu().clone()
        self.subject_word = torch.nn.Parameter(initial_subject[None])
        self.deltas = {key: glue.WeightDelta(model.get_model_object(key[:-len(".weight")]).weight.shape)
                       for key in _kv_weight_keys(model)}
        self.trainable = unet = glue.trainable_unet(model, self.deltas, glue.checkpoints_blocks(
            model, subject.images.shape[1], gradient_checkpointing))
        blocks = transformer_blocks(unet)
        add_attention_processor(unet, StartTokenDetach("DecoupledTokenTrainer"), blocks)
        recorder = None
        if settings.attention_loss_weight:
            recorder = MapRecorder(map_block_keys(blocks), node_name="DecoupledTokenTrainer")
            add_attention_processor(unet, recorder, [b for b in blocks if b.key in recorder.blocks])
        self.encoder = encoder = glue.TrainableTextEncoder(clip)
        prompts: dict[str, glue.PlaceholderPrompt] = {}

        def encode_text(text, vectors):
            if text not in prompts:
                prompts[text] = glue.PlaceholderPrompt(clip, text, {n: 1 for n in vectors})
                if len(prompts[text].tokens["l"]) > 1:
                    raise ValueError(f"DecoupledTokenTrainer: the training prompt {text!r} is longer than CLIP's 75 "
                                     "tokens; shorten the template.")
            prompt = prompts[text]
            context = encoder.encode(prompt.substitute({n: {"clip_l": v} for n, v in vectors.items()}))[0]
            return context, {n: prompt.positions("l", n) for n in vectors}

        regularisation = []
        if regularization_images is not None:
            size = subject.images.shape[1]
            reg_pixels = center_square(regularization_images[..., :3].clone().float(), size, "bicubic").clamp(0, 1)
            reg_text = reg_caption.replace(CLASS, class_word)
            with torch.no_grad():  # truncated to one CLIP window, as Custom Diffusion's tokenizer does
                context = encoder.encode(clip.tokenize(reg_text))[0][:, :77].detach()
            regularisation = [RegularisationView(latent, mirrored, context)
                              for latent, mirrored in zip(*encode_both_ways(encode_pixels, reg_pixels))]

        self.step = DetexStep(self.pool, regularisation, self.subject_word, self.attributes, template, class_word,
                              encode_text, lambda x, s, c: glue.denoise(unet, x, s, c),
                              glue.discrete_sigmas(model), glue.prediction_kind(model), settings, recorder)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {"subject": self.subject_word, **{f"kv.{k}": d.diff for k, d in self.deltas.items()},
                **attribute_parameters(self.attributes)}

    def mapper_parameters(self) -> list[torch.Tensor]:
        return list(self.attributes.parameters())

    def kv_deltas(self) -> dict[str, torch.Tensor]:
        return {k: d.diff.detach() for k, d in self.deltas.items()}

    def export(self, name: str, class_word: str, template: str, steps: int, resolution: int,
               run_id: str) -> dict[str, torch.Tensor]:
        """Write the stock files (and the mappers); return ``{embedding name: [1, 768]}`` of every saved word.
        An earlier run's files of the same name are kept under a numbered name (``training.runs``)."""
        vectors = {subject_name(name): self.subject_word.detach().float().cpu()}
        for attribute in ATTRIBUTES:
            for index, row in enumerate(self.attributes.per_image(attribute)):
                vectors[attribute_name(name, attribute, index)] = row[None]
        meta = {"method": "detex", "class_word": class_word, "template": template, "steps": str(steps),
                "images": str(self.subject.count), RUN_ID_KEY: run_id}
        embeddings = folder_paths.get_folder_paths("embeddings")[0]
        loras = folder_paths.get_folder_paths("loras")[0]
        mappers = folder_paths.get_folder_paths(MAPPER_FOLDER)[0]
        glue.exports_of_run("DecoupledTokenTrainer", name, [
            ExportedFile(embeddings, SUBJECT_SUFFIX), *(ExportedFile(embeddings, s) for s in ATTRIBUTE_SUFFIXES.values()),
            ExportedFile(loras, KV_SUFFIX), ExportedFile(mappers, MAPPERS_SUFFIX)], run_id)
        for word, vector in vectors.items():
            save_embedding(output_path(embeddings, word), vector, metadata={**meta, "token": word})
        save_lora(output_path(loras, name + KV_SUFFIX), self.kv_deltas(), metadata={**meta, "tokens": subject_name(name)})
        if self.attributes.source == MAPPERS:
            save_mappers(output_path(mappers, mapper_file_name(name)), self.attributes, resolution, meta)
        folder_paths.filename_list_cache.clear()  # so stock loaders list the new files at once
        return vectors


class DecoupledTokenPrompt(io.ComfyNode):
    """DETEX inference: conditioning with the subject word alone, or with a training image's attributes.

    DETEX needs no attention patch at inference: the prompt decides. With only [V] the subject appears
    in new scenes; adding a training image's [P_i] (with the word "pose") keeps its pose, adding its
    [B_i] (with "background") keeps its background (paper: "using the tokens selectively").

    Inputs: clip (the trainer's CLIP output, or any CLIP when the embedding files are installed);
    name: the trainer's file prefix; prompt: text with {V} where the subject goes and optional clauses
    [ with {P} pose] / [ in {B} background] kept only when asked; image_index: 0-based index of the
    training image whose attributes are used; keep_pose / keep_background; attributes_name (optional):
    prefix of the pose/background words when they come from DecoupledTokenAttributes (a new reference
    image) instead of the training images (empty = name).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DecoupledTokenPrompt",
            display_name="DETEX Subject Prompt (personalization)",
            category=CATEGORY,
            description="DETEX prompt: the subject word, optionally with a training image's pose and/or background word.",
            inputs=[
                io.Clip.Input("clip", tooltip="The trainer's CLIP, or a CLIP with the DETEX embedding files installed."),
                io.String.Input("name", default="detex_subject", tooltip="The trainer's file prefix (its name output)."),
                io.String.Input("prompt", multiline=True, default="photo of a {V} dog[ with {P} pose][ in {B} background] on the beach",
                                tooltip="Text with {V}; [ ] clauses with {P} / {B} are kept only when asked."),
                io.Int.Input("image_index", default=0, min=0, max=MAX_IMAGES - 1, tooltip="Training image (0-based) whose pose/background words are used."),
                io.Boolean.Input("keep_pose", default=False, tooltip="Keep the image's pose word [P_i] (its clause)."),
                io.Boolean.Input("keep_background", default=False, tooltip="Keep the image's background word [B_i] (its clause)."),
                io.String.Input("attributes_name", default="", optional=True,
                                tooltip="Prefix of the pose/background words from DecoupledTokenAttributes (a new image); empty = name."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="The encoded prompt."),
                io.String.Output(display_name="text", tooltip="The prompt as encoded, with embedding: names."),
            ],
        )

    @classmethod
    def execute(cls, clip, name, prompt, image_index, keep_pose, keep_background, attributes_name="") -> io.NodeOutput:
        if clip is None:
            raise ValueError("DecoupledTokenPrompt: the clip input is empty; connect the trainer's CLIP or the checkpoint's.")
        clip = checked_clip("DecoupledTokenPrompt", clip)
        name = checked_name(name)
        source = checked_name(attributes_name) if (attributes_name or "").strip() else name
        template = PromptTemplate.parse(prompt, require_attributes=False)
        if CLASS in prompt:
            raise ValueError("DecoupledTokenPrompt: write the class word itself in the prompt instead of {class}.")
        words = {"{V}": subject_name(name)}
        if keep_pose:
            words["{P}"] = attribute_name(source, "pose", image_index)
        if keep_background:
            words["{B}"] = attribute_name(source, "background", image_index)
        for placeholder, word in words.items():
            resolve_embedding("DecoupledTokenPrompt", clip, word, missing_hint=(
                f" ({placeholder}); connect the trainer's CLIP, or check that the trainer saved it (name, image_index < "
                "number of training images)"))
        text = template.render(f"embedding:{words['{V}']}", "",
                               pose=f"embedding:{words['{P}']}" if keep_pose else None,
                               background=f"embedding:{words['{B}']}" if keep_background else None)
        conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return io.NodeOutput(conditioning, text)


class DecoupledTokenAttributes(io.ComfyNode):
    """DETEX extension (spec detex.md §4; the paper only reuses the training images' words): pose and
    background words of a NEW reference image, from the attribute mappers DecoupledTokenTrainer exported.

    The image (and its subject mask) goes through the trainer's own preparation: centre crop to a square
    at the training resolution, foreground x·m and background-only x·(1−m) images on black, CLIP-vision
    last hidden states, then the pose and background mappers. Without a mask, the subject is found by
    DecoupledTokenMask's border keying with its defaults (plain backdrops only; connect DecoupledTokenMask
    or a segmenter for control).

    Inputs: clip (the trainer's CLIP, or any SD1.x CLIP); mappers: models/detex/<name>_detex_mappers
    (saved when the trainer used attribute_source "mappers"); clip_vision: the SAME CLIP vision model the
    trainer used (ViT-L/14); image: one or more reference images (one word pair each); name: prefix of
    the saved words; mask (optional): subject masks of the image's size.
    Writes models/embeddings/<name>_pose_<i> and <name>_bg_<i> ({"clip_l": [1, 768]}, usable as
    ``embedding:`` names in any prompt) and returns a CLIP that knows them; give its name output to
    DecoupledTokenPrompt's attributes_name to keep the new image's pose and/or background.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DecoupledTokenAttributes",
            display_name="DETEX Attributes (personalization)",
            category=CATEGORY,
            description="Pose and background words of a new reference image, from DETEX's exported attribute mappers.",
            inputs=[
                io.Clip.Input("clip", tooltip="The trainer's CLIP (or any SD1.x CLIP); the returned CLIP also knows the new words."),
                io.Combo.Input("mappers", options=folder_paths.get_filename_list(MAPPER_FOLDER),
                               tooltip="models/detex/<name>_detex_mappers.safetensors, saved by DecoupledTokenTrainer with mappers."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the trainer used (ViT-L/14)."),
                io.Image.Input("image", tooltip="Reference image(s) whose pose and background to capture; one word pair per image."),
                io.String.Input("name", default="detex_reference",
                                tooltip="Prefix of the saved words: <name>_pose_<i>, <name>_bg_<i>."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Subject mask per image (1 = subject); empty = border keying, for plain backdrops."),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="CLIP that knows embedding:<name>_pose_<i> and _bg_<i> (as the saved files)."),
                io.String.Output(display_name="name", tooltip="The words' prefix, for DecoupledTokenPrompt's attributes_name."),
            ],
        )

    @classmethod
    def execute(cls, clip, mappers, clip_vision, image, name, mask=None) -> io.NodeOutput:
        name = checked_name(name)
        loaded, metadata = load_mappers(folder_paths.get_full_path_or_raise(MAPPER_FOLDER, mappers))
        require_vectors_fit("DecoupledTokenAttributes", clip,
                            {"clip_l": loaded["pose"].cls_branch[-1].bias}, "the mappers' words")
        masks = border_key_masks(image) if mask is None else mask
        subject = prepare_subject(image.clone(), masks.clone(), int(metadata["resolution"]),
                                  min_images=1, max_images=image.shape[0])
        foreground, background = split_foreground(subject.images, subject.masks)
        words = map_attributes(loaded, {"pose": _clip_vision_features(clip_vision, foreground),
                                        "background": _clip_vision_features(clip_vision, background)})
        vectors = {attribute_name(name, attribute, index): row[None]
                   for attribute in ATTRIBUTES for index, row in enumerate(words[attribute])}
        embeddings = folder_paths.get_folder_paths("embeddings")[0]
        for word, vector in vectors.items():
            save_embedding(output_path(embeddings, word), vector,
                           metadata={"method": "detex", "token": word, "mappers": mappers})
        folder_paths.filename_list_cache.clear()
        return io.NodeOutput(glue.clip_with_embeddings(clip, {n: {"clip_l": v} for n, v in vectors.items()}), name)


DETEX_NODES = [DecoupledTokenMask, DecoupledTokenTrainer, DecoupledTokenPrompt, DecoupledTokenAttributes]
