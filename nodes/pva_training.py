"""PVA training nodes (Xu et al., WACV 2024, specs/pva.md §3): stage-1 training of the pathway and the
paper's 40-step per-identity tune, both on the shared training core."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import folder_paths
import torch

from ..attention.dispatcher import CHAIN_KEY
from ..attention.blocks import BLOCK_SELECTIONS, selected_blocks
from ..attention.pva import ParallelVisualAttentionProcessor
from ..attention.pva_weights import save_pva
from ..training.augmentation import center_square
from ..training.loop import LoopSettings, fingerprint, train
from ..training.naming import output_path, checked_name
from ..training.runs import RUN_ID_KEY, ExportedFile
from ..attention.pva_weights import PVAWeights
from ..training.pva import IdentityPhotos, PVAStep, face_box_mask, rotating_references, stage1_references
from . import training_glue as glue
from .comfy_io import io
from .validation import require_images, require_masks_for, require_matching_clip
from .patching import add_attention_processor, transformer_blocks
from .prompt_tokens import embedding_key, encoder_attribute
from .pva import (CATEGORY, PVA_FOLDER, LoadedPVA, ParallelVisualAttention, PVAType, _arcface_backbone,
                  _check_model_fits, context_width, own_projections, parallel_projections, reference_features, token_embeddings)

CHECKPOINT_FOLDER = "pva_checkpoints"
#: the paper's training size (its SD2 inpainting model's native 512 px)
DEFAULT_RESOLUTION = 512
#: the identity word while training: an ``embedding:`` name resolved to the vector under training.
WORD_PLACEHOLDER = "pva_identity_word"
#: defaults of a fresh PVATrainer run (docs/pva.md "Real scale" has the numbers): a rank-16 change of every
#: block's own projections, and the token transformer at the identity tokens' width (the paper's layout) up to
#: 1024 wide, at ArcFace's 512-d feature width with a final projection on wider models (SDXL, SD3.5, Flux)
DEFAULT_RANK = 16
DEFAULT_BLOCKS = "all"
WIDEST_PAPER_TOKEN_WIDTH = 1024
NARROW_TOKEN_WIDTH = 512
#: the official stage-1 config's ``init_token``. It is no token of CLIP's vocabulary, so the official lookup
#: (``convert_tokens_to_ids``) returns the unknown token, which in CLIP is <|endoftext|>: the official identity
#: word starts as the end-of-text embedding. An empty ``init_word`` starts from the same row.
OFFICIAL_INIT_TOKEN = "ktn+pll+ucd"


def resolution_input():
    """The square size photos are scaled to: at their own size, two 768 px photos made one tune step take
    minutes on a CPU and several GB more."""
    return io.Int.Input("resolution", default=DEFAULT_RESOLUTION, min=64, max=2048, step=64, optional=True,
                        tooltip="Photos are centre-cropped and scaled to this square (paper: 512; 1024 for SDXL/Flux).")


def _patcher(weights) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(weights, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _identity_photos(model, vae, pva: LoadedPVA, images: torch.Tensor, clip_vision, masks=None) -> IdentityPhotos:
    """Latents, masked latents, masks and encoder features of every photo and of its mirror image;
    ``masks`` (n, H, W), 1 = inpaint, default the whole-face box."""
    both = torch.stack([images[..., :3], images[..., :3].flip(2)], dim=1)  # (n, 2, H, W, 3)
    n, _, height, width, _ = both.shape
    flat = both.reshape(n * 2, height, width, 3)
    if masks is None:  # (masks given: checked by the node, see validation.require_masks_for)
        masks = face_box_mask(height, width).expand(n, -1, -1)
    pixel_mask = torch.stack([masks, masks.flip(2)], dim=1).reshape(n * 2, height, width, 1).float()
    masked = flat * (1 - pixel_mask) + 0.5 * pixel_mask  # InpaintModelConditioning's grey fill
    latents = model.model.process_latent_in(glue.encode_images(vae, flat))
    masked_latents = glue.encode_images(vae, masked)
    masks = torch.nn.functional.interpolate(pixel_mask.movedim(-1, 1), size=latents.shape[-2:], mode="nearest")
    with torch.no_grad():
        features = reference_features(pva, flat, clip_vision).clone()

    def per_photo(t):
        return t.reshape(n, 2, *t.shape[1:])
    return IdentityPhotos(per_photo(latents), per_photo(masked_latents), per_photo(masks), per_photo(features))


@dataclass
class PreparedTune:
    pva: LoadedPVA  # a copy of the input PVA, under training
    params: dict[str, torch.Tensor]
    step: PVAStep
    fingerprint: str


def prepare_training(model, clip, vae, pva: LoadedPVA, images, groups: tuple[tuple[int, ...], ...], stage1: bool,
                     bins: int, seed: int, clip_vision=None, masks=None, gradient_checkpointing=None) -> PreparedTune:
    """Copy of the PVA weights with the trainable parts unfrozen (parallel projections and identity word;
    plus the token transformer in stage 1), the trainable U-Net clone and the step function; call inside
    ``training_mode()``. Everything else (U-Net, text encoder, identity encoder) stays frozen.
    ``gradient_checkpointing`` None: where the model's size or the resolution needs it (glue.checkpoints_blocks)."""
    who = "PVATrainer" if stage1 else "PVAIdentityTune"
    if images is None or images.shape[0] == 0:
        raise ValueError(f"{who}: no photo of the person; connect aligned square face crops.")
    blocks = _check_model_fits(pva, model, who)
    weights = copy.deepcopy(pva.weights)
    weights.requires_grad_(False)
    device = comfy.model_management.get_torch_device()
    tuned = LoadedPVA(pva.name, weights, _patcher(weights))
    comfy.model_management.load_models_gpu([tuned.patcher], force_full_load=True)
    trainable_params = {f"parallel.{k}": p for k, p in weights.parallel.named_parameters()}
    trainable_params.update({f"identity_word.{k}": p for k, p in weights.identity_word.items()})
    if stage1:
        trainable_params.update({f"token_transformer.{k}": p for k, p in weights.token_transformer.named_parameters()})
    for p in trainable_params.values():
        p.requires_grad_(True)

    photos = _identity_photos(model, vae, tuned, images, clip_vision, masks)
    photos = IdentityPhotos(*(t.to(device) for t in dataclasses.astuple(photos)))
    prompt = glue.PlaceholderPrompt(clip, f"photo of a embedding:{WORD_PLACEHOLDER} person", {WORD_PLACEHOLDER: 1})
    missing = sorted(set(prompt.tokens) - set(weights.identity_word))
    if missing:
        raise ValueError(f"{who}: {pva.name} has no identity word for the text encoders {missing}.")
    encoder = glue.TrainableTextEncoder(clip)

    def context():
        vectors = {embedding_key(clip, k): weights.identity_word[k].to(torch.float32).cpu() for k in prompt.tokens}
        cond, pooled = encoder.encode(prompt.substitute({WORD_PLACEHOLDER: vectors}))
        return blocks[0].family.conditioning_placement(cond.shape[1]).place(cond).to(device), pooled

    trainable = glue.trainable_unet(model, {}, glue.checkpoints_blocks(model, images.shape[1], gradient_checkpointing))
    processor = ParallelVisualAttentionProcessor(weights.parallel, torch.zeros(1, 0, weights.context_dim),
                                                 own_projections=own_projections(trainable, blocks))
    add_attention_processor(trainable, processor, blocks)
    options = trainable.model_options["transformer_options"]

    def denoise(x_t, sigma, text, tokens, c_concat):
        options[CHAIN_KEY] = options[CHAIN_KEY].with_processor(dataclasses.replace(processor, identity_tokens=tokens))
        cond, pooled = text
        with glue.saved_tensor_copies(blocks[0].family.joint):
            return glue.denoise(trainable, x_t, sigma, cond, c_concat=c_concat,
                                **glue.conditioning_extras(model, blocks[0].family, pooled, images.shape[1], x_t, cond))

    def concat(x_t, masked_latent, mask):
        return model.model.concat_cond(noise=x_t, concat_latent_image=masked_latent, concat_mask=mask, device=device)

    def identity_tokens(features, generator):
        if not stage1:  # the tune keeps the token transformer frozen (official "fix")
            with torch.no_grad():
                return weights.identity_tokens(features)
        transformer = weights.token_transformer.train()  # official: trained with dropout 0.1
        with torch.random.fork_rng(devices=[features.device] if features.is_cuda else []):
            torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))  # resumable dropout
            return transformer(features.to(transformer.lift.weight))

    step = PVAStep(photos, groups, stage1_references if stage1 else rotating_references, identity_tokens, context,
                   concat, denoise, glue.discrete_sigmas(model).to(device), glue.prediction_kind(model, flow=True), bins, seed)
    run = fingerprint(method="pva_stage1" if stage1 else "pva_identity_tune", images=images.float(),
                      groups=groups, bins=bins, seed=seed, masks=masks if masks is not None else "face box",
                      start=glue.weights_sample(weights), model=type(model.model).__name__,
                      weights=glue.weights_sample(model.model.diffusion_model),
                      text_encoder=glue.weights_sample(encoder.model), vae=glue.weights_sample(vae.first_stage_model),
                      image_encoder=None if clip_vision is None else glue.weights_sample(clip_vision.model))
    return PreparedTune(tuned, trainable_params, step, run)


