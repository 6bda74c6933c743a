"""DisenDiff nodes (Zhang et al., "Attention Calibration for Disentangled Text-to-Image
Personalization", CVPR 2024).

- DisenDiffTrainer: learns one modifier token per class word plus the cross-attention K/V of every
  layer from ONE image holding several concepts; exports stock-loadable files.
- DisenDiffRegularization: class images from the frozen model, replacing the paper's dead LAION
  retrieval (Custom Diffusion's "generated regularisation").
- CalibratedCrossAttn: optional sampling-time calibration of the concepts' attention maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.utils
import torch.nn.functional as F
import folder_paths
import torch

from ..attention.blocks import UNET, Family
from ..attention.custom_diffusion import StartTokenDetach
from ..attention.disendiff import CONTEXT_TOKENS_KEY, CalibratedCrossAttention, Concept, min_max
from ..attention.dispatcher import CHAIN_KEY
from ..attention.layout import cond_row_indices
from ..attention.prompt_context import prompt_repeats
from ..attention.token_maps import MapRecorder, map_block_keys
from ..training import disendiff as recipe
from ..training.augmentation import center_square, encode_both_ways
from ..training.exporters import low_rank_deltas, save_embedding, save_lora
from ..training.loop import LoopSettings, fingerprint, train
from ..training.naming import output_path, checked_name
from ..training.runs import RUN_ID_KEY, ExportedFile, without_steps
from . import training_glue as glue
from .comfy_io import io
from .patching import WRAPPER_KEY, add_attention_processor, sigma_range, transformer_blocks
from .validation import checked_clip, require_images, resolve_embedding

CATEGORY = "personalization/disendiff"
LORA_SUFFIX = "_disendiff_kv"
CHECKPOINT_FOLDER = "disendiff_checkpoints"
CALIBRATION_WRAPPER_KEY = WRAPPER_KEY + ".disendiff_calibration"


def _class_words(text: str) -> list[str]:
    words = [w.strip() for w in text.replace("\n", ",").split(",") if w.strip()]
    if len(words) < 2:
        raise ValueError(f"DisenDiffTrainer needs 2 or more class words separated by commas, got {text!r}")
    return words


#: text encoders the new tokens are learned in, by the MODEL's cross-attention width
TEXT_ENCODERS = {768: ("clip_l",), 2048: ("clip_l", "clip_g")}


def _text_encoders(model, clip) -> tuple[str, ...]:
    """``("clip_l",)`` for SD1.x (the paper), ``("clip_l", "clip_g")`` for SDXL; a clear error otherwise."""
    transformer_blocks(model, "DisenDiffTrainer")  # refuses DiT families by name
    tokenizers = sorted(k for k, _ in glue.sub_tokenizers(clip.tokenizer))
    context_dim = model.model.model_config.unet_config.get("context_dim")
    encoders = TEXT_ENCODERS.get(context_dim)
    if encoders is None or tokenizers != sorted(encoders):
        raise ValueError("DisenDiffTrainer trains SD1.x models with their CLIP-L (as the paper) and SDXL models with "
                         f"CLIP-L + CLIP-G; this MODEL/CLIP pair has context_dim {context_dim} and text encoders "
                         f"{tokenizers}")
    return encoders


def _word_token_count(clip, word: str) -> int:
    sub = clip.tokenizer.clip_l
    count = len(sub.tokenizer(word)["input_ids"]) - 2  # without start/end
    if count < 1:
        raise ValueError(f"class word {word!r} has no tokens")
    return count


def concept_positions(prompt: glue.PlaceholderPrompt, names, clip, words) -> tuple[Concept, ...]:
    """Each concept's modifier rows and the class-word tokens right after them in the training prompt."""
    concepts = []
    for name, word in zip(names, words):
        modifier = tuple(prompt.positions("l", name))
        start = modifier[-1] + 1
        concepts.append(Concept(modifier, tuple(range(start, start + _word_token_count(clip, word)))))
    return tuple(concepts)


