"""Chroma, as ComfyUI's ``ldm.chroma.model.Chroma`` (``model_base.Chroma``, a subclass of its Flux).

Flux.1's blocks, projections, rotary positions and token layout, so :class:`~.flux.FluxFamily` answers for them;
what differs is what a trainer gives the model: no pooled text vector (the modulation comes from the
``distilled_guidance_layer`` approximator of the timestep and a guidance input, not from CLIP-L), and that
guidance input, which ComfyUI sets to 0 unless a node sets it. Its conditioning is T5-XXL's sequence alone, not
padded (one stretch, the default layout). Files made for Chroma record ``chroma``: a Flux.1 file (of another
model, with other weights) is refused on it, and a Chroma file on Flux.1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .flux import FLUX_LAYOUT, FluxFamily


@dataclass(frozen=True)
class ChromaFamily(FluxFamily):
    def reads_pooled(self, adm_channels: int) -> bool:
        return False

    def training_guidance(self, diffusion_model) -> Optional[float]:
        return 0.0  # model_base.Chroma.extra_conds' default, what sampling gives it


CHROMA = ChromaFamily("Chroma", file_tag="chroma", model_classes=("Chroma",), text_encoder_class=None, **FLUX_LAYOUT)
