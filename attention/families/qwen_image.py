"""Qwen-Image (and Qwen-Image Edit), as ComfyUI's ``ldm.qwen_image.model.QwenImageTransformer2DModel``
(``model_base.QwenImage``).

Every block (``transformer_blocks``, 60 in the real model) runs a text stream and an image stream side by side into
one joint attention over ``[text | image]`` (text first: ``torch.cat([txt_query, img_query])``), as Flux's double
blocks; ComfyUI names the running block in transformer_options (``block_type`` "double", ``block_index``), so the
blocks are ``double:i``. Unlike Flux the projections are separate layers, a q/k/v triple per stream (``to_q``,
``to_k``, ``to_v`` for the image, ``add_q_proj``, ``add_k_proj``, ``add_v_proj`` for the text), each followed by
a per-head RMSNorm of the queries and keys (``norm_q``, ``norm_added_k``, ...). Queries and keys get rotary
embeddings in Flux's format (``pe_embedder``'s 2x2 rotation matrices of ``[text | image]``); the text tokens have
positions too, all three axes at one index after the image's. The first block receives its streams by keyword
(``encoder_hidden_states`` the text, ``hidden_states`` the image), the text as ``txt_in`` made it (after
``txt_norm``), the image as ``img_in`` made it (Qwen-Image Edit's reference latents follow the sampled one's
tokens).

The conditioning is Qwen2.5-VL 7B's last hidden states of the prompt in ComfyUI's system-prompt template, of which
ComfyUI's text encoder (``text_encoders.qwen_image.QwenImageTEModel``) drops everything before the prompt from
the conditioning (:meth:`dropped_template_tokens`): a word at token k of the tokenized text is at token k - 34 of
the conditioning for the text-to-image template. No pooled vector, no guidance input (Qwen-Image is sampled with
real CFG); the latent is the Wan 2.1 VAE's, one frame, which the model patchifies 2 x 2 like Flux's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .base import Family, JointProjections, ProjectionRows, TransformerBlock, matching_paths, prompts_of_one_length
from .flux import rotate_by_positions

_BLOCK_PATH = re.compile(r"^transformer_blocks\.(\d+)$")
#: Qwen2.5's ``<|im_start|>``, ``user`` and ``\n`` token ids, as QwenImageTEModel looks for them
_IM_START, _USER, _NEWLINE = 151644, 872, 198


@dataclass(frozen=True)
class QwenImageFamily(Family):
    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        if not {"transformer_blocks", "txt_norm", "txt_in", "img_in"} <= tops:
            return False
        return model_classes is None or "QwenImage" in model_classes

    def find_blocks(self, modules: list) -> list[TransformerBlock]:
        blocks = []
        for path, module, match in matching_paths(modules, _BLOCK_PATH):
            attention = f"{path}.attn"
            blocks.append(TransformerBlock(
                key=("double", int(match.group(1)), 0), module_path=path, heads=module.attn.heads,
                dim_head=module.attn.dim_head, has_cross_attention=True, family=self,
                projections=JointProjections(ProjectionRows(f"{attention}.to_q"), f"{attention}.norm_q",
                                             ProjectionRows(f"{attention}.add_k_proj"),
                                             ProjectionRows(f"{attention}.add_v_proj"), f"{attention}.norm_added_k")))
        return blocks

    def query_placement(self, positions):
        return lambda queries: rotate_by_positions(queries, positions)

    def dropped_template_tokens(self, token_ids: list) -> int:
        # QwenImageTEModel.encode_token_weights: the conditioning starts at the second <|im_start|> (the first where
        # there is one, the last token where there is none), after the "user\n" that follows it
        starts = [i for i, token in enumerate(token_ids) if token == _IM_START][:2]
        start = starts[-1] if starts else len(token_ids) - 1
        if starts and len(token_ids) > start + 3 and token_ids[start + 1:start + 3] == [_USER, _NEWLINE]:
            start += 3
        return start

    def batched_prompts(self, per_prompt: list[torch.Tensor]) -> torch.Tensor:
        return prompts_of_one_length(per_prompt, "Qwen-Image attends to every text token at its own rotary position "
                                                 "(and ignores the attention mask), so a prompt repeated or padded "
                                                 "to a longer one is another prompt to it")

    def reads_pooled(self, adm_channels: int) -> bool:
        return False


QWEN_IMAGE = QwenImageFamily("Qwen-Image", file_tag="qwen_image", block_names=("double",), joint=True,
                             model_classes=("QwenImage",), position_embedder="pe_embedder", text_embedder="txt_in",
                             image_embedder="img_in", first_block="transformer_blocks.0",
                             first_block_streams=("encoder_hidden_states", "hidden_states"),
                             text_encoder_class="QwenImageTEModel")
