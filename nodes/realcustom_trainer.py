"""RealCustomTrainer: trains this pack's RealCustom image branch in the graph (DESIGN.md §4)."""
from __future__ import annotations

import math
from typing import Optional

import comfy.model_management
import comfy.model_patcher
import comfy.utils
import folder_paths
import torch
import torch.nn.functional as F

from ..attention.blocks import BLOCK_SELECTIONS, selected_blocks
from ..attention.realcustom import BRANCH_LAYOUTS, PER_BLOCK, RUN_KEY, MaskedImageBranch, MaskSettings, WordMapReader
from ..attention.realcustom_weights import (
    BRANCH_BLOCKS_KEY,
    BRANCH_LAYOUT_KEY,
    CLIP_VISION_FORMAT,
    DEFAULT_RANK,
    FAMILY_KEY,
    FORMAT_KEY,
    adapter_from_state_dict,
    branch_metadata,
    default_layout,
    new_clip_vision_adapter,
)
from ..training.checkpoint import save_atomic
from ..training.loop import LoopSettings, fingerprint, train
from ..training.naming import output_path, checked_name
from ..training.realcustom import RealCustomStep, TrainingData, word_scope_preview
from ..training.runs import RUN_ID_KEY, ExportedFile
from . import training_glue as glue
from .comfy_io import io
from .validation import require_images, require_matching_clip
from .patching import add_attention_processor, model_class_names, transformer_blocks
from .prompt_tokens import PhraseNotInPromptError, find_phrase_tokens
from .realcustom import ADAPTER_FOLDER, CATEGORY, AdapterType, LoadedAdapter

CHECKPOINT_FOLDER = "realcustom_checkpoints"
#: the branch_layout choice that picks the family's default (attention.realcustom_weights.default_layout)
AUTO_LAYOUT = "auto"
#: the branch metadata of the per-block layout on every block: what every run trained before the layouts existed
RELEASED_BRANCH = {BRANCH_LAYOUT_KEY: PER_BLOCK, BRANCH_BLOCKS_KEY: BLOCK_SELECTIONS[0]}
#: brightness of the training image outside the word's mask in the preview
PREVIEW_DIM = 0.25


def _captions(text: str, count: int) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"RealCustomTrainer: {count} images but {len(lines)} captions; write one caption per line "
                         "(or a single line for all images).")
    return lines


