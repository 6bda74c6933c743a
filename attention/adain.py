"""AdaIN over tokens, as StyleAligned implements it."""
from __future__ import annotations

import torch

ADAIN_EPS = 1e-5


def token_statistics(x: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the token axis (-2); unbiased variance, ``eps`` inside the root."""
    mean = x.mean(dim=-2, keepdim=True)
    std = (x.var(dim=-2, keepdim=True, unbiased=True) + eps).sqrt()
    return mean, std


def adain(x: torch.Tensor, reference: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Normalise ``x`` to the reference's per-channel token statistics (shapes broadcast on batch)."""
    mean, std = token_statistics(x, eps)
    ref_mean, ref_std = token_statistics(reference, eps)
    return (x - mean) / std * ref_std + ref_mean
