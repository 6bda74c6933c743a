"""Diffusion training losses in the model's own prediction space (ε, v or flow velocity), as the papers train.

ComfyUI's samplers work with ``x_t = x0 + σ·ε`` (ε and v models) or ``x_t = (1 − σ)·x0 + σ·ε``
(rectified flow, ComfyUI's CONST sampling: Flux, SD3) and a model wrapper that returns the denoised
``x̂0``. The network's raw prediction is an affine function of ``x̂0`` (for fixed ``x_t`` and ``σ``),
so mapping both ``x̂0`` and the true ``x0`` through :func:`prediction_from_denoised` gives exactly the
LDM-style ε- or v-MSE, or the flow-matching MSE of the velocity ``ε − x0``. ComfyUI's TrainLoraNode
instead takes the MSE in x0 space, which weights timesteps by σ² (ε) and is not what the papers optimise.

Timesteps are drawn uniformly from the model's discrete schedule (LDM's ``t ~ U{0..T-1}``; for the flow
models the shifted sigma table their sampling uses, 1000 entries on SD3, 10000 on Flux).
"""
from __future__ import annotations

from typing import Optional

import torch

EPSILON = "eps"
V_PREDICTION = "v"
#: rectified flow (ComfyUI's CONST model sampling): the network predicts the velocity ε − x0
FLOW = "flow"
PREDICTION_KINDS = (EPSILON, V_PREDICTION, FLOW)


def sample_timesteps(batch: int, generator: torch.Generator, num_timesteps: int) -> torch.Tensor:
    """``batch`` discrete timesteps, uniform over ``0..num_timesteps-1`` (CPU, from ``generator``)."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, kind: str = EPSILON) -> torch.Tensor:
    """ComfyUI's noisy input (σ per sample): ``x_t = x0 + σ·ε`` for ε/v models, ``(1 − σ)·x0 + σ·ε`` for
    rectified flow (``kind`` FLOW)."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise if kind == FLOW else x0 + s * noise


def noised(x0: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator,
           kind: str = EPSILON) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ, x_t)`` of a micro-batch: one uniform discrete timestep per sample of ``x0`` from the schedule
    ``sigmas``, then Gaussian noise (both drawn from ``generator``, in that order), mixed as ``kind`` mixes."""
    t = sample_timesteps(x0.shape[0], generator, len(sigmas))
    sigma = sigmas[t].to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    return sigma, add_noise(x0, noise, sigma, kind)


def prediction_from_denoised(kind: str, x_t: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor,
                             sigma_data: float = 1.0) -> torch.Tensor:
    """The raw network output (ε̂ or v̂) that ComfyUI turned into ``denoised``.

    ε:  ``ε̂ = (x_t − x̂0) / σ``.
    v:  ComfyUI's V_PREDICTION has ``x̂0 = x_t·σd²/(σ²+σd²) − v̂·σ·σd/√(σ²+σd²)``, inverted here.
    flow: ComfyUI's CONST has ``x̂0 = x_t − σ·v̂``: ``v̂ = (x_t − x̂0) / σ`` (the same map as ε's, on the flow's x_t).
    Applied to the true ``x0`` it gives the training target (ε, ``v = α·ε − σ_t·x0``, or the velocity ``ε − x0``).
    """
    s = _per_sample(sigma, x_t)
    if kind in (EPSILON, FLOW):
        return (x_t - denoised) / s
    if kind == V_PREDICTION:
        total = s ** 2 + sigma_data ** 2
        return (x_t * sigma_data ** 2 / total - denoised) * total.sqrt() / (s * sigma_data)
    raise ValueError(f"unsupported prediction type {kind!r}; expected one of {PREDICTION_KINDS}")


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor] = None,
               channel_sum: bool = False) -> torch.Tensor:
    """Per-sample mean squared error over the masked elements, averaged over the batch.

    ``mask`` is ``(B, 1, H, W)`` or ``(B, C, H, W)`` in latent resolution; without a mask this is
    the plain MSE. ``channel_sum``: the error of a pixel is summed over the channels, i.e.
    Custom Diffusion's ``Σ_{c,h,w} e²·M / Σ_{h,w} M`` (C times the per-element mean).
    """
    squared = (prediction.float() - target.float()) ** 2
    if channel_sum:
        squared = squared.sum(dim=1, keepdim=True)
    if mask is None:
        return squared.mean()
    weights = mask.float().expand_as(squared)
    per_sample = (squared * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-8)
    return per_sample.mean()


def diffusion_loss(kind: str, x_t: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                   mask: Optional[torch.Tensor] = None, channel_sum: bool = False) -> torch.Tensor:
    """ε- or v-prediction MSE of a denoiser output (``kind`` from the model's sampling type)."""
    return masked_mse(prediction_from_denoised(kind, x_t, denoised, sigma),
                      prediction_from_denoised(kind, x_t, x0, sigma), mask, channel_sum)


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))
