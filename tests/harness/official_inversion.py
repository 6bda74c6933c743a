"""StyleAligned's official DDIM inversion (google/style-aligned ``inversion.py``: ``_ddim_loop`` and
``_next_step`` with ``set_alpha_to_one=False``), written out as the reference of the inversion tests."""
from __future__ import annotations

import torch


def official_ddim_inversion(eps_model, z0: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor,
                            num_train_timesteps: int = 1000) -> torch.Tensor:
    """VP latents of the inverted trajectory, ``zts[k]`` at the k-th sampling timestep (noisiest first),
    ``zts[-1] = z0``. Each step goes from timestep t − Δ (ᾱ_0 before the first timestep) to t with the
    noise ``eps_model(latent, t)`` predicted at the current latent and the next timestep."""
    delta = num_train_timesteps // len(timesteps)
    latent, all_latents = z0, [z0]
    for t in sorted(timesteps):
        noise_pred = eps_model(latent, t)
        previous = t - delta
        alpha_prod_t = alphas_cumprod[previous] if previous >= 0 else alphas_cumprod[0]
        alpha_prod_t_next = alphas_cumprod[t]
        original = (latent - (1 - alpha_prod_t) ** 0.5 * noise_pred) / alpha_prod_t ** 0.5
        latent = alpha_prod_t_next ** 0.5 * original + (1 - alpha_prod_t_next) ** 0.5 * noise_pred
        all_latents.append(latent)
    return torch.cat(all_latents).flip(0)
