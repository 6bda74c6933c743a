"""RealCustom image-branch training (Huang et al., CVPR 2024, §3.2 eq. 4), for this pack's CLIP-vision format.

Everything pre-trained is frozen (U-Net, text encoder, image encoder); only the projector and the
visual key/value projections of every cross-attention layer learn. Each training image is its own
reference, the branch is ungated (eq. 4 has no mask; the mask only exists at inference), and the loss
is the plain ε- (or v-) MSE of the frozen U-Net with the branch added.

With ``scoring`` (the paper's adaptive scoring module, absent from the released model) the image
features of each sample are scored from its caption, its noisy latent and its timestep, weighted and cut
to a random share γ_num ~ U[0.3, 1] of the tokens before the projector, so the score nets learn with the
rest (paper §3.2).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention.realcustom import ImageTokens, UngatedRun
from ..attention.realcustom_scoring import TRAINING_KEEP_RANGE, AdaptiveScoring, alpha_bar, model_input
from .loop import MicroStep
from .losses import masked_mse, noised, prediction_from_denoised

#: denoise(x_t, sigma, context, pooled, run) -> the frozen U-Net's x̂0 with the image branch of ``run``
#: (``pooled``: the captions' pooled text outputs for models that read them (SDXL), else None)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", UngatedRun], torch.Tensor]


@dataclass(frozen=True)
class TrainingData:
    """The encoded dataset: one row per image (all on the training device)."""

    latents: torch.Tensor   # (N, 4, h, w) VAE latents (scaled as the model expects)
    contexts: torch.Tensor  # (N, T, C) text contexts of the captions
    features: torch.Tensor  # (N, P, D) CLIP-vision penultimate states of the same images
    pooled: torch.Tensor | None = None  # (N, C') pooled text outputs of the captions (SDXL), None for SD1.x

    def __post_init__(self):
        if not self.latents.shape[0] == self.contexts.shape[0] == self.features.shape[0]:
            raise ValueError("every image needs one caption and one feature row")


class RealCustomStep:
    """The step function of :func:`training.loop.train`: one micro-batch's loss (all randomness from
    the micro-step's generator, so an interrupted and resumed run equals an uninterrupted one)."""

    def __init__(self, data: TrainingData, projector: torch.nn.Module, denoise: DenoiseFn,
                 sigmas: torch.Tensor, prediction: str, batch_size: int, scoring: AdaptiveScoring | None = None):
        self.data, self.projector, self.denoise, self.scoring = data, projector, denoise, scoring
        self.sigmas, self.prediction, self.batch_size = sigmas, prediction, batch_size

    def __call__(self, micro: MicroStep) -> torch.Tensor:
        data, device = self.data, self.data.latents.device
        rows = torch.randint(0, data.latents.shape[0], (self.batch_size,), generator=micro.generator)
        x0 = data.latents[rows.to(device)]
        sigma, x_t = noised(x0, self.sigmas, micro.generator)
        features, contexts = data.features[rows.to(device)], data.contexts[rows.to(device)]
        if self.scoring is not None:
            low, high = TRAINING_KEEP_RANGE
            keep = low + (high - low) * float(torch.rand((), generator=micro.generator))
            features = self.scoring(features, contexts, model_input(x_t, sigma), alpha_bar(sigma), keep)
        tokens = self.projector(features)
        run = UngatedRun(ImageTokens(tokens, None), mask=torch.ones(self.batch_size, 1, 1, device=device))
        pooled = None if data.pooled is None else data.pooled[rows.to(device)]
        denoised = self.denoise(x_t, sigma, contexts, pooled, run)
        return masked_mse(prediction_from_denoised(self.prediction, x_t, denoised, sigma),
                          prediction_from_denoised(self.prediction, x_t, x0, sigma))
