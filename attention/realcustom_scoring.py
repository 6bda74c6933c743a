"""RealCustom's adaptive scoring module (Huang et al., CVPR 2024, §3.2; spec realcustom.md §3). Paper
only: the released model has none, so only adapters trained by this pack with it carry one.

It picks and weights the reference's image tokens for the current step: a text context (attention
pooling of the prompt's features) and a visual context (attention pooling of the noisy latent, masked
by the word mask at inference) each score every image token through a small MLP; the scores are fused
by the timestep, ``S = (1 − ᾱ_t)·S_text + ᾱ_t·S_vis``, soft-maxed over the tokens, the tokens scaled by
``1 + S`` (so the score nets get gradients) and the top ``γ_num`` fraction kept (training: γ_num drawn
from U[0.3, 1]; inference: 0.8).

[R] The paper does not give the score nets' width and activation: two Linear layers with a GELU,
256 wide. The latent is the VP form ``√ᾱ·x0 + √(1 − ᾱ)·ε`` of the noisy latent: the U-Net's own input
(``x_t / √(1 + σ²)``). [R] On the rectified-flow DiTs (Flux, SD3: ``x_t = (1 − σ)·x0 + σ·ε``) the paper's
ᾱ_t is the one of the same signal-to-noise ratio, ``(1 − σ)² / ((1 − σ)² + σ²)``, and the latent
``x_t / √((1 − σ)² + σ²)`` is again ``√ᾱ·x0 + √(1 − ᾱ)·ε``, so the module sees the same kind of input on
every family.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: share of image tokens kept at inference (paper), and the training range it is drawn from
INFERENCE_KEEP = 0.8
TRAINING_KEEP_RANGE = (0.3, 1.0)
SCORE_HIDDEN = 256


def _signal_and_noise(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of x0 and ε in ComfyUI's noisy latent at σ: ``(1, σ)``, or ``(1 − σ, σ)`` for rectified flow."""
    sigma = sigma.float()
    return (1.0 - sigma if flow else torch.ones_like(sigma)), sigma


def alpha_bar(sigma: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """ᾱ_t of a noise level σ: of ComfyUI's discrete VP schedules (σ² = (1 − ᾱ)/ᾱ), or (``flow``) the ᾱ of the
    same signal-to-noise ratio as rectified flow's ``(1 − σ)·x0 + σ·ε``."""
    signal, noise = _signal_and_noise(sigma, flow)
    return signal ** 2 / (signal ** 2 + noise ** 2)


def model_input(x_t: torch.Tensor, sigma: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """The VP-form latent ``√ᾱ·x0 + √(1 − ᾱ)·ε`` of ComfyUI's ``x_t = x0 + σ·ε`` (what the U-Net receives), or
    (``flow``) of ``x_t = (1 − σ)·x0 + σ·ε``; σ per sample."""
    signal, noise = _signal_and_noise(sigma, flow)
    return x_t * (signal ** 2 + noise ** 2).rsqrt().view(-1, *(1,) * (x_t.ndim - 1)).to(x_t)


def masked_latent(latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The latent the visual context sees (paper §3.3: only the subject region): ``(k·B, c, h, w)`` times
    the ``(B, H', W')`` word mask resized to it (bilinear), repeated over the ``k`` cond/uncond chunks."""
    gate = F.interpolate(mask[:, None].to(latent), size=latent.shape[-2:], mode="bilinear")
    return latent * gate.repeat(latent.shape[0] // gate.shape[0], 1, 1, 1)


def _score_net(in_features: int) -> torch.nn.Sequential:
    # no output bias: a constant shift of every token's score cancels in the softmax
    return torch.nn.Sequential(torch.nn.Linear(in_features, SCORE_HIDDEN), torch.nn.GELU(),
                               torch.nn.Linear(SCORE_HIDDEN, 1, bias=False))


def _attention_pool(pool: torch.nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """``softmax over tokens (tokens · W)ᵀ tokens``: ``(B, N, D)`` → ``(B, D)``."""
    return (pool(tokens).softmax(dim=1) * tokens).sum(dim=1)


class AdaptiveScoring(torch.nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, latent_channels: int = 4):
        super().__init__()
        self.text_pool = torch.nn.Linear(text_dim, 1, bias=False)          # W_at
        self.latent_pool = torch.nn.Linear(latent_channels, 1, bias=False)  # W_av
        self.text_score = _score_net(vision_dim + text_dim)
        self.visual_score = _score_net(vision_dim + latent_channels)

    @property
    def latent_channels(self) -> int:
        return self.latent_pool.in_features

    def scores(self, features: torch.Tensor, text: torch.Tensor, latent: torch.Tensor,
               alpha: torch.Tensor) -> torch.Tensor:
        """``(B, N)`` fused token scores, soft-maxed over the N image tokens."""
        text_context = _attention_pool(self.text_pool, text)
        visual_context = _attention_pool(self.latent_pool, latent.flatten(2).transpose(1, 2))
        tokens = features.shape[1]
        s_text = self.text_score(torch.cat([features, text_context[:, None].expand(-1, tokens, -1)], -1))
        s_visual = self.visual_score(torch.cat([features, visual_context[:, None].expand(-1, tokens, -1)], -1))
        alpha = alpha.view(-1, 1, 1).to(s_text)
        return ((1.0 - alpha) * s_text + alpha * s_visual).squeeze(-1).softmax(dim=1)

    def forward(self, features: torch.Tensor, text: torch.Tensor, latent: torch.Tensor, alpha: torch.Tensor,
                keep: float) -> torch.Tensor:
        """The kept, weighted tokens ``(B, k, D)`` of ``features (B, N, D)``, in their original order;
        ``text (B, T, C)`` the prompt's features, ``latent (B, c, h, w)`` the (masked) model input,
        ``alpha (B,)`` ᾱ_t, ``keep`` γ_num."""
        scores = self.scores(features, text, latent, alpha)
        count = max(1, round(keep * features.shape[1]))
        kept = scores.topk(count, dim=1).indices.sort(dim=1).values
        weighted = features * (1.0 + scores[..., None])
        return weighted.gather(1, kept[..., None].expand(-1, -1, features.shape[-1]))
