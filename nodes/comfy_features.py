"""What the running ComfyUI offers, found by looking for the feature itself, never by its version number.

The pack declares the oldest ComfyUI it is tested on (pyproject.toml); features newer than that are checked
here, once, so a node that needs one refuses an older ComfyUI with an error naming the release it needs.
"""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention

from ..attention.joint import OVERRIDE_KEY

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


def _unwrapped(attention_fn):
    return getattr(attention_fn, "__wrapped__", attention_fn)


#: ComfyUI's own attention functions that compute the softmax attention exactly, in pure torch (SDPA, the
#: sub-quadratic and split chunkings, the basic one): torch's kernel differs from them only by rounding.
#: xformers, flash-attn and SageAttention (quantised) are left to do their own work, as any other pack's function.
_EXACT_ATTENTION = frozenset(_unwrapped(fn) for fn in (
    getattr(comfy_attention, name, None)
    for name in ("attention_pytorch", "attention_sub_quad", "attention_split", "attention_basic")) if fn is not None)


def computes_exact_attention(attention_fn, options: dict) -> bool:
    """Whether ``attention_fn`` (what a dispatcher calls as ComfyUI's attention), called with ``options``, is one
    of ComfyUI's exact attention functions and is not handed on to an attention override: torch's fused kernel
    that also returns the log-sum-exp may then stand in for it (``AttentionCall.attention_with_logsumexp``)."""
    if attention_fn is _attention_before_override:
        attention_fn = comfy_attention.optimized_attention
    own = _unwrapped(attention_fn)
    if own not in _EXACT_ATTENTION:
        return False
    handed_on = own is not attention_fn and OVERRIDE_KEY in options  # ComfyUI's wrap_attn would call the override
    return not handed_on
