"""Z-Image, as ComfyUI's ``ldm.lumina.model.NextDiT`` with Z-Image's options (config ``supported_models.ZImage``;
the model class ``model_base.Lumina2`` is Lumina 2's too, so the family is told by its config).

The text runs alone through two context-refiner blocks and the image alone through two noise-refiner blocks;
then every main block (``layers``) runs ONE stream ``[text | image]`` through one attention with a fused qkv
(as Flux's single blocks). The text part is the prompt's tokens (refined, in place) followed by learned pad tokens
up to a multiple of 32, the image part the latent's patches followed by pad tokens likewise; queries and keys
get Flux-format rotary embeddings (``rope_embedder``, 2x2 rotation matrices), the text's positions included.
ComfyUI names no block in transformer_options and offers no block replace for these blocks, so the pack names
them with hooks that live for one model call. Only the main blocks are patched: the refiners see one modality
each. The conditioning is Qwen3's hidden states of the prompt in its chat template (one stretch; a word is
searched in the prompt only). ComfyUI's forward takes ``t = 1 - sigma`` and negates the model's output, inside
the model: a trainer's flow loss on ComfyUI's prediction needs nothing of its own.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Family, JointProjections, TransformerBlock, matching_paths, nearest_of, prompts_of_one_length
from .flux import rotate_by_positions

_BLOCK_PATH = re.compile(r"^layers\.(\d+)$")
#: ComfyUI's config classes of NextDiT models: the nearest of them decides
_KNOWN_CLASSES = ("ZImage", "Lumina2")


@dataclass(frozen=True)
class ZImageFamily(Family):
    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        if not {"layers", "context_refiner", "noise_refiner", "cap_embedder"} <= tops:
            return False
        return model_classes is None or nearest_of(model_classes, _KNOWN_CLASSES) in self.model_classes

    def find_blocks(self, modules: list) -> list[TransformerBlock]:
        blocks = []
        for path, module, match in matching_paths(modules, _BLOCK_PATH):
            attention = module.attention
            if attention.n_local_kv_heads != attention.n_local_heads:
                continue  # grouped-query attention: its qkv is not three equal parts (Lumina 2, not Z-Image)
            blocks.append(TransformerBlock(
                key=("layer", int(match.group(1)), 0), module_path=path, heads=attention.n_local_heads,
                dim_head=attention.head_dim, has_cross_attention=True, family=self,
                projections=JointProjections.fused(f"{path}.attention.qkv", f"{path}.attention.q_norm",
                                                   f"{path}.attention.qkv", f"{path}.attention.k_norm",
                                                   one_stream=True)))
        return blocks

    def query_placement(self, positions):
        return lambda queries: rotate_by_positions(queries, positions)

    def batched_prompts(self, per_prompt: list[torch.Tensor]) -> torch.Tensor:
        return prompts_of_one_length(per_prompt, "Z-Image fills every prompt up to a multiple of 32 tokens with its "
                                                 "own learned tokens, which a batched conditioning cannot hold")

    def reads_pooled(self, adm_channels: int) -> bool:
        return False

    def training_inputs(self, context_tokens: int) -> dict:
        # model_base.Lumina2.extra_conds: the prompt's token count (its attention mask's sum: no padding)
        return {"num_tokens": context_tokens}


ZIMAGE = ZImageFamily("Z-Image", file_tag="zimage", block_names=("layer",), joint=True, model_classes=("ZImage",),
                      comfy_marks_blocks=False, marked_by_call_hooks=True, position_embedder="rope_embedder",
                      text_embedder="cap_embedder", first_block="layers.0", first_block_streams=(0,),
                      text_stream="context_refiner", text_encoder_class="ZImageTEModel")
