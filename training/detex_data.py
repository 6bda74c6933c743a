"""DETEX training data: checked subject images + masks, attribute inputs, aligned augmentation.

Images are ComfyUI-layout float tensors ``[N, H, W, 3]`` in [0, 1]; masks ``[N, H, W]`` (1 = subject).

* :func:`prepare_subject` checks the inputs (3–10 images, one mask per image of the same size, no empty
  mask), binarises and optionally dilates the masks, centre-crops and resizes both to the training
  resolution.
* :func:`attribute_inputs` makes what the attribute mappers see [R] (spec detex.md §2, §3.2): the
  foreground image x ⊙ m (pose mapper) and the background-only image x ⊙ (1 − m) (background mapper),
  both on black as the formulas read, plus their horizontal flips.
* :func:`draw_sample` is Custom Diffusion's ``MaskBase`` augmentation (the codebase DETEX builds on):
  random flip (p = 1/2), then with p = 2/3 a scale s ∈ [size/3, size], with p = 1/3 s ∈ [1.2, 1.4]·size
  (even). s < 0.6·size: the image shrinks onto a mid-grey canvas, the caption gets "a far away " or
  "very small ", and the loss mask covers the pasted box shrunk by one latent pixel; s > size: a random
  crop of the enlarged image with "zoomed in " or "close up "; otherwise unchanged. The subject mask
  goes through the same flip, scale, paste and crop, so it stays aligned with the pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

MIN_IMAGES, MAX_IMAGES = 3, 10
FAR_PREFIXES = ("a far away ", "very small ")
CLOSE_PREFIXES = ("zoomed in ", "close up ")
#: Custom Diffusion pastes shrunk images on zeros in [-1, 1] pixel space, i.e. mid-grey
CANVAS_GREY = 0.5
log = logging.getLogger(__name__)


class SubjectDataError(ValueError):
    """The training images or masks cannot be used (count, size, empty mask)."""


@dataclass(frozen=True)
class SubjectImages:
    images: torch.Tensor  # [N, S, S, 3] in [0, 1]
    masks: torch.Tensor  # [N, S, S] in {0, 1}

    @property
    def count(self) -> int:
        return self.images.shape[0]


@dataclass(frozen=True)
class TrainingSample:
    pixels: torch.Tensor  # [S, S, 3]
    subject_mask: torch.Tensor  # [S, S], aligned with pixels
    valid_mask: torch.Tensor  # [S/f, S/f] latent-resolution loss mask of the augmentation
    prefix: str
    flipped: bool


def _as_batch(masks: torch.Tensor) -> torch.Tensor:
    return masks[None] if masks.ndim == 2 else masks


def dilate(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow (``pixels`` > 0) or shrink (< 0) binary masks ``[N, H, W]`` by a square of that radius."""
    if pixels == 0:
        return masks
    size = 2 * abs(pixels) + 1
    if pixels > 0:
        return F.max_pool2d(masks[:, None], size, stride=1, padding=abs(pixels))[:, 0]
    return -F.max_pool2d(-masks[:, None], size, stride=1, padding=abs(pixels))[:, 0]


def center_square(images: torch.Tensor, resolution: int, mode: str) -> torch.Tensor:
    """``[N, H, W, C]`` → ``[N, R, R, C]``: centre crop to a square, then resize (as Custom Diffusion)."""
    height, width = images.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[:, top:top + side, left:left + side].movedim(-1, 1)
    if side != resolution:
        antialias = mode in ("bilinear", "bicubic") and resolution < side
        square = F.interpolate(square, size=(resolution, resolution), mode=mode,
                               **({"align_corners": False, "antialias": antialias} if mode != "nearest" else {}))
    return square.movedim(1, -1)


def prepare_subject(images: torch.Tensor, masks: torch.Tensor, resolution: int, mask_dilation: int = 0,
                    min_images: int = MIN_IMAGES, max_images: int = MAX_IMAGES) -> SubjectImages:
    """Check and normalise the subject's images and masks (see the module docstring)."""
    if images.ndim != 4 or images.shape[-1] < 3:
        raise SubjectDataError(f"images must be an IMAGE batch [N, H, W, 3], got {tuple(images.shape)}")
    count = images.shape[0]
    if not min_images <= count <= max_images:
        raise SubjectDataError(f"DETEX trains on {min_images} to {max_images} images of one subject, got {count}; "
                               "batch the images with a Batch Images node (or load a folder).")
    masks = _as_batch(masks)
    if masks.ndim != 3 or masks.shape[0] != count or masks.shape[1:] != images.shape[1:3]:
        raise SubjectDataError(
            f"need one mask per image with the image's size: {count} images of {tuple(images.shape[1:3])} (H, W), "
            f"but the masks are {tuple(masks.shape)} ([N, H, W]). Make the masks from these exact images "
            "(e.g. with DecoupledTokenMask) or resize them to match.")
    binary = (masks.float() > 0.5).float()
    binary = dilate(binary, mask_dilation)
    empty = [i for i in range(count) if not bool(binary[i].any())]
    if empty:
        raise SubjectDataError(f"the mask of image(s) {empty} (0-based) is empty; every mask must mark the subject "
                               "(white = subject). Check the mask order and threshold, or lower the erosion.")
    full = [i for i in range(count) if bool(binary[i].all())]
    if full:
        log.warning("DETEX: the mask of image(s) %s covers the whole image, so their background word learns nothing.", full)
    pixels = center_square(images[..., :3].float(), resolution, "bicubic").clamp(0, 1)
    square_masks = (center_square(binary[..., None], resolution, "bilinear")[..., 0] > 0.5).float()
    return SubjectImages(pixels, square_masks)


