"""DisenDiff attention calibration (Zhang et al., "Attention Calibration for Disentangled
Text-to-Image Personalization", CVPR 2024): token maps, the calibration losses and the processors.

Maps (spec §3.2 step 5): cross-attention probabilities of one token, averaged over the heads of the
map layers and over those layers, min-max normalised, smoothed by the 3×3 Attend-and-Excite Gaussian
(σ 0.5, whose exponent is ((x−μ)/(2σ))²), and squared for class tokens (the paper's f_m).

Losses (spec §3.2 steps 6–8): soft IoU with smoothing 1; binding ``1 − IoU(sg(C_i), M_i)`` per
concept and separation ``IoU(C_2, C_1)`` (mean over pairs for more than two concepts).

Map layers: the paper uses SD1.5's 16×16 layers at 512 px; ``token_maps.map_block_keys`` picks the
equivalent layers of any U-Net, and ``token_maps.MapRecorder`` captures the maps for the trainer and
the preview.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatcher import CROSS_ATTENTION, AttentionProcessor, sigma_in_range
from .layout import cond_row_indices

IOU_SMOOTHING = 1.0
GAUSSIAN_SIGMA = 0.5


def gaussian_kernel(sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """The 3×3 Attend-and-Excite kernel: separable exp(−((x−μ)/(2σ))²), normalised to sum 1."""
    x = torch.arange(3, dtype=torch.float32) - 1.0
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Gaussian smoothing of ``(..., H, W)`` maps with reflect padding of 1."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    padded = F.pad(flat, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, gaussian_kernel(sigma).to(maps)[None, None]).reshape(shape)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map normalisation of ``(..., H, W)`` to [0, 1] (``absolute=False`` in the official code)."""
    flat = maps.flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low + 1e-8)).reshape(maps.shape)


def process_maps(maps: torch.Tensor, suppress: bool) -> torch.Tensor:
    """mean-aggregated maps → min-max → Gaussian → square for class tokens (f_m)."""
    smoothed = smooth(min_max(maps))
    return smoothed * smoothed if suppress else smoothed


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(Σab + 1) / (Σa + Σb − Σab + 1)`` over the last two dims."""
    inter = (a * b).flatten(-2).sum(-1)
    return (inter + IOU_SMOOTHING) / (a.flatten(-2).sum(-1) + b.flatten(-2).sum(-1) - inter + IOU_SMOOTHING)


def calibration_loss(modifier_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """Per-sample DisenDiff attention loss from aggregated maps of shape ``(B, S, H, W)``, S ≥ 2.

    Binding ``Σ_i 1 − IoU(sg(C_i), M_i)`` plus separation ``IoU(C_2, C_1)`` (two concepts) or its mean
    over all pairs (three or more, as the official 3-concept code).
    """
    concepts = modifier_maps.shape[1]
    if concepts < 2 or class_maps.shape != modifier_maps.shape:
        raise ValueError(f"need matching (B, S>=2, H, W) maps, got {tuple(modifier_maps.shape)}, {tuple(class_maps.shape)}")
    mods = process_maps(modifier_maps, suppress=False)
    classes = process_maps(class_maps, suppress=True)
    binding = (1 - soft_iou(classes.detach(), mods)).sum(1)
    pairs = [(j, i) for i in range(concepts) for j in range(i + 1, concepts)]
    separation = torch.stack([soft_iou(classes[:, j], classes[:, i]) for j, i in pairs], 1).mean(1)
    return binding + separation


@dataclass(frozen=True)
class Concept:
    """Context positions of one concept's modifier and class tokens in the cond prompt."""

    modifier: tuple[int, ...]
    word: tuple[int, ...]


@dataclass(eq=False)
class CalibratedCrossAttention(AttentionProcessor):
    """Sampling-time calibration (goes beyond the paper, which is prompt-only at inference).

    In cond rows of every cross-attention layer in the sigma range, with ``P`` the softmax of the
    logits and ``Ĉ_i`` the head-mean class map of concept i, min-max normalised and squared:
    - binding: ``logits[m_i] += strength · (2Ĉ_i − 1)``, raising the modifier where its class attends;
    - separation: ``logits[m_i ∪ c_i] −= strength · relu(Ĉ_j − Ĉ_i)`` for every other concept j,
      lowering concept i where concept j dominates.
    ``strength`` 0 makes the processor inactive, so sampling is exactly the plain one.
    """

    concepts: tuple[Concept, ...]
    strength: float
    sigma_start: float
    sigma_end: float
    name = "disendiff_calibration"
    node_name = "CalibratedCrossAttn"
    patch_point = CROSS_ATTENTION

    def active(self, call):
        return self.strength != 0 and sigma_in_range(call.sigma, self.sigma_start, self.sigma_end)

    def edit_logits(self, logits, call):
        cond_rows = cond_row_indices(call.cond_or_uncond, logits.shape[0])
        if not cond_rows:
            return logits
        rows = torch.tensor(cond_rows, device=logits.device)
        sub = logits[rows]
        n_keys = sub.shape[-1]
        concepts = [c for c in self.concepts if max(c.modifier + c.word) < n_keys]
        if len(concepts) < 2:
            return logits
        probs = sub.softmax(-1).mean(1)  # (b, Nq, T)
        class_maps = []
        for concept in concepts:
            cmap = probs[..., list(concept.word)].mean(-1)
            low, high = cmap.min(-1, keepdim=True).values, cmap.max(-1, keepdim=True).values
            class_maps.append(((cmap - low) / (high - low + 1e-8)) ** 2)
        edit = torch.zeros_like(sub[:, 0])  # (b, Nq, T)
        for i, concept in enumerate(concepts):
            edit[..., list(concept.modifier)] += (self.strength * (2 * class_maps[i] - 1))[..., None]
            for j, other in enumerate(class_maps):
                if j != i:
                    penalty = (self.strength * (other - class_maps[i]).clamp_min(0))[..., None]
                    edit[..., list(concept.modifier + concept.word)] -= penalty
        edited = logits.clone()
        edited[rows] = sub + edit[:, None]
        return edited
