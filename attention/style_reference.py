"""StyleAligned with a real reference image: DDIM inversion and the re-insertion schedule.

The trajectory is stored in ComfyUI's sampler space, one latent per level of the sampling schedule, so
image 0 of a batch can be replaced by it at every step. :func:`invert_eps` is the official inversion of
ε- (and v-) prediction models, whose schedule is variance preserving; :func:`invert_flow` its counterpart for
rectified-flow models (Flux, SD3/SD3.5).
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


def _vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """``√(1 + σ²) = 1/√ᾱ``: a VP latent ``z`` at noise level σ is ComfyUI's sampler latent ``x = z·√(1 + σ²)``."""
    return (1.0 + sigma * sigma).sqrt()


def invert_eps(denoise: Denoiser, clean_latent: torch.Tensor, sigmas: torch.Tensor, clean_sigma: torch.Tensor,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> StyleReference:
    """DDIM-invert ``clean_latent`` (one image, ``(1, C, H, W)``) of an ε- or v-prediction model along the
    descending sampling ``sigmas`` (ending at 0): the official loop (``inversion.py``'s ``_ddim_loop``).

    ``denoise(x, sigma_batch)`` is ComfyUI's model call (CFG included): it scales its input by
    ``1/√(1 + σ²)`` before the U-Net and returns the x0 prediction. The official loop works on VP latents
    ``z = √ᾱ·x0 + √(1 − ᾱ)·ε``: it takes the clean latent as the latent at ᾱ_0 (the first training
    timestep, ``clean_sigma`` = the model's smallest σ), and each step evaluates the noise at the current
    latent with the next timestep, ``ε = ε_θ(z_now, t_next)``, then moves with DDIM's update
    ``z_next = √ᾱ_next·(z_now − √(1 − ᾱ_now)·ε)/√ᾱ_now + √(1 − ᾱ_next)·ε``. In σ space that update is
    ``x_next = x_now + (σ_next − σ_now)·ε``; the U-Net must still see ``z_now``, so the model gets
    ``x_now·√(1 + σ_next²)/√(1 + σ_now²)`` at ``σ_next``.
    """
    _check_one_image(clean_latent)
    levels = sigmas.flip(0).to(clean_latent)
    levels[0] = clean_sigma
    x = clean_latent * _vp_scale(levels[0])
    latents = [clean_latent]
    ones = x.new_ones(x.shape[0])
    for i in range(levels.shape[0] - 1):
        sigma_now, sigma_next = levels[i], levels[i + 1]
        model_input = x * (_vp_scale(sigma_next) / _vp_scale(sigma_now))
        noise = (model_input - denoise(model_input, sigma_next * ones)) / sigma_next
        x = x + (sigma_next - sigma_now) * noise
        latents.append(x)
        if on_step is not None:
            on_step(i, x)
    return StyleReference(latents=torch.cat(latents[::-1]), sigmas=sigmas.detach().float().cpu())


def invert_flow(denoise: Denoiser, clean_latent: torch.Tensor, sigmas: torch.Tensor,
                on_step: Optional[Callable[[int, torch.Tensor], None]] = None) -> StyleReference:
    """Invert ``clean_latent`` (one image) of a rectified-flow model along the descending sampling ``sigmas``
    (ending at 0): the Euler ODE of the sampler run backwards, in the model's own sigma schedule.

    Rectified flow (ComfyUI's CONST sampling: ``x_σ = (1 − σ)·x0 + σ·ε``, model input unscaled) samples with
    ``x_next = x_now + (σ_next − σ_now)·v(x_now, σ_now)``, ``v = (x − D(x, σ))/σ``. Run backwards from the clean
    latent at σ = 0, each step needs the velocity at the noisier level before the latent there is known; as
    DDIM inversion does with the noise, it is taken at the current latent with the next level,
    ``v = v_θ(x_now, σ_next)``, so the model is never asked at σ = 0. ``denoise(x, sigma_batch)`` is ComfyUI's
    model call (CFG included), returning the x0 prediction.
    """
    _check_one_image(clean_latent)
    levels = sigmas.flip(0).to(clean_latent)
    x = clean_latent
    latents = [clean_latent]
    ones = x.new_ones(x.shape[0])
    for i in range(levels.shape[0] - 1):
        sigma_now, sigma_next = levels[i], levels[i + 1]
        velocity = (x - denoise(x, sigma_next * ones)) / sigma_next
        x = x + (sigma_next - sigma_now) * velocity
        latents.append(x)
        if on_step is not None:
            on_step(i, x)
    return StyleReference(latents=torch.cat(latents[::-1]), sigmas=sigmas.detach().float().cpu())


def _check_one_image(clean_latent: torch.Tensor) -> None:
    if clean_latent.shape[0] != 1:
        raise ValueError(f"a style reference is one image, got a batch of {clean_latent.shape[0]}")
