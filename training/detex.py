"""DETEX training (Cai et al., "Decoupled Textual Embeddings for Customized Image Generation", AAAI 2024).

One shared subject word [V], per-image pose [P_i] and background [B_i] words from attribute mappers
(``detex_mappers``), Custom Diffusion's cross-attention K/V fine-tune, joint training with a masked
loss (``detex_loss``). Plain torch: the node glue passes the VAE encoder, the text encoder and the
U-Net call in as callables.

Per micro-batch (Custom Diffusion's data regime, spec detex.md §2, §3.5 [R]; the draw is DisenDiff's
``draw_batch``, which implements the same regime): each sample is a regularisation image with
probability 1/2 when regularisation images are given (mirrored with p 1/2, as Custom Diffusion's
``MaskBase`` flips them), otherwise a view of a training image from the augmentation pool. A training
view takes the ``FULL`` or the ``SUBJECT`` branch; its prompt is the template with the view's caption
prefix, [V], its [P_i] and (``FULL`` only) its [B_i], encoded with the live vectors so gradients reach the
subject word and the mappers.
Loss: ε- (or v-) MSE per sample, a per-element mean as the spec's [R] reading (§3.3: "standard ε-MSE",
Break-A-Scene's mean; §3.5: the prior loss of Custom Diffusion's diffusers script, also a mean) —
``FULL`` and regularisation samples over the latent elements the augmentation mask keeps, ``SUBJECT``
samples over the subject mask with the chosen normalisation (Break-A-Scene's mean over all elements by
default) — averaged over the micro-batch. Custom Diffusion's own instance loss (and DisenDiff's, whose
code is known: ``training.losses`` ``channel_sum``) instead sums the error over the 4 latent channels,
4× this mean; per-element means keep the full, subject and regularisation terms on one scale. With the optional attention
regulariser [R] (``attention_loss_weight`` > 0, spec §3.3, not confirmed for DETEX) a recorder keeps the
map layers' cross-attention maps and each training sample adds Break-A-Scene's loss of [V] against its
subject mask and (``FULL`` only) of [B_i] against the rest of the picture (``1 − m``, the grey canvas of
a shrunk view included), averaged over the training samples of the micro-batch and weighted by λ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .augmentation import draw_flip, draw_views
from .detex_data import SubjectImages
from ..attention.token_maps import MapRecorder
from .detex_loss import (
    ALL_ELEMENTS, FULL, MASK_AREA, SUBJECT, attention_mask_loss, choose_branches, latent_mask, masked_diffusion_mse)
from .detex_mappers import AttributeEmbeddings
from .detex_prompts import PromptTemplate
from .disendiff import draw_batch
from .losses import noised, prediction_from_denoised

#: placeholder embedding names of the live vectors in training prompts (never files)
SUBJECT_WORD, POSE_WORD, BACKGROUND_WORD = "detex_subject", "detex_pose", "detex_background"

#: text, ``{placeholder name: [1, width] live vector}`` → (``[1, 77, width]`` context (one CLIP window),
#: ``{placeholder name: its context positions}``)
EncodeText = Callable[[str, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, list[int]]]]
#: ``[B, S, S, 3]`` pixels in [0, 1] → ``[B, 4, S/8, S/8]`` model-space latents (process_latent_in applied)
EncodePixels = Callable[[torch.Tensor], torch.Tensor]
#: ``(x_t, sigma, context)`` → ComfyUI's denoised x̂0
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DetexSettings:
    """Defaults: Custom Diffusion's (spec §3.5: lr 1e-5 × batch 2 × accumulation 4 = 8e-5, AdamW wd 0.01,
    250 steps) [R]; the mapper learning rate 1e-4 is the spec's per-subject start value [R]."""

    steps: int = 250
    learning_rate: float = 8e-5
    mapper_learning_rate: float = 1e-4
    weight_decay: float = 0.01
    micro_batch: int = 2
    grad_accumulation: int = 4
    subject_branch_probability: float = 0.5
    mask_normalization: str = ALL_ELEMENTS
    #: 0 = off (default); ``detex_loss.ATTENTION_LOSS_WEIGHT`` turns the attention regulariser on [R]
    attention_loss_weight: float = 0.0


@dataclass(frozen=True)
class PoolView:
    """One pre-encoded augmented view of a training image."""

    image_index: int
    latent: torch.Tensor  # [4, h, w]
    subject_mask: torch.Tensor  # [1, h, w] at latent size
    valid_mask: torch.Tensor  # [1, h, w] augmentation loss mask
    prefix: str
    flipped: bool


@dataclass(frozen=True)
class RegularisationView:
    latent: torch.Tensor  # [4, h, w]
    mirrored: torch.Tensor  # [4, h, w], the mirrored image's (Custom Diffusion flips reg images with p 1/2)
    context: torch.Tensor  # [1, 77, width], frozen encoding of its caption (truncated to 77 tokens as CLIP's)


def build_pool(subject: SubjectImages, views_per_image: int, generator: torch.Generator,
               encode_pixels: EncodePixels) -> list[PoolView]:
    """Augmented views of every image, VAE-encoded once (spec disendiff.md §10.8's time saver; DETEX's own
    data pipeline is unknown [R], so the pool size stays the ``augmented_views`` widget, where DisenDiff
    follows its official code and draws a fresh view per sample).

    ``views_per_image`` 0 turns augmentation off: each image and its mirror image.
    """
    samples = [(index, view) for index in range(subject.count)
               for view in draw_views(subject.images[index], generator, views_per_image, subject.masks[index])]
    latents = encode_pixels(torch.stack([s.pixels for _, s in samples]))
    size = latents.shape[-2:]
    subject_masks = latent_mask(torch.stack([s.subject_mask for _, s in samples]), size)
    pool = []
    for (index, sample), latent, mask in zip(samples, latents, subject_masks):
        valid = torch.nn.functional.interpolate(sample.valid_mask[None, None], size=size, mode="nearest")[0]
        pool.append(PoolView(index, latent, mask, valid, sample.prefix, sample.flipped))
    return pool


