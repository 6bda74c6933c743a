"""StyleAligned with a real reference image: DDIM inversion and the re-insertion schedule.

Everything works in ComfyUI's sampler space for ε-models, ``x = x0 + σ·ε``, where a DDIM step is
an Euler step in σ. Inversion walks the sampling schedule backwards from the clean latent; as in
the official code, each step predicts the noise at the *next, noisier* level from the current
latent (the standard DDIM-inversion approximation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

#: The official transfer notebook starts the reference 5 steps "ahead" (less noisy) of the targets.
DEFAULT_REFERENCE_OFFSET = 5

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StyleReference:
    """An inverted reference: ``latents[j]`` (C, H, W) is the reference at ``sigmas[j]`` (descending, last 0)."""

    latents: torch.Tensor
    sigmas: torch.Tensor

    @property
    def steps(self) -> int:
        return self.sigmas.shape[0] - 1

    def latent_for(self, sample_sigmas: torch.Tensor, sigma: float, offset: int) -> torch.Tensor:
        """The reference latent to feed at the model call for ``sigma`` of a run over ``sample_sigmas``."""
        self.check_schedule(sample_sigmas)
        index = reinsertion_index(schedule_step(sample_sigmas, sigma), offset, self.steps)
        return self.latents[index]

    def check_schedule(self, sample_sigmas: torch.Tensor) -> None:
        same = sample_sigmas.shape == self.sigmas.shape and torch.allclose(
            sample_sigmas.detach().float().cpu(), self.sigmas.float(), rtol=1e-4, atol=1e-6)
        if not same:
            raise ValueError(
                f"the style reference was inverted over a {self.steps}-step schedule, but this sampler runs "
                f"{sample_sigmas.shape[0] - 1} steps with other noise levels; sample with the same steps and "
                "scheduler as SharedAttentionInvertReference, at denoise 1.0")


def schedule_step(sample_sigmas: torch.Tensor, sigma: float) -> int:
    """Index of the sampling step a model call belongs to (intermediate sigmas of 2nd-order samplers
    belong to the step they start from)."""
    reached = int((sample_sigmas[:-1].float() >= sigma * (1.0 - 1e-5)).sum())
    return max(reached - 1, 0)


def reinsertion_index(step: int, offset: int, steps: int) -> int:
    """Trajectory index of the reference at ``step``: ``offset`` at step 0, then held at
    ``offset + 1`` until the schedule catches up, then the trajectory itself (official schedule)."""
    index = offset if step == 0 else max(offset + 1, step)
    return min(index, steps)


def invert(denoise: Denoiser, clean_latent: torch.Tensor, sigmas: torch.Tensor,
           on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> StyleReference:
    """DDIM-invert ``clean_latent`` (one image, ``(1, C, H, W)``) along the descending sampling
    ``sigmas`` (ending at 0).

    ``denoise(x, sigma_batch)`` returns the model's x0 prediction (CFG included) at noise level sigma.
    """
    if clean_latent.shape[0] != 1:
        raise ValueError(f"a style reference is one image, got a batch of {clean_latent.shape[0]}")
    ascending = sigmas.flip(0)
    x = clean_latent
    latents = [x]
    ones = x.new_ones(x.shape[0])
    for i in range(ascending.shape[0] - 1):
        sigma_now, sigma_next = ascending[i], ascending[i + 1]
        noise = (x - denoise(x, sigma_next * ones)) / sigma_next
        x = x + (sigma_next - sigma_now) * noise
        latents.append(x)
        if on_step is not None:
            on_step(i, x)
    return StyleReference(latents=torch.cat(latents[::-1]), sigmas=sigmas.detach().float().cpu())
