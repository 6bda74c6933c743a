"""SD3 and SD3.5 (Large, Medium), as ComfyUI's MMDiT (``OpenAISignatureMMDITWrapper``).

Joint blocks mix context and image streams (context first) in one attention; SD3.5 Medium's first blocks add
an image-only attention. ComfyUI's forward does not name the running block, so the pack marks it through the
``dit`` block replace ComfyUI offers at each joint block, keyed ``("double_block", i)``. The text stream holds
learned register tokens in front of the conditioning where the model has them (``register_length``); the
image tokens get positions added after the image embedder. The conditioning is CLIP-L and CLIP-G side by side
(77 tokens per chunk), then T5-XXL's sequence.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .base import Family, JointProjections, TransformerBlock, matching_paths, nearest_of

_BLOCK_PATH = re.compile(r"^joint_blocks\.(\d+)$")


@dataclass(frozen=True)
class SD3Family(Family):
    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        return "joint_blocks" in tops and (model_classes is None or nearest_of(model_classes, ("SD3",)) is not None)

    def find_blocks(self, modules: list) -> list[TransformerBlock]:
        blocks = []
        for path, module, match in matching_paths(modules, _BLOCK_PATH):
            attention = module.x_block.attn
            width = attention.qkv.weight.shape[1]
            blocks.append(TransformerBlock(
                key=("joint", int(match.group(1)), 0), module_path=path, heads=attention.num_heads,
                dim_head=width // attention.num_heads, has_cross_attention=True, family=self,
                projections=JointProjections.fused(f"{path}.x_block.attn.qkv", f"{path}.x_block.attn.ln_q",
                                                   f"{path}.context_block.attn.qkv", f"{path}.context_block.attn.ln_k")))
        return blocks

    def marker_key(self, block: TransformerBlock) -> tuple:
        return "double_block", block.key[1]

    def context_stretches(self, encoders, tokens):
        if not self.encodes_with(encoders):
            return None
        clips = tuple(key for key, encoder in (("l", encoders.clip_l), ("g", encoders.clip_g)) if encoder is not None)
        return [stretch for stretch in (clips, ("t5xxl",) if encoders.t5xxl is not None else ()) if stretch]


MMDIT = SD3Family("SD3/SD3.5 (MMDiT)", file_tag="sd3", block_names=("joint",), joint=True, model_classes=("SD3",),
                  comfy_marks_blocks=False, text_embedder="context_embedder", first_block="joint_blocks.0",
                  first_block_streams=(0, 1), text_encoder_class="SD3ClipModel")
