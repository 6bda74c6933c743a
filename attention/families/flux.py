"""Flux.1 (dev, schnell, Fill, Kontext), as ComfyUI's ``ldm.flux.model.Flux``.

Double blocks run text and image streams side by side into one joint attention over ``[txt | img]``; single
blocks run one stream over that concatenation. ComfyUI names the running block in transformer_options
(``block_type`` "double"/"single", ``block_index``). Queries and keys reach the attention function with rotary
embedding applied, from ``pe_embedder``'s ``(B, 1, L, d / 2, 2, 2)`` rotation matrices of ``[text | image]``.
The conditioning is T5-XXL's sequence alone (its CLIP-L gives only the pooled vector); Flux's ``post_input``
patches (ComfyUI's USO style node) may put tokens beside it before the first double block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Family, JointProjections, TransformerBlock, matching_paths, nearest_of

_BLOCK_PATH = re.compile(r"^(double|single)_blocks\.(\d+)$")


def rotate_by_positions(queries: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(B, N, heads * d)`` queries rotated by Flux-style rotary embedding matrices ``(B, 1, N, d / 2, 2, 2)``: each
    pair of a head's features is multiplied by its 2x2 rotation."""
    heads_first = queries.unflatten(-1, (-1, positions.shape[-3] * 2)).transpose(1, 2)  # (B, heads, N, d)
    pairs = heads_first.to(positions.dtype).unflatten(-1, (-1, 1, 2))
    rotated = positions[..., 0] * pairs[..., 0] + positions[..., 1] * pairs[..., 1]
    return rotated.flatten(-2).transpose(1, 2).flatten(2).to(queries.dtype)


@dataclass(frozen=True)
class FluxFamily(Family):
    text_encoder_class: Optional[str] = "FluxClipModel"

    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        if not {"double_blocks", "single_blocks"} <= tops:
            return False
        return model_classes is None or nearest_of(model_classes, _KNOWN_CLASSES) in self.model_classes

    def find_blocks(self, modules: list) -> list[TransformerBlock]:
        return [TransformerBlock(key=(match.group(1), int(match.group(2)), 0), module_path=path,
                                 heads=module.num_heads, dim_head=module.hidden_size // module.num_heads,
                                 has_cross_attention=True, family=self, projections=_projections(path, match.group(1)))
                for path, module, match in matching_paths(modules, _BLOCK_PATH)]

    def training_guidance(self, diffusion_model) -> Optional[float]:
        # a guidance-distilled Flux (dev) trains with ComfyUI's default for conditionings without FluxGuidance,
        # which is also FluxGuidance's default
        return 3.5 if getattr(getattr(diffusion_model, "params", None), "guidance_embed", False) else None

    def query_placement(self, positions):
        return lambda queries: rotate_by_positions(queries, positions)

    def context_stretches(self, encoders, tokens):
        return [("t5xxl",)] if self.encodes_with(encoders) else None


def _projections(path: str, name: str) -> JointProjections:
    if name == "double":
        return JointProjections.fused(f"{path}.img_attn.qkv", f"{path}.img_attn.norm.query_norm",
                                      f"{path}.txt_attn.qkv", f"{path}.txt_attn.norm.key_norm")
    # a single block's linear1 makes [q | k | v | mlp]: its first three widths are the fused qkv
    return JointProjections.fused(f"{path}.linear1", f"{path}.norm.query_norm", f"{path}.linear1",
                                  f"{path}.norm.key_norm", one_stream=True)


#: Flux.1's blocks, rotary positions and the streams its first block receives: what Chroma keeps of it
FLUX_LAYOUT = dict(block_names=("double", "single"), joint=True, position_embedder="pe_embedder",
                   text_embedder="txt_in", image_embedder="img_in", first_block="double_blocks.0",
                   first_block_streams=("txt", "img"))
FLUX = FluxFamily("Flux", file_tag="flux", model_classes=("Flux",), **FLUX_LAYOUT)
#: every model class of ComfyUI with Flux's block names, whichever family it is: the nearest of them decides
_KNOWN_CLASSES = ("Flux", "Flux2", "Chroma", "ChromaRadiance", "HunyuanVideo", "HunyuanImage21", "Hunyuan3Dv2",
                  "Hunyuan3Dv2_1")