def split_foreground(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x ⊙ m, x ⊙ (1 − m)) for images ``[N, H, W, 3]`` and masks ``[N, H, W]``: subject and background on black."""
    masks = masks[..., None].to(images.dtype)
    return images * masks, images * (1 - masks)


def attribute_inputs(subject: SubjectImages) -> dict[str, torch.Tensor]:
    """Mapper inputs ``{"pose": x ⊙ m, "background": x ⊙ (1 − m)}``, each ``[N, 2, S, S, 3]`` (unflipped, flipped)."""
    foreground, background = split_foreground(subject.images, subject.masks)
    return {name: torch.stack([x, x.flip(2)], dim=1) for name, x in (("pose", foreground), ("background", background))}


def _randint(low: int, high_inclusive: int, generator: torch.Generator) -> int:
    return int(torch.randint(low, high_inclusive + 1, (1,), generator=generator))


def _resize(x: torch.Tensor, side: int, mode: str) -> torch.Tensor:
    """``[H, W, C]`` → ``[side, side, C]``."""
    kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": side < x.shape[0]}
    return F.interpolate(x.movedim(-1, 0)[None], size=(side, side), mode=mode, **kwargs)[0].movedim(0, -1)


def _pasted_box(latent: int, factor: int, cy: int, cx: int, half: int, shrink: int) -> torch.Tensor:
    """Latent-resolution mask of a pasted square, shrunk by ``shrink`` latent pixels per side (as Custom Diffusion)."""
    box = torch.zeros(latent, latent)
    box[(cy - half) // factor + shrink:(cy + half) // factor - shrink,
        (cx - half) // factor + shrink:(cx + half) // factor - shrink] = 1
    return box


def draw_sample(pixels: torch.Tensor, subject_mask: torch.Tensor, generator: torch.Generator,
                augment: bool = True, latent_factor: int = 8, flip: Optional[bool] = None) -> TrainingSample:
    """One training view of a square image ``[S, S, 3]`` and its mask ``[S, S]`` (module docstring);
    ``flip`` forces the mirror image on or off instead of drawing it."""
    size = pixels.shape[0]
    latent = size // latent_factor
    flipped = bool(torch.rand(1, generator=generator) < 0.5) if flip is None else flip
    if flipped:
        pixels, subject_mask = pixels.flip(1), subject_mask.flip(1)
    valid = torch.ones(latent, latent)
    if not augment:
        return TrainingSample(pixels, subject_mask, valid, "", flipped)
    if _randint(0, 2, generator) < 2:
        scale = _randint(size // 3, size, generator)
    else:
        scale = _randint(int(1.2 * size), int(1.4 * size) - 1, generator)
    scale += scale % 2
    both = torch.cat([pixels, subject_mask[..., None]], dim=-1)
    if scale < 0.6 * size:
        prefix = FAR_PREFIXES[_randint(0, 1, generator)]
        half = scale // 2
        cy, cx = _randint(half, size - half, generator), _randint(half, size - half, generator)
        canvas = torch.cat([torch.full((size, size, 3), CANVAS_GREY), torch.zeros(size, size, 1)], dim=-1)
        canvas[cy - half:cy + half, cx - half:cx + half] = _resize(both, scale, "bilinear")
        both = canvas
        valid = _pasted_box(latent, latent_factor, cy, cx, half, shrink=1)
        if not bool(valid.any()):  # only at tiny resolutions (never at 512): keep the box unshrunk
            valid = _pasted_box(latent, latent_factor, cy, cx, half, shrink=0)
    elif scale > size:
        prefix = CLOSE_PREFIXES[_randint(0, 1, generator)]
        half = size // 2
        cy, cx = _randint(half, scale - half, generator), _randint(half, scale - half, generator)
        both = _resize(both, scale, "bilinear")[cy - half:cy + half, cx - half:cx + half]
    else:
        prefix = ""
    return TrainingSample(both[..., :3].clamp(0, 1), (both[..., 3] > 0.5).float(), valid, prefix, flipped)
