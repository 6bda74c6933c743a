"""PVA training recipes (Xu et al., WACV 2024; specs/pva.md §3): stage 1 and the per-identity tune.

Both are plain ε/v-MSE of the (inpainting) U-Net (on a DiT: the flow-matching MSE of the velocity) over the
whole latent with the official timestep
binning: an optimizer step reuses one sample for ``bins`` micro-batches whose timesteps come from
consecutive equal slices of the schedule ([0, T/bins), [T/bins, 2T/bins), …). The sample (target,
flip, references) is drawn once per step; noise and timestep per micro-batch.

Targets are visited in order (photo ``step mod n``), so interrupted runs resume exactly. References:
- tune (official ``RotatingTensorDataset``): the identity's other photos (each flipped with p = 0.5)
  plus a flipped copy of the last one; a single photo is referenced by its own flipped copy;
- stage 1 (official ``pva_train.py``): up to 5 other photos of the identity in random order, a random
  prefix of 1..5 of them, and with p = 0.2 a flipped copy of the last appended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .loop import MicroStep, micro_step_generator
from .losses import add_noise, diffusion_loss

#: the face box of a CelebA-HQ-aligned square photo as fractions (top, bottom, left, right) of its side:
#: the official ArcFace crop (rows 35:223, columns 32:220 of the 256² resize). The official tune masks a
#: landmark-derived whole-face box; with aligned photos this fixed box stands in for the landmarks.
WHOLE_FACE = (35 / 256, 223 / 256, 32 / 256, 220 / 256)


def face_box_mask(height: int, width: int, box: tuple[float, float, float, float] = WHOLE_FACE) -> torch.Tensor:
    """``(H, W)`` mask, 1 inside ``box`` (the region to inpaint, as ComfyUI's masks)."""
    top, bottom, left, right = box
    mask = torch.zeros(height, width)
    mask[round(top * height):round(bottom * height), round(left * width):round(right * width)] = 1.0
    return mask


def binned_timestep(bin_index: int, bins: int, num_timesteps: int, generator: torch.Generator) -> int:
    """A timestep uniform in the ``bin_index``-th of ``bins`` equal slices of ``0..num_timesteps-1``."""
    size = num_timesteps // bins
    return int(torch.randint(bin_index * size, (bin_index + 1) * size, (1,), generator=generator))


def rotating_references(target: int, group: tuple[int, ...], generator: torch.Generator) -> list[tuple[int, bool]]:
    """(photo index, flipped) references of ``target`` in the per-identity tune."""
    others = [(i, bool(torch.rand((), generator=generator) < 0.5)) for i in group if i != target]
    if not others:
        return [(target, True)]
    last, flipped = others[-1]
    return others + [(last, not flipped)]


def stage1_references(target: int, group: tuple[int, ...], generator: torch.Generator,
                      most: int = 5) -> list[tuple[int, bool]]:
    """(photo index, flipped) references of ``target`` in stage-1 training."""
    others = [i for i in group if i != target]
    if not others:
        return [(target, True)]
    order = [others[i] for i in torch.randperm(len(others), generator=generator)[:most].tolist()]
    chosen = [(i, False) for i in order[:int(torch.randint(1, len(order) + 1, (1,), generator=generator))]]
    if torch.rand((), generator=generator) < 0.2:
        chosen.append((chosen[-1][0], True))
    return chosen


@dataclass
class IdentityPhotos:
    """The encoded photos of one identity; index ``[i, f]`` = photo i, flipped if f (f ∈ {0, 1})."""

    latents: torch.Tensor  # (n, 2, C, h, w) clean latents, model space
    masked_latents: torch.Tensor  # (n, 2, C, h, w) latents of the masked photos (VAE space)
    masks: torch.Tensor  # (n, 2, 1, h, w) latent-resolution inpainting masks
    features: torch.Tensor  # (n, 2, F) identity-encoder features

    @property
    def count(self) -> int:
        return self.latents.shape[0]


@dataclass
class PVAStep:
    """One micro-batch of PVA training (``training.loop`` step function).

    ``identity_tokens(features (1, R, F), generator) -> (1, N, C)`` (with gradients in stage 1, where
    the token transformer trains), ``context()`` (text with the identity word under training, handed
    to ``denoise`` as is: the node's is the ``(1, L, C)`` tokens and the pooled output),
    ``concat(x_t, masked_latent, mask) -> c_concat | None`` (inpainting channels),
    ``denoise(x_t, sigma, context, tokens, c_concat) -> x̂0``; ``references`` is
    :func:`rotating_references` or :func:`stage1_references`; ``groups`` are the photo indices of each
    identity.
    """

    photos: IdentityPhotos
    groups: tuple[tuple[int, ...], ...]
    references: Callable[[int, tuple[int, ...], torch.Generator], list[tuple[int, bool]]]
    identity_tokens: Callable[[torch.Tensor, torch.Generator], torch.Tensor]
    context: Callable[[], object]
    concat: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Optional[torch.Tensor]]
    denoise: Callable[..., torch.Tensor]
    sigmas: torch.Tensor  # σ of every discrete timestep
    kind: str  # "eps", "v" or "flow" (training.losses)
    bins: int
    seed: int

    def __call__(self, micro: MicroStep) -> torch.Tensor:
        photos, generator = self.photos, micro.generator
        sample = micro_step_generator(self.seed, micro.step, -1)  # shared by the micro-batches of a step
        target = micro.step % photos.count
        group = next(g for g in self.groups if target in g)
        flip = int(torch.rand((), generator=sample) < 0.5)
        references = self.references(target, group, sample)
        features = torch.stack([photos.features[i, int(f)] for i, f in references])[None]
        t = binned_timestep(micro.micro % self.bins, self.bins, len(self.sigmas), generator)
        x0 = photos.latents[target, flip][None]
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        sigma = self.sigmas[t:t + 1].to(x0)
        x_t = add_noise(x0, noise, sigma, self.kind)
        c_concat = self.concat(x_t, photos.masked_latents[target, flip][None], photos.masks[target, flip][None])
        tokens = self.identity_tokens(features, generator)
        denoised = self.denoise(x_t, sigma, self.context(), tokens, c_concat)
        return diffusion_loss(self.kind, x_t, denoised, x0, sigma)
