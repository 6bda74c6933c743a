"""What the running ComfyUI offers, found by looking for the feature itself, never by its version number.

The pack declares the oldest ComfyUI it is tested on (pyproject.toml); features newer than that are checked
here, once, so a node that needs one refuses an older ComfyUI with an error naming the release it needs.
"""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

#: The ComfyUI release that introduced the attention override: every attention function is wrapped by
#: ``comfy.ldm.modules.attention.wrap_attn``, which hands the call to
#: ``transformer_options["optimized_attention_override"]`` when a model sets one (0.3.59 does not have it).
ATTENTION_OVERRIDE_SINCE = "0.3.60"


def has_attention_override() -> bool:
    """Whether ComfyUI's attention functions honour ``transformer_options["optimized_attention_override"]``."""
    return callable(getattr(comfy_attention, "wrap_attn", None))


def running_comfyui_version() -> str:
    """The running ComfyUI's version, for messages only ("unknown" for a checkout without comfyui_version.py)."""
    try:
        from comfyui_version import __version__
    except ImportError:
        return "unknown"
    return str(__version__)


def require_attention_override(node_name: str) -> None:
    """Raise a clear error when ``node_name`` needs the attention override and this ComfyUI lacks it."""
    if not has_attention_override():
        raise RuntimeError(
            f"{node_name} needs ComfyUI {ATTENTION_OVERRIDE_SINCE} or newer: it patches attention through "
            "ComfyUI's attention override (transformer_options['optimized_attention_override'], applied by "
            f"comfy.ldm.modules.attention.wrap_attn), which this ComfyUI ({running_comfyui_version()}) does not "
            f"have. Update ComfyUI to {ATTENTION_OVERRIDE_SINCE} or newer.")


def _attention_before_override(q, k, v, heads, mask=None, attn_precision=None, transformer_options=None, **kwargs):
    # Without the override, ComfyUI's own attention layers call these functions without transformer_options.
    return comfy_attention.optimized_attention(q, k, v, heads, mask=mask, attn_precision=attn_precision, **kwargs)


def comfy_attention_function():
    """ComfyUI's ``optimized_attention``, callable with ``transformer_options=`` on every supported ComfyUI
    (where the attention override exists, the options reach it; before, they are not passed on)."""
    if has_attention_override():
        return comfy_attention.optimized_attention
    return _attention_before_override
