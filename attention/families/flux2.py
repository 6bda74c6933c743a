"""Flux.2, as ComfyUI's ``ldm.flux.model.Flux`` with Flux.2's parameters (``model_base.Flux2``, a subclass of its
Flux).

Flux.1's block names and kinds, joint attention and rotary format (four position axes instead of three: the
rotation matrices have the same layout, so :class:`~.flux.FluxFamily` places queries as for Flux.1); its fused
projections carry no bias and its blocks share one modulation, which changes nothing the pack reads. What
differs for the pack:

- the conditioning is three layers of the Mistral-3 text encoder stacked channel-wise (one stretch, with
  ComfyUI's system-prompt template around the prompt), and ``model_base.Flux2.extra_conds`` LEFT-pads it with
  zero tokens to 512, so the prompt's tokens end at token 512 of what the model receives
  (:meth:`conditioning_placement`);
- no pooled text vector (the modulation comes from the timestep and the guidance input alone);
- files record ``flux2``: a Flux.1 file (other widths, another text encoder) is refused on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ConditioningPlacement
from .flux import FLUX_LAYOUT, FluxFamily

#: the text tokens ``model_base.Flux2.extra_conds`` pads every shorter conditioning to, zeros in front
PADDED_TEXT_TOKENS = 512


@dataclass(frozen=True)
class Flux2Family(FluxFamily):
    def reads_pooled(self, adm_channels: int) -> bool:
        return False

    def conditioning_placement(self, tokens: int) -> ConditioningPlacement:
        padding = max(0, PADDED_TEXT_TOKENS - tokens)
        return ConditioningPlacement(tokens, tokens + padding, padding)

    def context_stretches(self, encoders, tokens):
        return None  # one stretch: the default layout

    def batched_prompts(self, per_prompt: list[torch.Tensor]) -> torch.Tensor:
        # zeros in front up to the longest prompt, where the model pads every shorter one itself: each prompt of
        # the batch reaches the model as it does alone
        longest = max(t.shape[1] for t in per_prompt)
        return torch.cat([ConditioningPlacement(t.shape[1], longest, longest - t.shape[1]).place(t) for t in per_prompt])


FLUX2 = Flux2Family("Flux.2", file_tag="flux2", model_classes=("Flux2",), text_encoder_class="Flux2TEModel",
                    **FLUX_LAYOUT)
