"""Is the text context of a model call the prompt a node was given?

A node that edits the attention of some prompt tokens finds their positions by tokenizing the prompt it
was given; those positions are only right if the conditioning the sampler feeds the model is that same
prompt, encoded by the same CLIP. The node encodes its prompt once and compares it with the context of
the call's cond rows. ComfyUI repeats a shorter cond along the tokens to the length of the batch's
longest one (``comfy.conds.CONDCrossAttn.concat``), so a context of ``k`` times the prompt's length whose
every repeat is the prompt is the prompt, and its tokens sit at ``p + j·L`` for ``j < k``.
"""
from __future__ import annotations

import torch

#: largest difference, relative to the prompt's largest value, still taken for the same encoding (the model
#: may cast the context to fp16/bf16; a different prompt differs by the order of the values themselves)
TOLERANCE = 1e-2


def prompt_repeats(context: torch.Tensor, prompt: torch.Tensor, rows: list[int]) -> int | None:
    """How many times the encoded ``prompt`` ``(1, L, D)`` fills the ``(B, T, D)`` context of ``rows``
    (``T / L``), or None when one of those rows holds something else."""
    length = prompt.shape[1]
    if context.shape[1] % length != 0 or context.shape[-1] != prompt.shape[-1]:
        return None
    repeats = context.shape[1] // length
    expected = prompt.to(context.device, context.dtype).float().repeat(1, repeats, 1)
    selected = context[rows].float()
    difference = (selected - expected).abs().amax()
    return repeats if difference <= TOLERANCE * expected.abs().amax() else None


def repeated_positions(positions, prompt_length: int, repeats: int) -> list[int]:
    """The context positions of the prompt's tokens ``positions`` in every one of its ``repeats``."""
    return [p + j * prompt_length for j in range(repeats) for p in positions]
