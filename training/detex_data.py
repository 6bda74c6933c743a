"""DETEX training data: checked subject images + masks, attribute inputs, aligned augmentation.

Images are ComfyUI-layout float tensors ``[N, H, W, 3]`` in [0, 1]; masks ``[N, H, W]`` (1 = subject).

* :func:`prepare_subject` checks the inputs (3–10 images, one mask per image of the same size, no empty
  mask), binarises and optionally dilates the masks, centre-crops and resizes both to the training
  resolution.
* :func:`attribute_inputs` makes what the attribute mappers see [R] (spec detex.md §2, §3.2): the
  foreground image x ⊙ m (pose mapper) and the background-only image x ⊙ (1 − m) (background mapper),
  both on black as the formulas read, plus their horizontal flips.

Augmentation is Custom Diffusion's, shared with DisenDiff (``training.augmentation``); the subject mask
goes through it with the pixels.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augmentation import center_square

MIN_IMAGES, MAX_IMAGES = 3, 10
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
