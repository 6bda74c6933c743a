"""DETEX's masked diffusion loss and its joint-training branches.

Joint training [R] (spec detex.md §3.3): each training sample takes one of two branches at random.

* ``FULL``: the prompt holds [V], the image's pose word [P_i] and background word [B_i]; the
  ε-MSE covers the whole latent (times Custom Diffusion's augmentation mask).
* ``SUBJECT``: the background clause is dropped from the prompt and the ε-MSE is masked to the
  subject, so the background can only be explained by [B_i] and [V] never has to paint it.

The masked loss follows Break-A-Scene (which DETEX cites for it, App. B.1): prediction and target are
multiplied by the mask, downsampled to the latent size with nearest-neighbour interpolation, and the
MSE is the mean over *all* elements (``ALL_ELEMENTS``), so a small subject weighs less. The switchable
alternative ``MASK_AREA`` averages over the masked elements only (Custom Diffusion's augmentation-mask
normalisation, ``training.losses.masked_mse``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import masked_mse

FULL = "full"
SUBJECT = "subject"
BRANCHES = (FULL, SUBJECT)

ALL_ELEMENTS = "all elements"
MASK_AREA = "mask area"
MASK_NORMALIZATIONS = (ALL_ELEMENTS, MASK_AREA)


def choose_branches(count: int, subject_probability: float, generator: torch.Generator) -> list[str]:
    """One branch per sample: ``SUBJECT`` with probability ``subject_probability``, else ``FULL``."""
    if not 0.0 <= subject_probability <= 1.0:
        raise ValueError(f"subject branch probability must lie in [0, 1], got {subject_probability}")
    draws = torch.rand(count, generator=generator)
    return [SUBJECT if float(d) < subject_probability else FULL for d in draws]


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask ``[B, H, W]`` → ``[B, 1, h, w]`` at latent size, nearest-neighbour (Break-A-Scene)."""
    if mask.ndim != 3:
        raise ValueError(f"expected masks [batch, height, width], got {tuple(mask.shape)}")
    return F.interpolate(mask[:, None].float(), size=size, mode="nearest")


def masked_diffusion_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                         normalization: str = ALL_ELEMENTS) -> torch.Tensor:
    """MSE of ``prediction`` vs ``target`` (``[B, C, h, w]``) restricted to ``mask`` (``[B, 1, h, w]``)."""
    if normalization == ALL_ELEMENTS:
        weights = mask.to(prediction.dtype)
        return F.mse_loss((prediction * weights).float(), (target * weights).float(), reduction="mean")
    if normalization == MASK_AREA:
        return masked_mse(prediction, target, mask)
    raise ValueError(f"mask normalization must be one of {MASK_NORMALIZATIONS}, got {normalization!r}")