def _encode_pixels(vae, model, pixels: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(glue.encode_images(vae, pixels))  # frozen VAE: no graph to keep


class DisenDiffTrainer(io.ComfyNode):
    """DisenDiff trainer (Zhang et al., CVPR 2024): personalises several concepts from one image.

    Trains one new token ``<name>_newI`` per class word (placed before it, "photo of a <new1> man and
    <new2> woman") and the cross-attention K/V weights of every layer with the ε-MSE plus 0.01 ×
    the calibration loss (binding each modifier's attention map to its class word, separating the
    class maps). Inputs: image (one picture of all concepts, centre-cropped), class_words (2+ words,
    commas; multi-token words are supported, their maps are averaged), steps (paper 250), lr (paper
    8e-5), batch_size 2 × grad_accumulation 4 (paper), resolution (512 for SD1.5, 1024 for SDXL),
    optional regularisation images + captions (paper: 200 images, half of every batch), lora_rank (0:
    the exact K/V change; 1–128: a truncated-SVD LoRA, Custom Diffusion's compression, smaller and
    approximate). Writes ``models/embeddings/<name>_newI.safetensors`` (use ``embedding:<name>_newI``;
    SDXL files hold both ``clip_l`` and ``clip_g``), ``models/loras/<name>_disendiff_kv.safetensors``
    (LoraLoaderModelOnly, strength 1) and a resumable checkpoint under ``output/disendiff_checkpoints/<name>``.
    Run again: more steps continue the run, the same settings find it finished, any other change starts a new
    run and keeps the earlier run's files as ``<name>_00001_new1`` and so on. SD1.x as the paper; SDXL learns each token in both text
    encoders (CLIP-G starts from the same word) and feeds the pooled CLIP-G output to the U-Net.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DisenDiffTrainer",
            display_name="DisenDiff Concept Trainer (personalization)",
            category=CATEGORY,
            description="DisenDiff: learn several concepts from one image (modifier tokens + cross-attention K/V).",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x or SDXL model to personalise; it is left unchanged."),
                io.Clip.Input("clip", tooltip="The model's CLIP; the new tokens are learned in its embedding space."),
                io.Vae.Input("vae", tooltip="VAE that encodes the training image."),
                io.Image.Input("image", tooltip="One image showing all concepts (first image of the batch is used)."),
                io.String.Input("class_words", default="man, woman",
                                tooltip="Two or more class words present in the image, comma separated, in prompt order."),
                io.String.Input("name", default="disendiff_pair",
                                tooltip="Output name: files <name>_new1.., <name>_disendiff_kv; letters, digits (any script), - _ . only"),
                io.Int.Input("steps", default=250, min=1, max=10000, tooltip="Optimizer steps (paper: 250)."),
                io.Float.Input("learning_rate", default=8e-5, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate, weight decay 0.01 (paper: 8e-5)."),
                io.Int.Input("batch_size", default=2, min=1, max=16, tooltip="Micro-batch size (paper: 2)."),
                io.Int.Input("grad_accumulation", default=4, min=1, max=64, tooltip="Micro-batches per step (paper: 4)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Training resolution of the square crop (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("seed", default=1, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of noise, timesteps and augmentation (paper: 1)."),
                io.Int.Input("checkpoint_every", default=50, min=0, max=10000,
                             tooltip=glue.CHECKPOINT_EVERY_TOOLTIP),
                io.Boolean.Input("augment", default=True, tooltip="Paper's scale augmentation with 'far away'/'close up' captions."),
                io.Image.Input("reg_images", optional=True, tooltip="Regularisation images of the classes (paper: 200)."),
                io.String.Input("reg_captions", optional=True, multiline=True, default="",
                                tooltip="One caption per line for reg_images (a single line is used for all)."),
                io.Int.Input("lora_rank", default=0, min=0, max=128, optional=True,
                             tooltip="0: exact K/V change in the LoRA file; 1–128: truncated-SVD LoRA of that rank (smaller, approximate)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained K/V (same as loading the LoRA file)."),
                io.Clip.Output(display_name="CLIP", tooltip="CLIP that knows embedding:<name>_newI without reading the files."),
                io.String.Output(display_name="prompt", tooltip="The training prompt with all concepts, e.g. for sampling."),
                io.String.Output(display_name="lora_name", tooltip="File name of the exported K/V LoRA in models/loras."),
            ],
            is_output_node=True,  # it writes files: it runs even when nothing uses its outputs
        )

    @classmethod
    def execute(cls, model, clip, vae, image, class_words, name, steps, learning_rate, batch_size,
                grad_accumulation, resolution, seed, checkpoint_every, augment, reg_images=None,
                reg_captions="", lora_rank=0) -> io.NodeOutput:
        words = _class_words(class_words)
        _text_encoders(model, clip)
        require_images("DisenDiffTrainer", "image", image)
        if reg_images is not None:
            require_images("DisenDiffTrainer", "regularisation images", reg_images)
        stem = checked_name(name)
        settings = recipe.DisenDiffSettings(steps, learning_rate, batch_size, grad_accumulation, augment=augment)
        with glue.training_mode():
            run = prepare_training(model, clip, vae, image, words, stem, settings, seed, resolution,
                                   reg_images, reg_captions)
            train(run.params, run.step, lambda tensors: torch.optim.AdamW(tensors, lr=learning_rate, weight_decay=0.01),
                  LoopSettings(steps, grad_accumulation, seed, checkpoint_every,
                               glue.run_checkpoints(CHECKPOINT_FOLDER, stem, run.fingerprint)),
                  on_progress=glue.progress_reporter("DisenDiffTrainer", steps), check_interrupted=glue.check_interrupted)
        names, vectors, deltas = run.names, run.vectors, run.deltas

        trained_vectors = {n: {enc: v.detach().cpu() for enc, v in per_encoder.items()}
                           for n, per_encoder in vectors.items()}
        diffs = {k: d.diff.detach().cpu() for k, d in deltas.items()}
        metadata = {"method": "disendiff", "class_words": ",".join(words), "tokens": ",".join(names),
                    "steps": str(steps), "learning_rate": str(learning_rate), RUN_ID_KEY: run.fingerprint}
        embeddings, loras = folder_paths.get_folder_paths("embeddings")[0], folder_paths.get_folder_paths("loras")[0]
        glue.exports_of_run("DisenDiffTrainer", stem, [ExportedFile(embeddings, "_new{index}"),
                                                      ExportedFile(loras, LORA_SUFFIX)], run.fingerprint)
        for n in names:
            save_embedding(output_path(embeddings, n),
                           trained_vectors[n]["clip_l"], trained_vectors[n].get("clip_g"), metadata=metadata)
        lora_file = output_path(loras, stem + LORA_SUFFIX)
        save_lora(lora_file, diffs, rank=lora_rank, metadata=metadata)
        if lora_rank:  # the MODEL output must match what the file gives stock loaders
            diffs = low_rank_deltas(diffs, lora_rank)
        folder_paths.filename_list_cache.clear()
        prompt = recipe.training_caption(names, words)
        return io.NodeOutput(glue.with_weight_deltas(model, diffs), glue.clip_with_embeddings(clip, trained_vectors),
                             prompt, lora_file.name)

@dataclass
class PreparedRun:
    """Everything one DisenDiff training run needs, built inside ``training_mode()``."""

    names: list[str]
    vectors: dict[str, dict[str, torch.Tensor]]  # token name → text encoder → trainable [1, width] vector
    deltas: dict[str, glue.WeightDelta]    # "diffusion_model.<path>.attn2.to_k.weight" → change
    trainable: object                       # the ModelPatcher clone the step runs
    step: recipe.DisenDiffStep
    params: dict[str, torch.Tensor]
    fingerprint: str


def prepare_training(model, clip, vae, image, words, stem, settings, seed, resolution, reg_images=None,
                     reg_captions="", gradient_checkpointing=None) -> PreparedRun:
    """Data, token vectors, K/V changes and the patched clone of a run (spec §10); call in training_mode().
    ``gradient_checkpointing`` None: where the model's size or the resolution needs it (glue.checkpoints_blocks)."""
    names = [f"{stem}_new{i + 1}" for i in range(len(words))]
    encoders = _text_encoders(model, clip)
    blocks = transformer_blocks(model)
    cross = [b for b in blocks if b.has_cross_attention]
    target = center_square(image[:1].clone(), resolution, "bilinear")[0].clamp(0, 1)
    prompts = {p: glue.PlaceholderPrompt(clip, recipe.training_caption(names, words, p), {n: 1 for n in names})
               for p in recipe.PREFIXES}
    concepts = {p: concept_positions(prompt, names, clip, words) for p, prompt in prompts.items()}
    device = comfy.model_management.get_torch_device()
    targets = recipe.TargetViews(target, lambda pixels: _encode_pixels(vae, model, pixels).to(device), settings.augment)
    context_length = len(prompts[""].tokens["l"]) * 77
    regs = _regularisation(model, clip, vae, reg_images, reg_captions, resolution, context_length,
                           with_pooled=len(encoders) > 1)
    encoder = glue.TrainableTextEncoder(clip)
    # CLIP-G shares CLIP-L's vocabulary, so both start from the same word
    tables = {enc: getattr(encoder.model, enc).transformer.get_input_embeddings().weight for enc in encoders}
    vectors = {n: {enc: table[i].detach().float().cpu()[None].clone().requires_grad_(True)
                   for enc, table in tables.items()}
               for n, i in zip(names, recipe.init_token_ids(len(names)))}
    deltas = {}
    for block in cross:
        for projection in ("k", "v"):
            path = f"diffusion_model.{block.module_path}.attn2.to_{projection}"
            deltas[f"{path}.weight"] = glue.WeightDelta(model.get_model_object(path).weight.shape)
    trainable = glue.trainable_unet(model, deltas, glue.checkpoints_blocks(model, resolution, gradient_checkpointing))
    recorder = MapRecorder(map_block_keys(blocks), node_name="DisenDiffTrainer")
    add_attention_processor(trainable, StartTokenDetach("DisenDiffTrainer"), cross)
    add_attention_processor(trainable, recorder, [b for b in cross if b.key in recorder.blocks])

    def encode_target(prefix):
        context, pooled = encoder.encode(prompts[prefix].substitute(vectors))
        return context.to(device), pooled.to(device) if len(encoders) > 1 else None, concepts[prefix]

    def denoise(x_t, sigma, context, pooled):
        return glue.denoise(trainable, x_t, sigma, context,
                            **glue.conditioning_extras(model, UNET, pooled, resolution, x_t, context))

    step = recipe.DisenDiffStep(
        targets=targets,
        regs=[recipe.RegularisationSample(r.latent.to(device), r.mirrored.to(device), r.context.to(device),
                                          None if r.pooled is None else r.pooled.to(device)) for r in regs],
        encode_target=encode_target,
        denoise=denoise,
        recorder=recorder, sigmas=glue.discrete_sigmas(model), kind=glue.prediction_kind(model), settings=settings)
    params = {f"token.{n}.{enc}": v for n, per_encoder in vectors.items() for enc, v in per_encoder.items()}
    params.update({f"delta.{k}": d.diff for k, d in deltas.items()})
    reg_latents = torch.stack([r.latent for r in regs]) if regs else torch.zeros(0)
    run = fingerprint(method="disendiff", image=target, words=words, settings=without_steps(settings), seed=seed,
                      resolution=resolution, regs=reg_latents,
                      vectors=torch.cat([torch.cat(list(per_encoder.values()), 1) for per_encoder in vectors.values()]),
                      model=type(model.model).__name__, weights=glue.weights_sample(trainable.model.diffusion_model),
                      text_encoder=glue.weights_sample(encoder.model), vae=glue.weights_sample(vae.first_stage_model))
    return PreparedRun(names, vectors, deltas, trainable, step, params, run)


def _regularisation(model, clip, vae, images, captions, resolution, context_length, with_pooled: bool) -> list:
    """Regularisation images encoded as they are and mirrored, with their frozen caption encodings (cut to
    the target's length) and, ``with_pooled`` (SDXL), the captions' pooled outputs."""
    if images is None:
        return []
    lines = [c.strip() for c in (captions or "").splitlines() if c.strip()]
    if len(lines) not in (1, images.shape[0]):
        raise ValueError(f"reg_captions needs one line per regularisation image ({images.shape[0]}) or a "
                         f"single line for all, got {len(lines)}")
    squares = center_square(images.clone(), resolution, "bilinear").clamp(0, 1)
    latents, mirrored = encode_both_ways(lambda pixels: _encode_pixels(vae, model, pixels), squares)
    encoded = {}  # one text-encoder pass per distinct caption
    with torch.no_grad():
        for caption in dict.fromkeys(lines):
            context, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            encoded[caption] = (context[:, :context_length].clone(), pooled.clone() if with_pooled else None)
    return [recipe.RegularisationSample(latents[i], mirrored[i], *encoded[lines[i] if len(lines) > 1 else lines[0]])
            for i in range(images.shape[0])]


class DisenDiffRegularization(io.ComfyNode):
    """Regularisation images for DisenDiffTrainer generated by the frozen model (the paper retrieved
    200 LAION images, a service that no longer exists; Custom Diffusion's authors recommend generated
    ones). Inputs: model/clip/vae, class prompt (e.g. "a man and a woman"), count (paper 200; 20–50
    is a practical minimum), steps/cfg of the sampler, size, seed. Outputs the images and the caption
    to pass as reg_captions."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DisenDiffRegularization",
            display_name="DisenDiff Class Images (personalization)",
            category=CATEGORY,
            description="Generate class images with the frozen model for DisenDiffTrainer's regularisation.",
            inputs=[
                io.Model.Input("model", tooltip="The frozen base model (the one you will train)."),
                io.Clip.Input("clip", tooltip="Its CLIP."),
                io.Vae.Input("vae", tooltip="Its VAE, to decode the images."),
                io.String.Input("class_prompt", default="a photo of a man and a woman",
                                tooltip="Prompt naming the classes only, e.g. 'a cat and a dog'."),
                io.Int.Input("count", default=50, min=1, max=1000, tooltip="Number of images (paper: 200)."),
                io.Int.Input("steps", default=25, min=1, max=200, tooltip="Sampling steps per image."),
                io.Float.Input("cfg", default=6.0, min=1.0, max=20.0, step=0.1, tooltip="CFG scale (paper's sampling: 6)."),
                io.Int.Input("size", default=512, min=64, max=2048, step=64, tooltip="Square image size."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the first image (+1 per image)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The regularisation images."),
                io.String.Output(display_name="captions", tooltip="Their caption (the class prompt)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, class_prompt, count, steps, cfg, size, seed) -> io.NodeOutput:
        positive = [clip.encode_from_tokens_scheduled(clip.tokenize(class_prompt))[0]]
        negative = [clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]]
        channels = model.get_model_object("latent_format").latent_channels
        bar = comfy.utils.ProgressBar(count)
        images = []
        for i in range(count):
            glue.check_interrupted()
            latent = torch.zeros(1, channels, size // 8, size // 8)
            noise = comfy.sample.prepare_noise(latent, seed + i)
            samples = comfy.sample.sample(model, noise, steps, cfg, "euler_ancestral", "normal", positive, negative,
                                          latent, disable_pbar=True, seed=seed + i)
            images.append(vae.decode(samples))
            bar.update_absolute(i + 1, count)
        return io.NodeOutput(torch.cat(images), class_prompt)


class CalibratedCrossAttn(io.ComfyNode):
    """Sampling-time DisenDiff calibration (beyond the paper, which selects concepts by the prompt only).

    In every cross-attention layer, for cond rows and within the step range, each modifier token's
    logits are raised where its class word attends and lowered elsewhere (binding), and each concept
    is lowered where another concept's class map dominates (separation). The class maps are the layer's
    own (head mean), min-max normalised, smoothed by training's 3×3 Gaussian and squared, as training
    processes its maps; training averages the 16×16 layers first, which a layer cannot wait for inside
    the same forward pass. Inputs: clip + prompt (the CLIP and the prompt text of the positive
    CLIPTextEncode: it finds the tokens, and sampling stops with an error when the positive conditioning
    is another prompt), modifiers and class_words (comma lists in prompt order, e.g.
    "embedding:pair_new1, embedding:pair_new2" and "man, woman"), strength (0 = plain sampling exactly;
    0.5–2 typical), start/end percent. Works with trained or stock models.

    Families: SD1.5/SD2/SDXL and the DiTs (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image). On a DiT the
    edit is made on the image-query x text-key logits of every block's joint attention, inside its one softmax over
    text and image keys (text queries and image keys untouched); the words are found in the DiT's text sequence
    (Flux: T5 tokens; Flux.2, Z-Image, Qwen-Image: the prompt's tokens, not their text encoder's template; SD3:
    CLIP-L/G tokens, then T5's), and modifiers must be words of the prompt (no embeddings).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibratedCrossAttn",
            display_name="DisenDiff Calibration (personalization)",
            category=CATEGORY,
            description="Bind each modifier token's attention to its class word and separate the concepts while sampling.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5/SDXL (e.g. with the DisenDiff LoRA) or a DiT (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image); left unchanged."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the prompt: the words are found in its tokens (the template of Flux.2/Z-Image/Qwen-Image excluded)."),
                io.String.Input("prompt", multiline=True, default="photo of a embedding:disendiff_pair_new1 man and embedding:disendiff_pair_new2 woman",
                                tooltip="The positive prompt, exactly as encoded for sampling (another one stops sampling with an error)."),
                io.String.Input("modifiers", default="embedding:disendiff_pair_new1, embedding:disendiff_pair_new2",
                                tooltip="Modifier words or (U-Net only) embeddings, one per concept, comma separated."),
                io.String.Input("class_words", default="man, woman", tooltip="Class word of each concept, same order."),
                io.Float.Input("strength", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Calibration strength in logit units; 0 = plain sampling."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Calibration starts here."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.001,
                               tooltip="Calibration ends here (layout is set early; 0.5 keeps details free)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with calibrated cross-attention.")],
        )

    @classmethod
    def execute(cls, model, clip, prompt, modifiers, class_words, strength, start_percent, end_percent) -> io.NodeOutput:
        clip = checked_clip("CalibratedCrossAttn", clip)
        mods = [m.strip() for m in modifiers.split(",") if m.strip()]
        words = [w.strip() for w in class_words.split(",") if w.strip()]
        if len(mods) != len(words) or len(words) < 2:
            raise ValueError(f"CalibratedCrossAttn needs 2+ concepts with one modifier per class word; got "
                             f"modifiers {mods} and class words {words}")
        blocks = [b for b in transformer_blocks(model, "CalibratedCrossAttn") if b.has_cross_attention]
        family = blocks[0].family
        encoded = clip.encode_from_tokens(clip.tokenize(prompt)).float().to(comfy.model_management.intermediate_device())
        placement = family.conditioning_placement(encoded.shape[1])
        concepts = tuple(Concept(placement.shift(_positions(clip, prompt, m, encoded.shape[1], family)),
                                 placement.shift(_positions(clip, prompt, w, encoded.shape[1], family)))
                         for m, w in zip(mods, words))
        encoded = placement.place(encoded)  # what the model receives: the prompt check compares with it
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        m = model.clone()
        add_attention_processor(m, CalibratedCrossAttention(concepts, strength, sigma_start, sigma_end, encoded.shape[1]),
                                blocks)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, CALIBRATION_WRAPPER_KEY,
                               _PromptCheck(encoded, prompt))
        return io.NodeOutput(m)


