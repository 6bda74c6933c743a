"""PVA training nodes: the paper's 40-step per-identity tune (Xu et al., WACV 2024, specs/pva.md §3.1)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..attention.dispatcher import CHAIN_KEY
from ..attention.pva import ParallelVisualAttentionProcessor
from ..attention.pva_weights import save_pva
from ..training.loop import LoopSettings, fingerprint, train
from ..training.naming import output_path, sanitize_name
from ..training.pva import IdentityPhotos, IdentityTuneStep, face_box_mask
from . import training_glue as glue
from .comfy_io import io
from .patching import add_attention_processor
from .pva import (CATEGORY, PVA_FOLDER, LoadedPVA, ParallelVisualAttention, PVAType, _check_model_fits,
                  reference_features)

CHECKPOINT_FOLDER = "pva_checkpoints"
#: the identity word while training: an ``embedding:`` name resolved to the vector under training.
WORD_PLACEHOLDER = "pva_identity_word"


def _patcher(weights) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(weights, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(pixels[..., :3]).float().clone()


def _identity_photos(model, vae, pva: LoadedPVA, images: torch.Tensor, clip_vision) -> IdentityPhotos:
    """Latents, masked latents, masks and encoder features of every photo and of its mirror image."""
    both = torch.stack([images[..., :3], images[..., :3].flip(2)], dim=1)  # (n, 2, H, W, 3)
    n, _, height, width, _ = both.shape
    flat = both.reshape(n * 2, height, width, 3)
    pixel_mask = face_box_mask(height, width)[None, :, :, None]
    masked = flat * (1 - pixel_mask) + 0.5 * pixel_mask  # InpaintModelConditioning's grey fill
    latents = model.model.process_latent_in(_encode_pixels(vae, flat))
    masked_latents = _encode_pixels(vae, masked)
    masks = torch.nn.functional.interpolate(pixel_mask.movedim(-1, 1), size=latents.shape[-2:], mode="nearest")
    with torch.no_grad():
        features = reference_features(pva, flat, clip_vision).clone()

    def per_photo(t):
        return t.reshape(n, 2, *t.shape[1:])
    return IdentityPhotos(per_photo(latents), per_photo(masked_latents),
                          per_photo(masks.expand(n * 2, -1, -1, -1)), per_photo(features))


@dataclass
class PreparedTune:
    pva: LoadedPVA  # a copy of the input PVA, under training
    params: dict[str, torch.Tensor]
    step: IdentityTuneStep
    fingerprint: str


def prepare_identity_tune(model, clip, vae, pva: LoadedPVA, images, bins: int, seed: int,
                          clip_vision=None) -> PreparedTune:
    """Copy of the PVA weights with only the parallel projections and the identity word trainable, the
    trainable U-Net clone and the step function; call inside ``training_mode()``."""
    if images is None or images.shape[0] == 0:
        raise ValueError("PVAIdentityTune: no photo of the person; connect 1-5 aligned square face crops.")
    blocks = _check_model_fits(pva, model)
    weights = copy.deepcopy(pva.weights)
    weights.requires_grad_(False)
    device = comfy.model_management.get_torch_device()
    tuned = LoadedPVA(pva.name, weights, _patcher(weights))
    comfy.model_management.load_models_gpu([tuned.patcher], force_full_load=True)
    trainable_params = {f"parallel.{k}": p for k, p in weights.parallel.named_parameters()}
    trainable_params.update({f"identity_word.{k}": p for k, p in weights.identity_word.items()})
    for p in trainable_params.values():
        p.requires_grad_(True)

    photos = _identity_photos(model, vae, tuned, images, clip_vision)
    photos = IdentityPhotos(*(t.to(device) for t in dataclasses.astuple(photos)))
    prompt = glue.PlaceholderPrompt(clip, f"photo of a embedding:{WORD_PLACEHOLDER} person", {WORD_PLACEHOLDER: 1})
    missing = sorted(set(prompt.tokens) - set(weights.identity_word))
    if missing:
        raise ValueError(f"PVAIdentityTune: {pva.name} has no identity word for the text encoders {missing}.")
    encoder = glue.TrainableTextEncoder(clip)

    def context():
        vectors = {f"clip_{k}": weights.identity_word[k].to(torch.float32).cpu() for k in prompt.tokens}
        return encoder.encode(prompt.substitute({WORD_PLACEHOLDER: vectors}))[0].to(device)

    trainable = glue.trainable_unet(model, {})
    processor = ParallelVisualAttentionProcessor(weights.parallel, torch.zeros(1, 0, weights.context_dim))
    add_attention_processor(trainable, processor, blocks)
    options = trainable.model_options["transformer_options"]

    def denoise(x_t, sigma, context_, tokens, c_concat):
        options[CHAIN_KEY] = options[CHAIN_KEY].with_processor(dataclasses.replace(processor, identity_tokens=tokens))
        return glue.denoise(trainable, x_t, sigma, context_, c_concat=c_concat)

    def concat(x_t, masked_latent, mask):
        return model.model.concat_cond(noise=x_t, concat_latent_image=masked_latent, concat_mask=mask, device=device)

    def identity_tokens(features):
        with torch.no_grad():  # token transformer and encoder stay frozen in the tune (official "fix")
            return weights.identity_tokens(features)

    step = IdentityTuneStep(photos, identity_tokens, context, concat, denoise, glue.discrete_sigmas(model).to(device),
                            glue.prediction_kind(model), bins)
    run = fingerprint(method="pva_identity_tune", pva=pva.name, images=images.float(), bins=bins, seed=seed,
                      start=torch.cat([p.detach().float().flatten().cpu() for p in trainable_params.values()]),
                      model=type(model.model).__name__)
    return PreparedTune(tuned, trainable_params, step, run)


def identity_tune_optimizer(params: dict[str, torch.Tensor], learning_rate: float, word_learning_rate: float):
    """The official AdamW (weight decay 0.01, constant lr): projections at ``learning_rate``, the word at its own."""
    word = {id(p) for name, p in params.items() if name.startswith("identity_word.")}

    def make(tensors):
        groups = [{"params": [t for t in tensors if id(t) not in word], "lr": learning_rate},
                  {"params": [t for t in tensors if id(t) in word], "lr": word_learning_rate}]
        return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01)
    return make


class PVAIdentityTune(io.ComfyNode):
    """PVA per-identity fine-tune (Xu et al., WACV 2024): 40 steps on a few photos of one person.

    Trains ONLY the parallel query/key/value projections of every cross-attention layer and the identity
    word (token transformer, identity encoder, U-Net and text encoder stay frozen). Each photo in turn is
    the target with its whole face masked, the others are its references. Writes
    ``models/pva/<name>.safetensors`` (load with PVALoader) and returns the model patched for the person.

    Inputs (safe ranges): photos (1–5 square aligned face crops), steps (paper 40; 20–100), learning_rate
    (paper 2e-5 = 1e-5 × batch 2), word_learning_rate (paper 1e-3; 0 freezes the word as the paper's
    FT100), timestep_bins (paper 2: micro-batches per step, one timestep slice each), seed, name,
    checkpoint_every (0 = only at the end / on cancel; re-running with the same inputs resumes).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAIdentityTune",
            display_name="PVA Identity Tune (40 steps)",
            category=CATEGORY,
            description="PVA's 40-step per-identity tune of the parallel projections and the identity word.",
            inputs=[
                io.Model.Input("model", tooltip="The model the PVA weights were trained for (paper: SD2 inpainting); left unchanged."),
                io.Clip.Input("clip", tooltip="The model's text encoder (the identity word is tuned in its embedding space)."),
                io.Vae.Input("vae", tooltip="VAE that encodes the photos."),
                PVAType.Input("pva", tooltip="Pre-trained PVA weights (PVALoader); they are copied, not changed."),
                io.Image.Input("photos", tooltip="1-5 square, aligned face crops of the person (paper: ~5)."),
                io.String.Input("name", default="pva_person", tooltip="Output file models/pva/<name>.safetensors; letters, digits, - _ ."),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Optimizer steps (paper: 40)."),
                io.Float.Input("learning_rate", default=2e-5, min=0.0, max=1e-2, step=1e-6,
                               tooltip="AdamW lr of the parallel projections (paper: 2e-5)."),
                io.Float.Input("word_learning_rate", default=1e-3, min=0.0, max=1e-1, step=1e-5,
                               tooltip="AdamW lr of the identity word (paper: 1e-3; 0 keeps it)."),
                io.Int.Input("timestep_bins", default=2, min=1, max=8,
                             tooltip="Micro-batches per step, each from its own slice of timesteps (paper: 2)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of noise, timesteps and flips."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=10000,
                             tooltip="Save a resumable checkpoint every N steps (0: at the end and on cancel)."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Only for PVA files trained on CLIP vision features."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model patched with the tuned PVA and the photos as references."),
                PVAType.Output(display_name="pva", tooltip="The tuned PVA weights (also saved to models/pva)."),
                io.String.Output(display_name="pva_name", tooltip="File name of the tuned weights in models/pva."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, pva, photos, name, steps, learning_rate, word_learning_rate, timestep_bins,
                seed, checkpoint_every, clip_vision=None) -> io.NodeOutput:
        stem = sanitize_name(name)
        with glue.training_mode():
            tune = prepare_identity_tune(model, clip, vae, pva, glue.clone_tensors(photos), timestep_bins, seed, clip_vision)
            checkpoint = output_path(f"{folder_paths.get_output_directory()}/{CHECKPOINT_FOLDER}", stem)
            train(tune.params, tune.step, identity_tune_optimizer(tune.params, learning_rate, word_learning_rate),
                  LoopSettings(steps, timestep_bins, seed, checkpoint_every, checkpoint, tune.fingerprint),
                  on_progress=glue.progress_reporter(steps), check_interrupted=glue.check_interrupted)
        weights = tune.pva.weights.requires_grad_(False)
        path = output_path(folder_paths.get_folder_paths(PVA_FOLDER)[0], stem)
        save_pva(path, weights)
        folder_paths.filename_list_cache.clear()
        tuned = LoadedPVA(path.name, weights, tune.pva.patcher)
        patched = ParallelVisualAttention.execute(model, tuned, photos, 1.0, False, 0, 0.0, 1.0, clip_vision).result[0]
        return io.NodeOutput(patched, tuned, path.name)


PVA_TRAINING_NODES = [PVAIdentityTune]