def training_prompt(template: PromptTemplate, class_word: str, view: PoolView, branch: str) -> str:
    """The view's caption: augmentation prefix + template with the placeholder words of its branch."""
    return view.prefix + template.render(
        f"embedding:{SUBJECT_WORD}", class_word, pose=f"embedding:{POSE_WORD}",
        background=f"embedding:{BACKGROUND_WORD}" if branch == FULL else None)


@dataclass
class DetexStep:
    """The loss of one micro-batch (module docstring); call with a ``loop.MicroStep``. ``recorder``
    captures the maps of ``denoise``'s U-Net; needed only with the attention regulariser."""

    pool: Sequence[PoolView]
    regularisation: Sequence[RegularisationView]
    subject_word: torch.Tensor  # [1, width] trainable
    attributes: AttributeEmbeddings
    template: PromptTemplate
    class_word: str
    encode_text: EncodeText
    denoise: Denoise
    sigmas: torch.Tensor
    kind: str
    settings: DetexSettings
    recorder: Optional[MapRecorder] = None

    def __post_init__(self):
        if self.settings.attention_loss_weight and self.recorder is None:
            raise ValueError("the attention regulariser needs a MapRecorder on the U-Net")

    def __call__(self, micro) -> torch.Tensor:
        gen = micro.generator
        batch = draw_batch(gen, self.settings.micro_batch, len(self.pool), len(self.regularisation))
        targets, regs = batch.targets, batch.regs
        branches = choose_branches(len(targets), self.settings.subject_branch_probability, gen)
        latents, contexts, masks, normalizations = [], [], [], []
        attention_targets = []  # per training sample: [(context positions of a word, where it should attend)]
        for pool_index, branch in zip(targets, branches):
            view = self.pool[pool_index]
            index, flipped = torch.tensor([view.image_index]), torch.tensor([int(view.flipped)])
            vectors = {SUBJECT_WORD: self.subject_word, POSE_WORD: self.attributes("pose", index, flipped)}
            if branch == FULL:
                vectors[BACKGROUND_WORD] = self.attributes("background", index, flipped)
            context, positions = self.encode_text(training_prompt(self.template, self.class_word, view, branch), vectors)
            contexts.append(context)
            if self.settings.attention_loss_weight:
                subject = view.subject_mask[0]
                attention_targets.append([(positions[SUBJECT_WORD], subject)] + (
                    [(positions[BACKGROUND_WORD], 1 - subject)] if branch == FULL else []))
            latents.append(view.latent)
            if branch == SUBJECT:
                masks.append(view.valid_mask * view.subject_mask)
                normalizations.append(self.settings.mask_normalization)
            else:
                masks.append(view.valid_mask)
                normalizations.append(MASK_AREA)
        for reg_index in regs:
            view = self.regularisation[reg_index]
            latents.append(view.mirrored if draw_flip(gen) else view.latent)
            contexts.append(view.context)
            masks.append(torch.ones_like(view.latent[:1]))
            normalizations.append(MASK_AREA)
        x0 = torch.stack(latents)
        device = x0.device
        sigma, x_t = noised(x0, self.sigmas, gen)
        if self.recorder is not None:
            self.recorder.maps.clear()
        denoised = self.denoise(x_t, sigma, torch.cat(contexts).to(device))
        prediction = prediction_from_denoised(self.kind, x_t, denoised, sigma)
        target = prediction_from_denoised(self.kind, x_t, x0, sigma)
        losses = [masked_diffusion_mse(prediction[i:i + 1], target[i:i + 1], masks[i][None].to(device), normalizations[i])
                  for i in range(x0.shape[0])]
        loss = torch.stack(losses).mean()
        if attention_targets:
            loss = loss + self.settings.attention_loss_weight * self._attention_loss(attention_targets)
        return loss

    def _attention_loss(self, targets) -> torch.Tensor:
        """Mean over the training samples (the micro-batch's first rows) of their attention loss."""
        maps = self.recorder.layer_mean()  # [B, T, h, w]
        self.recorder.maps.clear()  # the loss holds what backward needs
        per_sample = [attention_mask_loss(torch.stack([maps[row, positions].mean(0) for positions, _ in words]),
                                          torch.stack([mask for _, mask in words]))
                      for row, words in enumerate(targets)]
        return torch.stack(per_sample).mean()


def optimizer_factory(settings: DetexSettings, mapper_params: Sequence[torch.Tensor]):
    """AdamW (wd 0.01, Custom Diffusion) with the mapper parameters in their own learning-rate group."""
    mapper_ids = {id(p) for p in mapper_params}

    def make(trainables: list[torch.Tensor]) -> torch.optim.Optimizer:
        groups = [{"params": [p for p in trainables if id(p) not in mapper_ids], "lr": settings.learning_rate}]
        mapped = [p for p in trainables if id(p) in mapper_ids]
        if mapped:
            groups.append({"params": mapped, "lr": settings.mapper_learning_rate})
        return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    return make


def attribute_parameters(attributes: AttributeEmbeddings) -> dict[str, torch.Tensor]:
    """The attribute module's trainable tensors under checkpoint-stable names."""
    return {f"attributes.{name}": p for name, p in attributes.named_parameters()}
