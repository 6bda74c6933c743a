"""A simple subject mask for photos on a plain background ("border keying"), for users without a segmenter.

DETEX needs one subject mask per training image (the paper uses masks from an off-the-shelf segmenter).
When none is at hand, this estimates one with a documented, predictable method:

1. the background colour is the per-channel median of a strip along the image border
   (``border`` = 4 % of the shorter side, at least 1 pixel): the subject is assumed not to touch
   most of the border;
2. a pixel is subject when its largest per-channel difference from that colour exceeds ``threshold``;
3. specks are removed and small gaps closed with a morphological opening and closing of radius
   ``smoothing`` pixels;
4. holes are filled: every pixel that cannot reach the border through background pixels is subject
   (a white shirt on a white backdrop stays part of the subject when it is enclosed).

It works for product shots, studio photos and pets on a plain floor or wall; for cluttered scenes use a
segmentation node (SAM, rembg, GroundingDINO) and feed its MASK instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BORDER_FRACTION = 0.04
#: DecoupledTokenMask's defaults, also used by DecoupledTokenAttributes when no mask is given
DEFAULT_THRESHOLD, DEFAULT_SMOOTHING = 0.12, 2


def _open_close(mask: torch.Tensor, radius: int) -> torch.Tensor:
    if radius <= 0:
        return mask
    size, pad = 2 * radius + 1, radius
    x = mask[None, None]

    def grow(t):
        return F.max_pool2d(t, size, stride=1, padding=pad)

    def shrink(t):
        return -F.max_pool2d(-t, size, stride=1, padding=pad)
    opened = grow(shrink(x))  # removes specks smaller than the square
    return shrink(grow(opened))[0, 0]  # closes gaps narrower than it


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` binary mask with every background region that does not touch the border filled."""
    background = 1 - mask
    reach = torch.zeros_like(mask)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = background[0, :], background[-1, :], background[:, 0], background[:, -1]
    while True:  # flood fill from the border through background pixels; at most H·W rounds, ~max(H, W) in practice
        grown = F.max_pool2d(reach[None, None], 3, stride=1, padding=1)[0, 0] * background
        if torch.equal(grown, reach):
            return 1 - reach
        reach = grown


def border_key_mask(image: torch.Tensor, threshold: float = DEFAULT_THRESHOLD, smoothing: int = DEFAULT_SMOOTHING) -> torch.Tensor:
    """Subject mask ``[H, W]`` in {0, 1} of one image ``[H, W, 3]`` in [0, 1] (module docstring)."""
    height, width = image.shape[:2]
    border = max(1, round(BORDER_FRACTION * min(height, width)))
    rgb = image[..., :3].float()
    strip = torch.cat([rgb[:border].reshape(-1, 3), rgb[-border:].reshape(-1, 3),
                       rgb[:, :border].reshape(-1, 3), rgb[:, -border:].reshape(-1, 3)])
    background = strip.median(dim=0).values
    mask = ((rgb - background).abs().amax(dim=-1) > threshold).float()
    return fill_holes(_open_close(mask, smoothing))


def border_key_masks(images: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                     smoothing: int = DEFAULT_SMOOTHING) -> torch.Tensor:
    """:func:`border_key_mask` of every image of a batch ``[N, H, W, 3]`` → ``[N, H, W]``."""
    return torch.stack([border_key_mask(image, threshold, smoothing) for image in images])
