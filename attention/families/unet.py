"""The U-Nets: SD1.x, SD2 and SDXL, as ComfyUI's ``openaimodel.UNetModel``.

Attention reaches the pack through ComfyUI's per-block attn1/attn2 replaces keyed
``(block_name, block_id, transformer_index)``: ``"input"``, ``"middle"`` (block id 0) or ``"output"``. The
prompt's conditioning is the cross-attention context itself: 77 tokens per chunk, one stretch of all encoders
(SDXL's CLIP-L and CLIP-G side by side).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

from .base import Family, TransformerBlock, matching_paths

_TRANSFORMER_PATH = re.compile(r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)$")
#: the layers of the U-Net's blocks (res blocks, spatial transformers, up- and downsampling), each called on its own
_LAYER_PATH = re.compile(r"^(?:input_blocks\.\d+|middle_block|output_blocks\.\d+)\.\d+$")


@dataclass(frozen=True)
class UNetFamily(Family):
    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        return {"input_blocks", "output_blocks"} <= tops

    def find_blocks(self, modules: list) -> list[TransformerBlock]:
        blocks = []
        for path, module, match in matching_paths(modules, _TRANSFORMER_PATH):
            name, block_id, middle, index = match.groups()
            key = ("middle", 0, int(index)) if middle else (name, int(block_id), int(index))
            blocks.append(TransformerBlock(key=key, module_path=path, heads=module.attn1.heads,
                                           dim_head=module.attn1.dim_head, family=self,
                                           has_cross_attention=getattr(module, "attn2", None) is not None))
        depth = Counter(b.key[:2] for b in blocks)
        return [replace(b, alone_in_block=depth[b.key[:2]] == 1) for b in blocks]

    def checkpoint_units(self, modules: list, blocks: list[TransformerBlock]) -> list[str]:
        # its res blocks hold as much of the activations as its transformers: every layer of every block
        return [path for path, _module, _match in matching_paths(modules, _LAYER_PATH)]

    def reads_pooled(self, adm_channels: int) -> bool:
        return adm_channels > 0  # SDXL's ADM vector holds the pooled CLIP-G output

    def training_refusal(self, model_classes: list[str], adm_channels: int) -> Optional[str]:
        if adm_channels and "SDXL" not in model_classes:
            return "reads another extra conditioning than SDXL's (size and crop with the pooled text)"
        return None


#: Diffusers registers down blocks, then up blocks, then the middle block; the paper's layer-fraction control
#: (StyleAligned ``only_self_level``) indexes layers in that order.
UNET = UNetFamily("U-Net (SD1.5/SD2/SDXL)", file_tag="unet", block_names=("input", "output", "middle"))
