"""Text-encoder stand-ins built from ComfyUI's own classes, for tests that only need tokenization.

SDXL's CLIP-G (~700M parameters) is too big for CPU tests, but token positions only depend on the
tokenizers, so `sdxl_tokenizer_clip()` is a real `comfy.sd.CLIP` carrying ComfyUI's real SDXL tokenizer
(both `l` and `g`) and no encoder weights: `tokenize` works, encoding does not.
"""
from __future__ import annotations

import functools

from .comfy_env import boot_comfy


@functools.cache
def sdxl_tokenizer_clip():
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.sdxl_clip

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer = comfy.sdxl_clip.SDXLTokenizer()
    clip.tokenizer_options = {}
    return clip
