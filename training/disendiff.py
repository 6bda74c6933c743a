"""DisenDiff training data and step (spec §2–§5): modifier-token initialisation, the target image's
augmentation (Custom Diffusion's ``MaskBase``, ``training.augmentation``: a fresh flip, scale and offset
for every target sample, with its caption prefix), the regularisation images' random flip, the 50/50
target/regularisation sampling, and the loss ``ε-MSE + 0.01 · calibration`` of one micro-batch.

Everything here is plain torch over tensors; the node glue supplies the VAE encoder, the text encoder
and the U-Net call as callables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..attention.disendiff import calibration_loss
from .augmentation import CLOSE_PREFIXES, FAR_PREFIXES, draw_flip, draw_view
from .losses import diffusion_loss, noised

ATTENTION_LOSS_WEIGHT = 0.01
#: CLIP-L vocabulary rows Custom Diffusion / DisenDiff copy into new tokens (spec §2): "ucd</w>", "pll", "ktn".
INIT_TOKEN_IDS = (43514, 47629, 42170)
#: every caption prefix a training view can carry
PREFIXES = ("",) + FAR_PREFIXES + CLOSE_PREFIXES


@dataclass(frozen=True)
class DisenDiffSettings:
    steps: int = 250
    learning_rate: float = 8e-5
    micro_batch: int = 2
    grad_accumulation: int = 4
    attention_weight: float = ATTENTION_LOSS_WEIGHT
    augment: bool = True


def init_token_ids(count: int) -> list[int]:
    """Initial vocabulary rows of ``count`` new tokens: the last gets "ktn", the one before "pll",
    the one before that "ucd</w>". Deviation (spec §2): with three tokens the official code leaves
    ``<new2>`` random; here it gets "pll"; a fourth and later tokens also start from "ucd</w>"."""
    ids = list(INIT_TOKEN_IDS[-count:]) if count <= len(INIT_TOKEN_IDS) else \
        [INIT_TOKEN_IDS[0]] * (count - len(INIT_TOKEN_IDS)) + list(INIT_TOKEN_IDS)
    return ids


def training_caption(modifiers: Sequence[str], class_words: Sequence[str], prefix: str = "") -> str:
    """``prefix + "photo of a <m1> w1 and <m2> w2"`` (commas before the last pair for 3+ concepts)."""
    pairs = [f"embedding:{m} {w}" for m, w in zip(modifiers, class_words)]
    joined = pairs[0] if len(pairs) == 1 else ", ".join(pairs[:-1]) + " and " + pairs[-1]
    return f"{prefix}photo of a {joined}"


@dataclass(frozen=True)
class TargetSample:
    latent: torch.Tensor   # (4, h, w) model-space latent (process_latent_in applied)
    mask: torch.Tensor     # (1, h, w)
    prefix: str


@dataclass(frozen=True)
class TargetViews:
    """Augmented views of the target image ``pixels`` (``[S, S, 3]`` in [0, 1]), drawn fresh for every
    target sample as the official ``MaskBase`` does, and VAE-encoded by ``encode_pixels`` (``[B, S, S, 3]``
    → ``[B, 4, S/8, S/8]`` model-space latents on the training device). ``augment`` False: flips only."""

    pixels: torch.Tensor
    encode_pixels: Callable[[torch.Tensor], torch.Tensor]
    augment: bool = True

    def draw(self, generator: torch.Generator, count: int) -> list[TargetSample]:
        views = [draw_view(self.pixels, generator, augment=self.augment) for _ in range(count)]
        if not views:
            return []
        latents = self.encode_pixels(torch.stack([v.pixels for v in views]))
        return [TargetSample(latent, v.valid_mask[None].to(latent.device), v.prefix) for latent, v in zip(latents, views)]


@dataclass(frozen=True)
class RegularisationSample:
    latent: torch.Tensor
    mirrored: torch.Tensor  # the latent of the mirrored image (MaskBase flips reg images with p 1/2)
    context: torch.Tensor  # (1, T, C) frozen text encoding of its caption, cut to the target's length
    pooled: torch.Tensor | None = None  # (1, P) pooled text output (SDXL's CLIP-G), None for SD1.x


@dataclass
class DisenDiffBatch:
    """What one micro-batch draws: which samples are a target (with the index of its image) or reg."""

    targets: list[int]
    regs: list[int]


def draw_batch(generator: torch.Generator, micro_batch: int, target_count: int, reg_count: int) -> DisenDiffBatch:
    """Each sample is a target with p 1/2 (always without regularisation images), as the paper's
    dataset of N target and N regularisation items; ``target_count``: the targets to pick from."""
    targets, regs = [], []
    for _ in range(micro_batch):
        if reg_count and torch.rand((), generator=generator) < 0.5:
            regs.append(int(torch.randint(0, reg_count, (), generator=generator)))
        else:
            targets.append(int(torch.randint(0, target_count, (), generator=generator)))
    return DisenDiffBatch(targets, regs)


@dataclass
class DisenDiffStep:
    """One micro-batch's loss, given the callables that touch the model.

    ``encode_target(prefix) -> (context (1, T, C), pooled (1, P) or None, concepts)`` encodes the
    training caption with the live token vectors and returns the token positions of each concept;
    ``denoise(x_t, sigma, context, pooled) -> x̂0`` runs the trainable U-Net with ``recorder`` attached
    (``pooled``: the batch's pooled text outputs, None for models without them); ``sigmas`` is the
    discrete schedule; ``kind`` the prediction type.
    """

    targets: TargetViews
    regs: Sequence[RegularisationSample]
    encode_target: Callable
    denoise: Callable
    recorder: object
    sigmas: torch.Tensor
    kind: str
    settings: DisenDiffSettings

    def __call__(self, micro) -> torch.Tensor:
        gen = micro.generator
        batch = draw_batch(gen, self.settings.micro_batch, 1, len(self.regs))
        latents, masks, contexts, pooled, concept_sets = [], [], [], [], []
        encoded = {}  # one text-encoder pass per distinct caption of the micro-batch
        for sample in self.targets.draw(gen, len(batch.targets)):
            if sample.prefix not in encoded:
                encoded[sample.prefix] = self.encode_target(sample.prefix)
            context, pooled_text, concepts = encoded[sample.prefix]
            latents.append(sample.latent)
            masks.append(sample.mask)
            contexts.append(context)
            pooled.append(pooled_text)
            concept_sets.append(concepts)
        for index in batch.regs:
            sample = self.regs[index]
            latents.append(sample.mirrored if draw_flip(gen) else sample.latent)
            masks.append(torch.ones_like(sample.latent[:1]))
            contexts.append(sample.context)
            pooled.append(sample.pooled)
        x0 = torch.stack(latents)
        device = x0.device
        sigma, x_t = noised(x0, self.sigmas, gen)
        context = torch.cat(contexts, 0)
        pooled = None if pooled[0] is None else torch.cat(pooled, 0).to(device)
        self.recorder.maps.clear()
        denoised = self.denoise(x_t, sigma, context, pooled)
        # channel_sum: the official normalisation, which fixes the weight of the 0.01 calibration term (spec §3)
        loss = diffusion_loss(self.kind, x_t, denoised, x0, sigma, torch.stack(masks).to(device), channel_sum=True)
        if batch.targets and self.settings.attention_weight:
            maps = self.recorder.layer_mean()  # (B, T, h, w)
            per_sample = [calibration_loss(*concept_maps(maps[i:i + 1], concepts))
                          for i, concepts in enumerate(concept_sets)]
            loss = loss + self.settings.attention_weight * torch.cat(per_sample).mean()
        self.recorder.maps.clear()
        return loss


def concept_maps(maps: torch.Tensor, concepts) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T, h, w) token maps → modifier and class maps (b, S, h, w), multi-token words averaged."""
    modifiers = torch.stack([maps[:, list(c.modifier)].mean(1) for c in concepts], 1)
    classes = torch.stack([maps[:, list(c.word)].mean(1) for c in concepts], 1)
    return modifiers, classes
