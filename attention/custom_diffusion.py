"""Custom Diffusion's (Kumari et al., CVPR 2023) cross-attention K/V fine-tune, shared by the trainers
built on it (DisenDiff, DETEX)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatcher import CROSS_ATTENTION, AttentionProcessor


@dataclass(eq=False)
class StartTokenDetach(AttentionProcessor):
    """Training only: start-of-text key/value rows detached, so they send no gradient into the trained
    W_K/W_V (Custom Diffusion's ``crossattn-kv`` fine-tune; SOT draws most of the attention mass).
    ``node_name`` names the trainer node that attaches it (for the dispatcher's messages)."""

    node_name: str = "Custom Diffusion trainer"
    name = "custom_diffusion_sot_detach"
    patch_point = CROSS_ATTENTION

    def edit_key_values(self, k, v, call):
        return (torch.cat([k[:, :1].detach(), k[:, 1:]], 1), torch.cat([v[:, :1].detach(), v[:, 1:]], 1))
