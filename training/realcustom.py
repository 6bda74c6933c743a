"""RealCustom image-branch training (Huang et al., CVPR 2024, §3.2 eq. 4), for this pack's CLIP-vision format.

Everything pre-trained is frozen (U-Net, text encoder, image encoder); only the projector and the
visual key/value projections of every cross-attention layer learn. Each training image is its own
reference, the branch is ungated (eq. 4 has no mask; the mask only exists at inference), and the loss
is the plain ε- (or v-) MSE of the frozen U-Net with the branch added; on the rectified-flow DiTs (Flux,
SD3) the noise is mixed the flow way and the loss is the MSE of the velocity ε − x0 the model predicts
(its own CONST sampling's target, see :mod:`.losses`).

With ``scoring`` (the paper's adaptive scoring module, absent from the released model) the image
features of each sample are scored from its caption, its noisy latent and its timestep, weighted and cut
to a random share γ_num ~ U[0.3, 1] of the tokens before the projector, so the score nets learn with the
rest (paper §3.2).

Each caption may name its target word (the real word that AdaptiveMaskGuidance will narrow). Its mask on
a training image (a text-only pass of the frozen U-Net on the noised latent, read as at inference) is what
the trainer previews; with ``word_mask`` set ([R], not in the paper, off by default) every step also gates
the branch with it (eq. 12 instead of eq. 4) and masks the latent the scoring module's visual context sees
(paper §3.3), so training sees the gate and scoring inputs of inference.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.realcustom import ImageTokens, MaskSettings, TrainingRun, WordMapCapture
from ..attention.realcustom_scoring import TRAINING_KEEP_RANGE, AdaptiveScoring, alpha_bar, masked_latent, model_input
from .loop import MicroStep
from .losses import FLOW, add_noise, masked_mse, noised, prediction_from_denoised

#: denoise(x_t, sigma, context, pooled, run) -> the frozen U-Net's x̂0 with the image branch of ``run``
#: (``pooled``: the captions' pooled text outputs for models that read them (SDXL), else None)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", "TrainingRun | WordMapCapture"],
                     torch.Tensor]


@dataclass(frozen=True)
class TrainingData:
    """The encoded dataset: one row per image (all on the training device)."""

    latents: torch.Tensor   # (N, C, h, w) VAE latents (scaled as the model expects)
    contexts: torch.Tensor  # (N, T, C) text contexts of the captions
    features: torch.Tensor  # (N, P, D) CLIP-vision penultimate states of the same images
    pooled: torch.Tensor | None = None  # (N, C') pooled text outputs of the captions (SDXL, DiTs), None for SD1.x
    #: (N, T) 1 at the target word's tokens in each caption's context, None without target words
    word_indicators: torch.Tensor | None = None

    def __post_init__(self):
        if not self.latents.shape[0] == self.contexts.shape[0] == self.features.shape[0]:
            raise ValueError("every image needs one caption and one feature row")
        if self.word_indicators is not None and self.word_indicators.shape != self.contexts.shape[:2]:
            raise ValueError("every caption needs one target-word indicator over its context's tokens")

    def captions_of(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text contexts and pooled outputs (None for SD1.x) of the captions of ``rows`` (on the data's device)."""
        return self.contexts[rows], None if self.pooled is None else self.pooled[rows]


class RealCustomStep:
    """The step function of :func:`training.loop.train`: one micro-batch's loss (all randomness from
    the micro-step's generator, so an interrupted and resumed run equals an uninterrupted one).
    ``word_mask``: gate the branch by the target words' masks of these settings (needs word indicators)."""

    def __init__(self, data: TrainingData, projector: torch.nn.Module, denoise: DenoiseFn,
                 sigmas: torch.Tensor, prediction: str, batch_size: int, scoring: AdaptiveScoring | None = None,
                 word_mask: MaskSettings | None = None):
        if word_mask is not None and data.word_indicators is None:
            raise ValueError("word-mask training needs the target word of every caption")
        self.data, self.projector, self.denoise, self.scoring = data, projector, denoise, scoring
        self.sigmas, self.prediction, self.batch_size, self.word_mask = sigmas, prediction, batch_size, word_mask

    def word_masks(self, rows: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
                   settings: MaskSettings) -> torch.Tensor:
        """``(B, H', W')`` masks of the rows' target words on ``x_t``, read from a text-only pass."""
        rows = rows.to(self.data.latents.device)
        capture = WordMapCapture(self.data.word_indicators[rows], settings)
        with torch.no_grad():
            self.denoise(x_t, sigma, *self.data.captions_of(rows), capture)
        return capture.mask()

    def __call__(self, micro: MicroStep) -> torch.Tensor:
        data, device = self.data, self.data.latents.device
        rows = torch.randint(0, data.latents.shape[0], (self.batch_size,), generator=micro.generator).to(device)
        x0 = data.latents[rows]
        sigma, x_t = noised(x0, self.sigmas, micro.generator, self.prediction)
        features = data.features[rows]
        contexts, pooled = data.captions_of(rows)
        if self.word_mask is None:
            mask = torch.ones(self.batch_size, 1, 1, device=device)
        else:
            mask = self.word_masks(rows, x_t, sigma, self.word_mask)
        if self.scoring is not None:
            low, high = TRAINING_KEEP_RANGE
            keep = low + (high - low) * float(torch.rand((), generator=micro.generator))
            latent = model_input(x_t, sigma, flow=self.prediction == FLOW)
            if self.word_mask is not None:
                latent = masked_latent(latent, mask)
            features = self.scoring(features, contexts, latent, alpha_bar(sigma, flow=self.prediction == FLOW), keep)
        run = TrainingRun(ImageTokens(self.projector(features), None), mask=mask)
        denoised = self.denoise(x_t, sigma, contexts, pooled, run)
        return masked_mse(prediction_from_denoised(self.prediction, x_t, denoised, sigma),
                          prediction_from_denoised(self.prediction, x_t, x0, sigma))


def word_scope_preview(step: RealCustomStep, settings: MaskSettings, seed: int) -> torch.Tensor:
    """``(N, H', W')``: what each caption's target word covers on its training image, as
    AdaptiveMaskGuidance's text-only pass reads it, at the middle noise level of the schedule (fixed noise)."""
    data = step.data
    generator = torch.Generator().manual_seed(seed)
    sigma_value = step.sigmas[len(step.sigmas) // 2]
    masks = []
    for start in range(0, data.latents.shape[0], step.batch_size):
        rows = torch.arange(start, min(start + step.batch_size, data.latents.shape[0]), device=data.latents.device)
        x0 = data.latents[rows]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        sigma = sigma_value.to(x0).expand(rows.shape[0])
        masks.append(step.word_masks(rows, add_noise(x0, noise, sigma, step.prediction), sigma, settings))
    return torch.cat(masks)