def _target_words(text: str, captions: list[str]) -> list[str] | None:
    """One target word per caption (one line per caption, or one line for all), None when empty."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    if len(lines) == 1:
        return lines * len(captions)
    if len(lines) != len(captions):
        raise ValueError(f"RealCustomTrainer: {len(captions)} captions but {len(lines)} target words; write one word per "
                         "line (or a single line for all captions).")
    return lines


def _word_indicators(clip, captions: list[str], words: list[str], length: int, family) -> torch.Tensor:
    """``(N, length)``: 1 at each caption's target-word tokens, placed and repeated as its context is (see
    _contexts)."""
    rows = []
    for number, (caption, word) in enumerate(zip(captions, words), start=1):
        try:
            phrase = find_phrase_tokens(clip, caption, word, node_name="RealCustomTrainer").placed(family)
        except PhraseNotInPromptError as error:
            raise PhraseNotInPromptError(f"caption {number}: {error}") from None
        rows.append(phrase.indicator().repeat(length // phrase.context_length))
    return torch.stack(rows)


def _contexts(clip, captions: list[str], family) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Text contexts of the captions as the model of ``family`` receives them in sampling (placed by the family's
    ``conditioning_placement``; longer prompts repeat shorter ones as ComfyUI batches conds) and their pooled
    outputs (None from text encoders without one, T5 alone)."""
    encoded = [clip.encode_from_tokens(clip.tokenize(c), return_pooled=True) for c in captions]
    encoded = [(family.conditioning_placement(cond.shape[1]).place(cond), pooled) for cond, pooled in encoded]
    length = math.lcm(*(cond.shape[1] for cond, _ in encoded))
    contexts = torch.cat([cond.repeat(1, length // cond.shape[1], 1) for cond, _ in encoded])
    pooled = [pooled for _, pooled in encoded]
    return contexts, None if any(p is None for p in pooled) else torch.cat(pooled)


def _square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """The training images as the VAE sees them: center-cropped and resized to ``resolution`` squares."""
    square = comfy.utils.common_upscale(images[..., :3].movedim(-1, 1), resolution, resolution, "bilinear", "center")
    return square.movedim(1, -1)


def _encode_dataset(model, clip, vae, clip_vision, images, captions, resolution, crop, words, family) -> TrainingData:
    latents = model.get_model_object("latent_format").process_in(glue.encode_images(vae, _square(images, resolution)))
    features = clip_vision.encode_image(images[..., :3], crop=crop)["penultimate_hidden_states"]
    device = comfy.model_management.get_torch_device()
    contexts, pooled = _contexts(clip, captions, family)
    indicators = None if words is None else _word_indicators(clip, captions, words, contexts.shape[1], family).to(device)
    reads_pooled = family.reads_pooled(model.model.adm_channels)
    return TrainingData(latents.float().to(device), contexts.float().to(device), features.float().to(device),
                        pooled.float().to(device) if reads_pooled and pooled is not None else None, indicators)


def prepare_training(model, clip, vae, clip_vision, images, captions, resolution, crop, batch_size, seed,
                     adaptive_scoring=False, target_words=None, word_mask_training=False, branch_layout=AUTO_LAYOUT,
                     branch_rank=DEFAULT_RANK, branch_blocks="all", gradient_checkpointing=None):
    """(fresh adapter, step function) of a run; call inside ``glue.training_mode()``. ``target_words``: one
    per caption or None; ``word_mask_training`` gates the branch by their masks (needs them). The branch has
    ``branch_layout`` (``auto``: the family's default) at ``branch_rank``, on the ``branch_blocks`` selection of the
    cross-attention blocks (attention.blocks.BLOCK_SELECTIONS, as PVA's). ``gradient_checkpointing`` None: where the
    model's size or the resolution needs it (glue.checkpoints_blocks)."""
    if word_mask_training and target_words is None:
        raise ValueError("RealCustomTrainer: word_mask_training gates the branch by each caption's target word; "
                         "give the target_words (one per caption, or one for all).")
    blocks = [b for b in transformer_blocks(model, "RealCustomTrainer") if b.has_cross_attention]
    family = blocks[0].family
    served = set(selected_blocks(branch_blocks, [b.key for b in blocks]))
    with torch.no_grad():  # frozen encoders: their outputs are the (normal-tensor) dataset
        data = _encode_dataset(model, clip, vae, clip_vision, glue.clone_tensors(images), captions, resolution, crop,
                               target_words, family)
    context_dim = data.contexts.shape[-1]
    shapes = {b.key: (b.channels, context_dim) for b in blocks if b.key in served}
    layout = default_layout(family, shapes) if branch_layout == AUTO_LAYOUT else branch_layout
    adapter = new_clip_vision_adapter(data.features.shape[-1], shapes, seed, scoring=adaptive_scoring,
                                      latent_channels=data.latents.shape[1], family=family, layout=layout,
                                      rank=branch_rank)
    adapter.to(data.latents.device)
    trainable = glue.trainable_unet(model, {}, glue.checkpoints_blocks(model, resolution, gradient_checkpointing))
    add_attention_processor(trainable, WordMapReader(), blocks)
    add_attention_processor(trainable, MaskedImageBranch(adapter.branch), blocks)

    def denoise(x_t, sigma, context, pooled, run):
        trainable.model_options["transformer_options"][RUN_KEY] = run  # a private clone of this run
        with glue.saved_tensor_copies(family.joint):
            return glue.denoise(trainable, x_t, sigma, context,
                                **glue.conditioning_extras(model, family, pooled, resolution, x_t, context))

    step = RealCustomStep(data, adapter.projector, denoise, glue.discrete_sigmas(model), glue.prediction_kind(model, flow=True),
                          batch_size, adapter.scoring, MaskSettings() if word_mask_training else None)
    return adapter, step


def _word_previews(step, images, resolution, seed) -> tuple[torch.Tensor, torch.Tensor]:
    """(MASK, IMAGE) at the training size: each target word's mask, and its training image dimmed outside it;
    without target words the branch was ungated, so the mask covers everything."""
    square = _square(images, resolution).float().cpu()
    if step.data.word_indicators is None:
        mask = torch.ones(square.shape[:3])
    else:
        grid = word_scope_preview(step, MaskSettings(), seed).float().cpu()
        mask = F.interpolate(grid[:, None], size=(resolution, resolution), mode="bilinear").clamp(0, 1)[:, 0]
    return mask, square * (PREVIEW_DIM + (1.0 - PREVIEW_DIM) * mask[..., None])


class RealCustomTrainer(io.ComfyNode):
    """Trains a RealCustom image branch (Huang et al., CVPR 2024, §3.2) for SD1.x, SDXL, Flux or SD3/SD3.5 in this
    pack's format (SDXL: the captions' pooled CLIP-G output and the training size go to the U-Net's size input;
    Flux/SD3: the pooled output goes to ``y``, Flux dev trains at distilled guidance 3.5, the loss is the
    flow-matching MSE of the velocity ε − x0, the target of the model's own sampling; the scoring module reads
    the flow's ᾱ of the same signal-to-noise ratio). The adapter file records the model family.

    The U-Net, text encoder and image encoder stay frozen; a projector (Linear + LayerNorm over the
    CLIP_VISION's penultimate states) and the visual key/value projections of every cross-attention layer
    learn with the ε-MSE, each image being its own reference and the branch ungated (paper eq. 4; the mask
    exists only at inference). The paper trains on generic captioned images (filtered LAION, 160k
    iterations, lr 1e-5 on 16 A100): the subject is never fixed, any image works at inference.
    adaptive_scoring (on: the paper; off: the released model, which has none) also trains the paper's
    adaptive scoring module, which picks and weights the image tokens per step from the caption, the noisy
    latent and the timestep (γ_num ~ U[0.3, 1] in training, 0.8 at inference); AdaptiveMaskGuidance uses it
    whenever the adapter file has one.

    Inputs: model/clip/vae/clip_vision (the encoder you will use at inference), images + captions (one per
    line, or one for all), name (output file models/realcustom/<name>.safetensors), steps, learning_rate
    (paper 1e-5; 1e-4 for small sets), batch_size × grad_accumulation, resolution (512 for SD1.5, 1024 for SDXL), seed,
    checkpoint_every (resumable checkpoints in output/realcustom_checkpoints/<name>; run again with more steps
    to continue, any other change starts a new run and keeps the earlier file as <name>_00001), crop (how images reach the image encoder; inference must match), adaptive_scoring.
    - target_words: the real word of each caption that AdaptiveMaskGuidance will narrow ("toy"; one per
      line, or one for all; must occur in its caption). The paper's training (eq. 4) has no mask, so by
      default the words are checked and previewed: word_masks / word_preview show what each word covers on
      its training image (text-only pass at mid noise, AdaptiveMaskGuidance's default mask: max_norm, top
      25%), to see before sampling whether the word finds the subject. Empty: no words (previews all ones).
    - word_mask_training ([R], not in the paper; off): every step also gates the branch with the word's
      mask of that step (eq. 12, as inference) and masks the scoring module's latent as inference does
      (paper §3.3); costs one extra no-grad forward per step (×1.55 time in bench/train_realcustom.py). Needs
      target_words.
    - branch_layout ([R] on the DiTs): how the visual keys/values are held. "per-block" is the paper's and the
      released code's full-rank pair per block: 1.43 B numbers on Flux.1 dev (5.8 GB file, 23 GB of weights,
      gradients and fp32 Adam moments), 0.76 B on SD3.5 Large, 0.34 B on SDXL, 19 M on SD1.5. "shared + low-rank"
      holds one key and one value projection shared by the blocks plus a rank-``branch_rank`` change per block
      (zero at the start, so the untrained branch still adds nothing): Flux.1 dev 43 M with the projector at
      rank 16 (172 MB file, 0.7 GB training state), SD3.5 Large 33 M, SDXL 17.5 M. "auto" (default): shared +
      low-rank on the DiTs and where a per-block branch would pass 300 MB as fp32 (SDXL), per-block (what was
      trained before) on the smaller U-Nets (SD1.5). Sizes: bench/adapter_sizes.py; learning: bench/realcustom_branch.py.
    - branch_rank: rank of each block's change (1–512, default 16; 4 learned nearly as well on the tiny Flux).
    - branch_blocks (PVATrainer's selection): the blocks that get the branch: all (default; on the tiny Flux it
      removed the most loss, and with the shared layout each Flux block costs only 0.23 M numbers), "double" (the
      two-stream blocks: Flux's double blocks, as XLabs' IP-Adapter; all of SD3's joint blocks), "every_2" /
      "every_4" block in layer order (about PuLID-Flux's spacing): fewer image attentions per step. The file
      records layout, rank and selection; AdaptiveMaskGuidance serves the blocks the file has.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealCustomTrainer",
            display_name="RealCustom Subject Trainer (personalization)",
            category=CATEGORY,
            description="Train a RealCustom image branch (projector + visual K/V) on captioned images.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SDXL or DiT model (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image) the branch is trained for; stays frozen."),
                io.Clip.Input("clip", tooltip="The model's text encoder, for the captions."),
                io.Vae.Input("vae", tooltip="VAE that encodes the training images."),
                io.ClipVision.Input("clip_vision", tooltip="Image encoder of the branch (use the same at inference)."),
                io.Image.Input("images", tooltip="Training images; each is its own reference."),
                io.String.Input("captions", multiline=True, default="a photo of a toy",
                                tooltip="One caption per image, one per line (or one line for all)."),
                io.String.Input("name", default="realcustom_sd15", tooltip="Output file name in models/realcustom; letters, digits (any script), - _ . only"),
                io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate (paper: 1e-5 on a large dataset)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per micro-batch."),
                io.Int.Input("grad_accumulation", default=1, min=1, max=64, tooltip="Micro-batches per optimizer step."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Square training resolution (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of sampling order, noise and timesteps."),
                io.Int.Input("checkpoint_every", default=100, min=0, max=100000,
                             tooltip=glue.CHECKPOINT_EVERY_TOOLTIP),
                io.Boolean.Input("crop", default=False, tooltip="Center-crop images for the image encoder instead of squashing (match at inference)."),
                io.Boolean.Input("adaptive_scoring", default=True, optional=True,
                                 tooltip="Also train the paper's adaptive scoring of the image tokens (the released model has none)."),
                io.String.Input("target_words", multiline=True, default="", optional=True,
                                tooltip="The real word of each caption that becomes the subject (one per line, or one for all); checked and previewed."),
                io.Boolean.Input("word_mask_training", default=False, optional=True,
                                 tooltip="[R] Gate the branch by each target word's mask while training, as at inference (paper: ungated)."),
                io.Combo.Input("branch_layout", options=[AUTO_LAYOUT, *BRANCH_LAYOUTS], default=AUTO_LAYOUT, optional=True,
                               tooltip="Visual K/V: auto (shared + low-rank on DiTs and SDXL, per-block on SD1.5), per-block (released), shared + low-rank."),
                io.Int.Input("branch_rank", default=DEFAULT_RANK, min=1, max=512, optional=True,
                             tooltip="Rank of each block's change in the shared + low-rank layout (16: 153 MB branch on Flux.1 dev)."),
                io.Combo.Input("branch_blocks", options=list(BLOCK_SELECTIONS), default=BLOCK_SELECTIONS[0], optional=True,
                               tooltip="Blocks that get the image branch: all, the two-stream blocks (Flux's double), or every 2nd / 4th block."),
            ],
            outputs=[
                AdapterType.Output(display_name="adapter", tooltip="The trained branch, for RealCustomEncodeReference."),
                io.String.Output(display_name="adapter_name", tooltip="File name of the adapter in models/realcustom."),
                io.Mask.Output(display_name="word_masks", tooltip="What each target word covers on its training image (all ones without words)."),
                io.Image.Output(display_name="word_preview", tooltip="The training images dimmed outside their word's mask."),
            ],
            is_output_node=True,  # it writes files: it runs even when nothing uses its outputs
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, images, captions, name, steps, learning_rate, batch_size,
                grad_accumulation, resolution, seed, checkpoint_every, crop, adaptive_scoring=True, target_words="",
                word_mask_training=False, branch_layout=AUTO_LAYOUT, branch_rank=DEFAULT_RANK,
                branch_blocks=BLOCK_SELECTIONS[0]) -> io.NodeOutput:
        family = transformer_blocks(model, "RealCustomTrainer")[0].family
        refusal = family.training_refusal(model_class_names(model), model.model.adm_channels)
        if refusal:
            raise ValueError(f"RealCustomTrainer trains the image branches of SD1.x, SDXL and the DiTs; this MODEL "
                             f"({type(model.model).__name__}) {refusal}.")
        require_matching_clip("RealCustomTrainer", model, clip)
        require_images("RealCustomTrainer", "training images", images)
        stem = checked_name(name)
        texts = _captions(captions, images.shape[0])
        words = _target_words(target_words, texts)
        with glue.training_mode():
            adapter, step = prepare_training(model, clip, vae, clip_vision, images, texts, resolution, crop, batch_size,
                                             seed, adaptive_scoring, words, word_mask_training, branch_layout,
                                             branch_rank, branch_blocks)
            branch = branch_metadata(adapter.branch, branch_blocks)
            run_id = fingerprint(images=images, captions=texts, learning_rate=learning_rate,
                                 batch_size=batch_size, grad_accumulation=grad_accumulation, resolution=resolution,
                                 seed=seed, crop=crop, vision_dim=adapter.vision_dim, adaptive_scoring=adaptive_scoring,
                                 weights=glue.weights_sample(model.model.diffusion_model),
                                 text_encoder=glue.weights_sample(clip.cond_stage_model),
                                 vae=glue.weights_sample(vae.first_stage_model),
                                 image_encoder=glue.weights_sample(clip_vision.model),
                                 # the words change the training only when they gate it
                                 **({"word_masks_of": words} if word_mask_training else {}),
                                 # the released layout on every block is how every run before the layouts trained
                                 **({} if branch == RELEASED_BRANCH else {"branch": branch}))
            train(dict(adapter.named_parameters()), step, lambda params: torch.optim.AdamW(params, lr=learning_rate),
                  LoopSettings(steps, grad_accumulation, seed, checkpoint_every,
                               glue.run_checkpoints(CHECKPOINT_FOLDER, stem, run_id)),
                  on_progress=glue.progress_reporter("RealCustomTrainer", steps), check_interrupted=glue.check_interrupted)
            word_masks, word_preview = _word_previews(step, images, resolution, seed)
        state_dict = {k: v.detach().cpu() for k, v in adapter.state_dict().items()}
        folder = folder_paths.get_folder_paths(ADAPTER_FOLDER)[0]
        glue.exports_of_run("RealCustomTrainer", stem, [ExportedFile(folder)], run_id)
        path = output_path(folder, stem)
        save_atomic(path, state_dict, metadata={FORMAT_KEY: CLIP_VISION_FORMAT, FAMILY_KEY: adapter.family.file_tag, **branch,
                                                "method": "realcustom", RUN_ID_KEY: run_id,
                                                "steps": str(steps), "learning_rate": str(learning_rate)})
        folder_paths.filename_list_cache.clear()
        trained = adapter_from_state_dict(state_dict, CLIP_VISION_FORMAT, adapter.family, adapter.branch.layout)
        patcher = comfy.model_patcher.ModelPatcher(trained, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(LoadedAdapter(trained, patcher, path.name), path.name, word_masks, word_preview)


REALCUSTOM_TRAINER_NODES = [RealCustomTrainer]