@dataclass(frozen=True, eq=False)
class _PromptCheck:
    """APPLY_MODEL wrapper of CalibratedCrossAttn: the concept positions are tokens of the node's prompt,
    so the cond rows' context must be that prompt as the node's CLIP encodes it (a different prompt would
    move the edit onto other tokens, silently); hands the processor the context's length."""

    encoded: torch.Tensor  # (1, L, D)
    prompt: str

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        rows = cond_row_indices(transformer_options.get("cond_or_uncond"), x.shape[0])
        if rows and prompt_repeats(c_crossattn, self.encoded, rows) is None:
            raise ValueError(
                f"CalibratedCrossAttn: the positive conditioning ({c_crossattn.shape[1]} tokens) is not the node's "
                f"prompt {self.prompt!r} ({self.encoded.shape[1]} tokens) as the node's CLIP encodes it, so the "
                "concepts' token positions would point at other tokens. Give the node the CLIP and the prompt text of "
                "the positive CLIPTextEncode (convert its text widget to an input and share one string).")
        return executor(x, t, c_concat, c_crossattn, control,
                        {**transformer_options, CONTEXT_TOKENS_KEY: c_crossattn.shape[1]}, **kwargs)


class CalibratedCrossAttnMaps(io.ComfyNode):
    """Attention-map preview for CalibratedCrossAttn (DisenDiff, CVPR 2024; the official sample.py's
    ``--check_token_attn``). Runs ONE cond-only denoising step of ``latent`` (e.g. the KSampler output)
    re-noised to ``noise_level`` (0 = clean, 1 = pure noise; 0.3–0.6 shows the layout) and returns each
    concept's modifier and class maps from the deepest U-Net level (the training maps; on Flux and SD3 every
    block, at the latent's token grid), after the calibration. The MODEL must come from CalibratedCrossAttn
    (strength 0 shows the plain maps)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CalibratedCrossAttnMaps",
            display_name="DisenDiff Calibration Maps (personalization)",
            category=CATEGORY,
            description="Preview the concepts' cross-attention maps (modifier and class word) of a calibrated model.",
            inputs=[
                io.Model.Input("model", tooltip="MODEL output of CalibratedCrossAttn (its concepts are read from it)."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning of the same prompt."),
                io.Latent.Input("latent", tooltip="Latent to look at, e.g. the sampler's output."),
                io.Float.Input("noise_level", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="How far into the noise the latent is pushed before the step (0.3–0.6 typical)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True, tooltip="Seed of the added noise."),
            ],
            outputs=[
                io.Image.Output(display_name="maps", tooltip="Per concept: modifier map, then class-word map (grey, normalised)."),
                io.Mask.Output(display_name="class_masks", tooltip="One mask per concept: its class-word map, normalised."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, noise_level, seed) -> io.NodeOutput:
        chain = model.model_options["transformer_options"].get(CHAIN_KEY)
        calibration = next((p for p in chain.processors if isinstance(p, CalibratedCrossAttention)), None) if chain else None
        if calibration is None:
            raise ValueError("CalibratedCrossAttnMaps needs the MODEL output of CalibratedCrossAttn (it names the concepts)")
        patched = model.clone()
        blocks = transformer_blocks(patched, "CalibratedCrossAttnMaps")
        reader = MapRecorder(map_block_keys(blocks), node_name="CalibratedCrossAttnMaps")
        add_attention_processor(patched, reader, [b for b in blocks if b.key in reader.blocks])
        samples = latent["samples"][:1]
        noise = comfy.sample.prepare_noise(samples, seed)
        denoise = max(noise_level, 1e-3)
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", positive, positive, samples,
                            denoise=denoise, disable_pbar=True, seed=seed)
        size = (samples.shape[-2] * 8, samples.shape[-1] * 8)
        modifiers, classes = recipe.concept_maps(reader.layer_mean().mean(0, keepdim=True), calibration.concepts)
        per_token = torch.cat([modifiers, classes], 1).float().cpu()  # (1, 2S, h, w), modifiers first
        maps = min_max(F.interpolate(per_token, size=size, mode="bilinear", align_corners=False)[0])
        concepts = len(calibration.concepts)
        order = [i for c in range(concepts) for i in (c, concepts + c)]  # m1, c1, m2, c2, ...
        images = maps[order][..., None].expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(images, maps[concepts:].contiguous())


def _positions(clip, prompt: str, phrase: str, context_tokens: int, family: Family) -> tuple[int, ...]:
    """Context positions of ``phrase`` (a word, or on a U-Net an ``embedding:name``) in ``prompt`` as ``clip``
    encodes it into ``context_tokens`` tokens."""
    if phrase.startswith("embedding:"):
        if family.joint:
            raise ValueError(f"CalibratedCrossAttn: {phrase!r} is a CLIP embedding (DisenDiffTrainer's modifier tokens "
                             f"are for U-Net models); on a {family.name} model name modifier words of the prompt.")
        name = phrase[len("embedding:"):]
        probe = glue.PlaceholderPrompt(clip, prompt, {name: _embedding_rows(clip, name)})
        key = glue.sub_tokenizers(clip.tokenizer)[0][1].embedding_key.replace("clip_", "")
        return tuple(probe.positions(key, name))
    from .prompt_tokens import find_phrase_tokens
    found = find_phrase_tokens(clip, prompt, phrase, node_name="CalibratedCrossAttn")
    if found.context_length != context_tokens:
        raise ValueError(f"CalibratedCrossAttn: this CLIP encodes the prompt into {context_tokens} tokens, but its "
                         f"tokenizers lay out {found.context_length}; the node cannot tell where {phrase!r} lands in "
                         "the conditioning of this text encoder.")
    return found.positions


def _embedding_rows(clip, name: str) -> int:
    found = resolve_embedding("CalibratedCrossAttn", clip, name)
    return 1 if found.ndim == 1 else found.shape[0]


DISENDIFF_NODES = [DisenDiffTrainer, DisenDiffRegularization, CalibratedCrossAttn, CalibratedCrossAttnMaps]