def prepare_identity_tune(model, clip, vae, pva: LoadedPVA, images, bins: int, seed: int,
                          clip_vision=None) -> PreparedTune:
    """The per-identity tune: one identity, all photos, only projections and identity word trainable."""
    groups = (tuple(range(images.shape[0])),) if images is not None else ()
    return prepare_training(model, clip, vae, pva, images, groups, False, bins, seed, clip_vision)


def identity_tune_optimizer(params: dict[str, torch.Tensor], learning_rate: float, word_learning_rate: float,
                            transformer_learning_rate: float = 0.0):
    """The official AdamW (weight decay 0.01, constant lr): projections at ``learning_rate``, the word and
    (stage 1) the token transformer at their own rates."""
    def group_of(name):
        return "word" if name.startswith("identity_word.") else "transformer" if name.startswith("token_transformer.") else "base"
    groups = {id(p): group_of(name) for name, p in params.items()}
    rates = {"base": learning_rate, "word": word_learning_rate, "transformer": transformer_learning_rate}

    def make(tensors):
        split = [{"params": [t for t in tensors if groups[id(t)] == g], "lr": lr} for g, lr in rates.items()]
        return torch.optim.AdamW([g for g in split if g["params"]], weight_decay=0.01)
    return make


def _train(node: str, tune: PreparedTune, stem: str, steps: int, bins: int, seed: int, checkpoint_every: int,
           **learning_rates) -> str:
    """Run the loop on a prepared run; returns the run id (the data's fingerprint and the learning rates)."""
    run_id = fingerprint(data=tune.fingerprint, **learning_rates)
    train(tune.params, tune.step, identity_tune_optimizer(tune.params, **learning_rates),
          LoopSettings(steps, bins, seed, checkpoint_every, glue.run_checkpoints(CHECKPOINT_FOLDER, stem, run_id)),
          on_progress=glue.progress_reporter(node, steps), check_interrupted=glue.check_interrupted)
    return run_id


