"""Custom Diffusion's image preparation and ``MaskBase`` augmentation (Kumari et al., CVPR 2023), shared
by the trainers built on it (DisenDiff, DETEX).

:func:`center_square` centre-crops images to a square at the training resolution. :func:`draw_view` makes one view of a square image ``[S, S, 3]`` in [0, 1]: random flip (:func:`draw_flip`, p = 1/2), then
with p = 2/3 a scale s ∈ [S/3, S], with p = 1/3 s ∈ [1.2, 1.4)·S (even). s < 0.6·S: the image shrinks
onto a mid-grey canvas at a random centre, the caption gets "a far away " or "very small ", and the
loss mask covers the pasted box shrunk by one latent pixel; s > S: a random crop of the enlarged image
with "zoomed in " or "close up "; otherwise unchanged. An optional subject mask ``[S, S]`` goes through
the same flip, scale, paste and crop, so it stays aligned with the pixels (DETEX's masked loss).
``MaskBase`` flips regularisation images too (p = 1/2, no scale): :func:`encode_both_ways` encodes them
once as they are and mirrored, and a training step picks one orientation per sample with :func:`draw_flip`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

FAR_PREFIXES = ("a far away ", "very small ")
CLOSE_PREFIXES = ("zoomed in ", "close up ")
#: Custom Diffusion pastes shrunk images on zeros in [-1, 1] pixel space, i.e. mid-grey
CANVAS_GREY = 0.5


@dataclass(frozen=True)
class AugmentedView:
    pixels: torch.Tensor  # [S, S, 3]
    valid_mask: torch.Tensor  # [S/f, S/f] latent-resolution loss mask of the augmentation
    prefix: str  # caption prefix
    flipped: bool
    subject_mask: Optional[torch.Tensor] = None  # [S, S], aligned with pixels, when one was given


def _randint(low: int, high_inclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=generator))


def draw_flip(generator: torch.Generator) -> bool:
    """Custom Diffusion's random horizontal flip (p = 1/2) of a training or regularisation image."""
    return bool(torch.rand(1, generator=generator) < 0.5)


def encode_both_ways(encode: Callable[[torch.Tensor], torch.Tensor],
                     images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of images ``[N, S, S, C]`` as they are and mirrored (``encode``: pixels → latents)."""
    latents = encode(torch.cat([images, images.flip(2)]))
    return latents[:images.shape[0]], latents[images.shape[0]:]


def resize_square(images: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """Square images ``[N, S, S, C]`` → ``[N, side, side, C]`` (antialiased when shrinking)."""
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": side < images.shape[1]}
    return F.interpolate(images.movedim(-1, 1), size=(side, side), mode=mode, **kwargs).movedim(1, -1)


def center_square(images: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """``[N, H, W, C]`` → ``[N, R, R, C]``: centre crop to a square, then resize (as Custom Diffusion)."""
    height, width = images.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[:, top:top + side, left:left + side]
    return square if side == resolution else resize_square(square, resolution, mode)


def _pasted_box(latent: int, factor: int, cy: int, cx: int, half: int, shrink: int) -> torch.Tensor:
    """Latent-resolution mask of a pasted square, shrunk by ``shrink`` latent pixels per side (as Custom Diffusion)."""
    box = torch.zeros(latent, latent)
    box[(cy - half) // factor + shrink:(cy + half) // factor - shrink,
        (cx - half) // factor + shrink:(cx + half) // factor - shrink] = 1
    return box


def draw_view(pixels: torch.Tensor, generator: torch.Generator, subject_mask: Optional[torch.Tensor] = None,
              augment: bool = True, latent_factor: int = 8, flip: Optional[bool] = None) -> AugmentedView:
    """One training view (module docstring); ``augment`` False only flips; ``flip`` forces the mirror
    image on or off instead of drawing it."""
    size = pixels.shape[0]
    latent = size // latent_factor
    flipped = draw_flip(generator) if flip is None else flip
    # the mask rides along as a fourth channel, so every transform below moves both alike
    both = pixels if subject_mask is None else torch.cat([pixels, subject_mask[..., None]], dim=-1)
    if flipped:
        both = both.flip(1)
    valid = torch.ones(latent, latent)
    prefix = ""
    if augment:
        if _randint(0, 2, generator) < 2:
            scale = _randint(size // 3, size, generator)
        else:
            scale = _randint(int(1.2 * size), int(1.4 * size) - 1, generator)
        scale += scale % 2
        if scale < 0.6 * size:
            prefix = FAR_PREFIXES[_randint(0, 1, generator)]
            half = scale // 2
            cy, cx = _randint(half, size - half, generator), _randint(half, size - half, generator)
            canvas = torch.zeros(size, size, both.shape[-1])
            canvas[..., :3] = CANVAS_GREY
            canvas[cy - half:cy + half, cx - half:cx + half] = resize_square(both[None], scale, "bilinear")[0]
            both = canvas
            valid = _pasted_box(latent, latent_factor, cy, cx, half, shrink=1)
            if not bool(valid.any()):  # only at tiny resolutions (never at 512): keep the box unshrunk
                valid = _pasted_box(latent, latent_factor, cy, cx, half, shrink=0)
        elif scale > size:
            prefix = CLOSE_PREFIXES[_randint(0, 1, generator)]
            half = size // 2
            cy, cx = _randint(half, scale - half, generator), _randint(half, scale - half, generator)
            both = resize_square(both[None], scale, "bilinear")[0][cy - half:cy + half, cx - half:cx + half]
    mask = None if subject_mask is None else (both[..., 3] > 0.5).float()
    return AugmentedView(both[..., :3].clamp(0, 1), valid, prefix, flipped, mask)


def draw_views(pixels: torch.Tensor, generator: torch.Generator, count: int,
               subject_mask: Optional[torch.Tensor] = None) -> list[AugmentedView]:
    """``count`` augmented views; ``count`` 0 turns augmentation off: the image and its mirror image."""
    if count == 0:
        return [draw_view(pixels, generator, subject_mask, augment=False, flip=flip) for flip in (False, True)]
    return [draw_view(pixels, generator, subject_mask) for _ in range(count)]
