"""DETEX's masked diffusion loss and its joint-training branches.

Joint training [R] (spec detex.md §3.3): each training sample takes one of two branches at random.

* ``FULL``: the prompt holds [V], the image's pose word [P_i] and background word [B_i]; the
  ε-MSE is the mean over the latent elements Custom Diffusion's augmentation mask keeps.
* ``SUBJECT``: the background clause is dropped from the prompt and the ε-MSE is masked to the
  subject, so the background can only be explained by [B_i] and [V] never has to paint it.

The masked loss follows Break-A-Scene (which DETEX cites for it, App. B.1): prediction and target are
multiplied by the mask, downsampled to the latent size with nearest-neighbour interpolation, and the
MSE is the mean over *all* elements (``ALL_ELEMENTS``), so a small subject weighs less. The switchable
alternative ``MASK_AREA`` averages over the masked elements only (``training.losses.masked_mse``, the
normalisation of the full branch). Neither sums over the latent channels as Custom Diffusion's instance
loss does (``channel_sum``), so all branches are per-element means (spec §3.3 [R]).

Optional attention regulariser [R] (spec §3.3; Break-A-Scene's, **not confirmed for DETEX**, off by
default): :func:`attention_mask_loss` compares the max-normalised aggregated cross-attention map of
[V] with the subject mask and that of [B_i] with the background, weighted by λ = 0.01.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .losses import masked_mse

FULL = "full"
SUBJECT = "subject"
BRANCHES = (FULL, SUBJECT)

#: Break-A-Scene's λ_attention, the weight of :func:`attention_mask_loss` when the regulariser is on
ATTENTION_LOSS_WEIGHT = 0.01

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


def attention_mask_loss(token_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Break-A-Scene's attention loss of one sample: ``Σ_k MSE(map_k / max(map_k), mask_k)``.

    ``token_maps`` ``[K, h, w]``: the aggregated cross-attention map of each regularised word (head and
    map-layer mean); ``masks`` ``[K, H, W]``: where each word should attend, brought to the map size by
    nearest-neighbour interpolation (Break-A-Scene's ``F.interpolate`` default). The MSE is the mean over
    the map; the words' terms are summed, as Break-A-Scene sums over the masks of a sample.
    """
    if token_maps.ndim != 3 or masks.ndim != 3 or masks.shape[0] != token_maps.shape[0]:
        raise ValueError(f"need maps [K, h, w] and masks [K, H, W], got {tuple(token_maps.shape)}, {tuple(masks.shape)}")
    targets = F.interpolate(masks[:, None].float(), size=token_maps.shape[-2:], mode="nearest")[:, 0]
    normalised = token_maps.float() / token_maps.float().flatten(1).max(1).values[:, None, None]
    return ((normalised - targets.to(normalised.device)) ** 2).flatten(1).mean(1).sum()