def _save(node: str, stem: str, tune: PreparedTune, run_id: str) -> LoadedPVA:
    weights = tune.pva.weights.requires_grad_(False).train(False)
    folder = folder_paths.get_folder_paths(PVA_FOLDER)[0]
    glue.exports_of_run(node, stem, [ExportedFile(folder)], run_id)
    path = output_path(folder, stem)
    save_pva(path, weights, {RUN_ID_KEY: run_id})
    folder_paths.filename_list_cache.clear()
    return LoadedPVA(path.name, weights, tune.pva.patcher)


class PVAIdentityTune(io.ComfyNode):
    """PVA per-identity fine-tune (Xu et al., WACV 2024): 40 steps on a few photos of one person.

    Trains ONLY the parallel query/key/value projections of every cross-attention layer (of a low-rank file: their
    low-rank changes and norm copies, the block's own projections stay the model's) and the identity
    word (token transformer, identity encoder, U-Net and text encoder stay frozen). Each photo in turn is
    the target with its whole face masked, the others are its references. Writes
    ``models/pva/<name>.safetensors`` (load with PVALoader) and returns the model patched for the person.

    Inputs (safe ranges): photos (1–5 square aligned face crops), steps (paper 40; 20–100), learning_rate
    (paper 2e-5 = 1e-5 × batch 2 at full rank; about 1e-4 for a low-rank file), word_learning_rate (paper 1e-3;
    0 freezes the word as the paper's FT100), timestep_bins (paper 2: micro-batches per step, one timestep slice each), seed, name,
    checkpoint_every (0 = only at the end and on Cancel), resolution (the photos are centre-cropped and scaled
    to this square; paper 512, 1024 for SDXL/Flux). Run again: more steps continue the run, other changes
    start a new one and keep the earlier file as ``<name>_00001`` (and so on).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVAIdentityTune",
            display_name="PVA Face Identity Tune (personalization)",
            category=CATEGORY,
            description="PVA's 40-step per-identity tune of the parallel projections and the identity word.",
            inputs=[
                io.Model.Input("model", tooltip="The model the PVA weights were trained for (paper: SD2 inpainting); left unchanged."),
                io.Clip.Input("clip", tooltip="The model's text encoder (the identity word is tuned in its embedding space)."),
                io.Vae.Input("vae", tooltip="VAE that encodes the photos."),
                PVAType.Input("pva", tooltip="Pre-trained PVA weights (PVALoader); they are copied, not changed."),
                io.Image.Input("photos", tooltip="1-5 square, aligned face crops of the person (paper: ~5)."),
                io.String.Input("name", default="pva_person", tooltip="Output file models/pva/<name>.safetensors; letters, digits (any script), - _ . only"),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Optimizer steps (paper: 40)."),
                io.Float.Input("learning_rate", default=2e-5, min=0.0, max=1e-2, step=1e-6,
                               tooltip="AdamW lr of the parallel projections (paper: 2e-5 at full rank; about 1e-4 for a low-rank file)."),
                io.Float.Input("word_learning_rate", default=1e-3, min=0.0, max=1e-1, step=1e-5,
                               tooltip="AdamW lr of the identity word (paper: 1e-3; 0 keeps it)."),
                io.Int.Input("timestep_bins", default=2, min=1, max=8,
                             tooltip="Micro-batches per step, each from its own slice of timesteps (paper: 2)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of noise, timesteps and flips."),
                io.Int.Input("checkpoint_every", default=0, min=0, max=10000,
                             tooltip=glue.CHECKPOINT_EVERY_TOOLTIP),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="Only for PVA files trained on CLIP vision features."),
                resolution_input(),
            ],
            outputs=[
                io.Model.Output(tooltip="The model patched with the tuned PVA and the photos as references."),
                PVAType.Output(display_name="pva", tooltip="The tuned PVA weights (also saved to models/pva)."),
                io.String.Output(display_name="pva_name", tooltip="File name of the tuned weights in models/pva."),
            ],
            is_output_node=True,  # it writes files: it runs even when nothing uses its outputs
        )

    @classmethod
    def execute(cls, model, clip, vae, pva, photos, name, steps, learning_rate, word_learning_rate, timestep_bins,
                seed, checkpoint_every, clip_vision=None, resolution=DEFAULT_RESOLUTION) -> io.NodeOutput:
        require_matching_clip("PVAIdentityTune", model, clip)
        require_images("PVAIdentityTune", "photos", photos)
        photos = center_square(photos, resolution, "bilinear")
        stem = checked_name(name)
        with glue.training_mode():
            tune = prepare_identity_tune(model, clip, vae, pva, glue.clone_tensors(photos), timestep_bins, seed, clip_vision)
            run_id = _train("PVAIdentityTune", tune, stem, steps, timestep_bins, seed, checkpoint_every,
                            learning_rate=learning_rate, word_learning_rate=word_learning_rate)
        tuned = _save("PVAIdentityTune", stem, tune, run_id)
        patched = ParallelVisualAttention.execute(model, tuned, photos, 1.0, False, 0, 0.0, 1.0, clip_vision).result[0]
        return io.NodeOutput(patched, tuned, tuned.name)


def _initial_word_ids(clip, init_word: str) -> dict[str, int]:
    """Vocabulary row of the identity word's start per text encoder: the official lookup of
    :data:`OFFICIAL_INIT_TOKEN` (the tokenizer's unknown token) when ``init_word`` is empty, else the first token
    of ``init_word``."""
    ids = {}
    for key, chunks in clip.tokenize(init_word, return_word_ids=True).items():
        if not init_word.strip():
            tokenizer = getattr(clip.tokenizer, encoder_attribute(clip, key)).tokenizer
            ids[key] = tokenizer.convert_tokens_to_ids(OFFICIAL_INIT_TOKEN)
            continue
        tokens = [token for token, _weight, word in chunks[0] if word != 0 and isinstance(token, int)]
        if not tokens:
            raise ValueError(f"PVATrainer: init_word {init_word!r} has no token for the text encoder; name a word whose "
                             "embedding starts the identity word (e.g. 'person'), or leave it empty for the official start.")
        ids[key] = tokens[0]
    return ids


def token_width(context_width: int, requested: int = 0) -> int:
    """The token transformer's inner width: ``requested``, or (0) the paper's layout (the identity tokens' own
    width) up to :data:`WIDEST_PAPER_TOKEN_WIDTH`, else :data:`NARROW_TOKEN_WIDTH` (with a final projection)."""
    if requested:
        return requested
    return context_width if context_width <= WIDEST_PAPER_TOKEN_WIDTH else NARROW_TOKEN_WIDTH


def initial_pva(model, clip, encoder: str, init_word: str, seed: int, clip_vision=None, probe=None,
                rank: int = DEFAULT_RANK, block_selection: str = DEFAULT_BLOCKS, inner_width: int = 0) -> LoadedPVA:
    """Stage-1 starting point: projections of the model's ``block_selection`` (full-rank copies for ``rank``
    0, else the block's own plus a rank-``rank`` change, zero at the start), a seeded random token transformer
    (:func:`token_width` wide), the identity word initialised to a vocabulary row (:func:`_initial_word_ids`)."""
    found = [b for b in transformer_blocks(model, "PVATrainer") if b.has_cross_attention]
    try:
        keys = set(selected_blocks(block_selection, [b.key for b in found]))
    except ValueError as error:
        raise ValueError(f"PVATrainer: {error}") from None
    blocks = [b for b in found if b.key in keys]
    words = {key: token_embeddings(clip, key)[token].detach().float().cpu()[None].clone()
             for key, token in _initial_word_ids(clip, init_word).items()}
    face_encoder = _arcface_backbone() if encoder == "arcface" else None
    if encoder == "clip_vision":
        if clip_vision is None:
            raise ValueError("PVATrainer: encoder clip_vision needs a CLIP vision model on clip_vision.")
        feature_dim = clip_vision.encode_image(probe[:1]).image_embeds.shape[-1]
    else:
        feature_dim = face_encoder.fc.out_features
    weights = PVAWeights.initial(lambda: parallel_projections(model, blocks, rank), encoder, feature_dim, words,
                                 family=blocks[0].family, seed=seed, block_selection=block_selection,
                                 inner_width=token_width(context_width(model, blocks[0]), inner_width))
    weights.face_encoder = face_encoder
    weights.stock_face_encoder = face_encoder is not None
    return LoadedPVA("initial", weights, _patcher(weights))


class PVATrainer(io.ComfyNode):
    """PVA stage-1 training (Xu et al., WACV 2024): the parallel projections, the identity token
    transformer and the identity word, on photos of many people (paper: CelebAHQ-IDI, 50k steps).

    Each step takes one photo in turn as the target (its mask: the masks input, else the whole-face box),
    up to 5 other photos of the same person in random order, a random prefix of them as references (p 0.2
    plus a flipped copy), and reuses the sample for ``timestep_bins`` micro-batches over the timestep
    slices. Frozen: U-Net, text encoder, identity encoder (the paper's stage 2 also trains ArcFace; not
    offered). Writes ``models/pva/<name>.safetensors``; resumable from ``output/pva_checkpoints/<name>``. Families:
    SD1.5, SD2, SDXL and Flux, SD3/SD3.5 (the flow-matching loss of the model's own sampling, the identity
    word learned in every text encoder of the CLIP, T5 included; the file records the family).

    Inputs (safe ranges): images (photos grouped by person: consecutive ``images_per_identity`` images are
    one identity), masks (optional, one per image, 1 = inpaint), encoder (arcface = paper; clip_vision =
    deviation), steps, learning rates (paper: projections 8e-6 = 1e-6 × batch 8 for its full-rank copies; the
    default 1e-4 is for the low-rank change, as LoRA practice; transformer 3.2e-5, word 1e-3), timestep_bins
    (paper 4), init_word (empty = the official start: its init_token
    "ktn+pll+ucd" is not in CLIP's vocabulary, so the identity word starts as the end-of-text embedding;
    or a word, e.g. "person", whose embedding starts it), pva (optional: continue from these weights
    instead of a fresh start), resolution (photos and masks centre-cropped and scaled to this square; paper
    512), rank (default 16: each parallel projection is the block's own, read from the model at run time, plus a
    trained rank-16 change, zero at the start, so step 0 is the paper's copy; 0 = the paper's full-rank copies,
    1.6 B parameters on Flux), blocks (all = paper; double, every_2, every_4 cut the file further), token_width
    (0 = the identity tokens' width up to 1024 as the paper, 512 with a final projection on wider models; see
    docs/pva.md for the sizes). rank, blocks and token_width apply to a fresh start; a pva input keeps its own.
    Run again: more steps continue the run, other changes start a new one and keep the earlier file as
    ``<name>_00001`` (and so on).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVATrainer",
            display_name="PVA Face Identity Trainer (personalization)",
            category=CATEGORY,
            description="PVA stage 1: train the parallel projections, token transformer and identity word on many identities.",
            inputs=[
                io.Model.Input("model", tooltip="The (inpainting) model to train the pathway for (paper: SD2 inpainting); left unchanged."),
                io.Clip.Input("clip", tooltip="The model's text encoder (the identity word is learned in its embedding space)."),
                io.Vae.Input("vae", tooltip="VAE that encodes the photos."),
                io.Image.Input("images", tooltip="Square aligned face photos, grouped by person (consecutive images_per_identity per person)."),
                io.Int.Input("images_per_identity", default=5, min=1, max=64, tooltip="How many consecutive images show the same person."),
                io.String.Input("name", default="pva_stage1", tooltip="Output file models/pva/<name>.safetensors; letters, digits (any script), - _ . only"),
                io.Combo.Input("encoder", options=["arcface", "clip_vision"], default="arcface",
                               tooltip="Identity features: ArcFace r50 (paper; needs models/pva/ms1mv3_arcface_r50.safetensors) or a CLIP vision model."),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip="Optimizer steps (paper: up to 50000)."),
                io.Float.Input("learning_rate", default=1e-4, min=0.0, max=1e-2, step=1e-7,
                               tooltip="AdamW lr of the parallel projections (low-rank default 1e-4; paper at rank 0: 1e-6 x total batch)."),
                io.Float.Input("transformer_learning_rate", default=3.2e-5, min=0.0, max=1e-2, step=1e-7,
                               tooltip="AdamW lr of the token transformer (paper: 3.2e-5)."),
                io.Float.Input("word_learning_rate", default=1e-3, min=0.0, max=1e-1, step=1e-5,
                               tooltip="AdamW lr of the identity word (paper: 1e-3)."),
                io.Int.Input("timestep_bins", default=4, min=1, max=8, tooltip="Micro-batches per step, one timestep slice each (paper: 4)."),
                io.String.Input("init_word", default="",
                                tooltip="Empty: the official start (the end-of-text embedding); or a word whose embedding starts the identity word."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of initialisation, noise, timesteps, references."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=1000000,
                             tooltip=glue.CHECKPOINT_EVERY_TOOLTIP),
                io.Mask.Input("masks", optional=True, tooltip="One inpainting mask per image (1 = fill); default the whole-face box."),
                PVAType.Input("pva", optional=True, tooltip="Continue from these PVA weights instead of a fresh start."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="The CLIP vision model, for encoder clip_vision."),
                resolution_input(),
                io.Int.Input("rank", default=DEFAULT_RANK, min=0, max=1024, optional=True,
                             tooltip="Rank of the trained change of each block's own projections; 0 = full-rank copies (the paper's, large on Flux/SD3.5/SDXL)."),
                io.Combo.Input("blocks", options=list(BLOCK_SELECTIONS), default=DEFAULT_BLOCKS, optional=True,
                               tooltip="Blocks given parallel projections: all (paper), double (two-stream DiT blocks), every 2nd or 4th."),
                io.Int.Input("token_width", default=0, min=0, max=4096, step=64, optional=True,
                             tooltip="Inner width of the identity token transformer; 0 = the tokens' width up to 1024 (paper), else 512."),
            ],
            outputs=[
                PVAType.Output(display_name="pva", tooltip="The trained PVA weights (also saved to models/pva)."),
                io.String.Output(display_name="pva_name", tooltip="File name of the trained weights in models/pva."),
            ],
            is_output_node=True,  # it writes files: it runs even when nothing uses its outputs
        )

    @classmethod
    def execute(cls, model, clip, vae, images, images_per_identity, name, encoder, steps, learning_rate,
                transformer_learning_rate, word_learning_rate, timestep_bins, init_word, seed, checkpoint_every,
                masks=None, pva=None, clip_vision=None, resolution=DEFAULT_RESOLUTION, rank=DEFAULT_RANK,
                blocks=DEFAULT_BLOCKS, token_width=0) -> io.NodeOutput:
        transformer_blocks(model, "PVATrainer")
        require_matching_clip("PVATrainer", model, clip)
        require_images("PVATrainer", "images", images)
        require_masks_for("PVATrainer", masks, images)
        images = center_square(images, resolution, "bilinear")
        if masks is not None:
            masks = center_square(masks[..., None], resolution, "nearest")[..., 0]
        stem = checked_name(name)
        count = images.shape[0]
        if count % images_per_identity != 0:
            raise ValueError(f"PVATrainer: {count} images cannot be grouped into identities of {images_per_identity} "
                             "images; give images_per_identity photos of every person, person after person.")
        groups = tuple(tuple(range(g, g + images_per_identity)) for g in range(0, count, images_per_identity))
        with glue.training_mode():
            start = pva if pva is not None else initial_pva(model, clip, encoder, init_word, seed, clip_vision, images,
                                                            rank, blocks, token_width)
            run = prepare_training(model, clip, vae, start, glue.clone_tensors(images), groups, True, timestep_bins, seed,
                                   clip_vision, None if masks is None else glue.clone_tensors(masks))
            run_id = _train("PVATrainer", run, stem, steps, timestep_bins, seed, checkpoint_every,
                            learning_rate=learning_rate, word_learning_rate=word_learning_rate,
                            transformer_learning_rate=transformer_learning_rate)
        trained = _save("PVATrainer", stem, run, run_id)
        return io.NodeOutput(trained, trained.name)


PVA_TRAINING_NODES = [PVATrainer, PVAIdentityTune]
