"""Checks of ComfyUI features the pack needs beyond its declared minimum, with errors naming the version."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

#: the first ComfyUI release whose DiT attention goes through ``wrap_attn`` and its attention override
ATTENTION_OVERRIDE_VERSION = "0.3.60"


def has_attention_override() -> bool:
    return hasattr(comfy_attention, "wrap_attn")


def require_attention_override(node: str) -> None:
    """A clear error when this ComfyUI lacks the attention override the pack's DiT support is built on."""
    if not has_attention_override():
        raise RuntimeError(f"{node}: Flux and SD3.5 models need ComfyUI {ATTENTION_OVERRIDE_VERSION} or newer (its "
                           "attention override); update ComfyUI, or use an SD1.5/SD2/SDXL model.")
