"""Calling the pack's registered nodes directly (the classes ComfyUI's loader registered)."""
from __future__ import annotations

import contextlib

import pytest

from .comfy_env import boot_comfy

#: SharedAttentionBatch's widget defaults (paper settings for text-only sets).
SHARED_ATTENTION_DEFAULTS = dict(
    adain_queries=True, adain_keys=True, adain_values=False, shared_score_shift=0.0, shared_score_scale=1.0,
    share_group_norm=False, full_attention_share=False, blocks="", skip_fraction=0.0, start_percent=0.0,
    end_percent=1.0, controlnet_on_reference=False)


def run_node(node_id: str, **inputs) -> tuple:
    """Execute one registered node's V3 ``execute`` and return its outputs."""
    return boot_comfy().nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def shared_attention(model, **overrides):
    """The MODEL patched by SharedAttentionBatch with the defaults, overridden by ``overrides``."""
    return run_node("SharedAttentionBatch", model=model, **{**SHARED_ATTENTION_DEFAULTS, **overrides})[0]


@contextlib.contextmanager
def user_cancels_at_step(step: int = 1):
    """As if the user pressed Cancel in the server when the progress bar reached ``step``: ComfyUI's own server
    progress hook (harness.server_hook) raises there; the block must end in ComfyUI's InterruptProcessingException."""
    import comfy.model_management
    from .server_hook import server_progress_hook

    with server_progress_hook(cancel_at=step), pytest.raises(comfy.model_management.InterruptProcessingException):
        yield
