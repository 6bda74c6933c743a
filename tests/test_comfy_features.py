"""Features of the running ComfyUI that the pack checks for (nodes/comfy_features.py), on every ComfyUI the
test command runs (the pinned one and the oldest supported one): nodes that need the attention override
refuse a ComfyUI without it with an error naming the release that introduced it, and the U-Net dispatcher's
attention call works on both."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_env import pack_module


def _override_reaches_the_attention_call() -> bool:
    """Whether ComfyUI's own optimized_attention hands a call to ``transformer_options["optimized_attention_
    override"]``, found by trying it: the probe records the call; a ComfyUI that predates the override
    refuses the keyword or runs its attention without calling the probe."""
    import comfy.ldm.modules.attention as comfy_attention
    calls = []

    def probe(func, *args, **kwargs):
        calls.append(func)
        return func(*args, **kwargs)

    q = torch.randn(1, 4, 8)
    try:
        comfy_attention.optimized_attention(q, q, q, 2, transformer_options={"optimized_attention_override": probe})
    except TypeError:
        return False
    return bool(calls)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3])


def test_attention_override_requirement_matches_what_comfyui_does(comfy):
    features = pack_module("nodes.comfy_features")
    if _override_reaches_the_attention_call():
        features.require_attention_override("SomeDiTNode")  # passes: nothing to refuse
    else:
        with pytest.raises(RuntimeError) as refused:
            features.require_attention_override("SomeDiTNode")
        message = str(refused.value)
        assert message.startswith("SomeDiTNode needs ComfyUI 0.3.60 or newer")
        assert "optimized_attention_override" in message and "wrap_attn" in message
        assert f"({features.running_comfyui_version()})" in message


def test_the_named_release_is_where_comfyui_gained_the_override(comfy):
    """ATTENTION_OVERRIDE_SINCE is read from ComfyUI's history (wrap_attn arrived after v0.3.59): the
    running ComfyUI must agree, on either side of it."""
    features = pack_module("nodes.comfy_features")
    version = features.running_comfyui_version()
    if version == "unknown":
        pytest.skip("this ComfyUI checkout has no comfyui_version.py")
    introduced = _version_tuple(features.ATTENTION_OVERRIDE_SINCE)
    assert _override_reaches_the_attention_call() == (_version_tuple(version) >= introduced), \
        f"ComfyUI {version}: the attention override's presence contradicts 'since {features.ATTENTION_OVERRIDE_SINCE}'"


def test_dispatcher_attention_call_takes_transformer_options_on_every_comfyui(comfy):
    """The U-Net dispatcher always passes transformer_options (so another pack's attention override applies
    under our patch); ComfyUI without the override must still get a plain call, with the same result."""
    import comfy.ldm.modules.attention as comfy_attention
    attention = pack_module("nodes.comfy_features").comfy_attention_function()
    q, k, v = (torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(seed)) for seed in range(3))
    expected = comfy_attention.optimized_attention(q, k, v, 4)
    out = attention(q, k, v, 4, mask=None, attn_precision=None, transformer_options={"n_heads": 4})
    torch.testing.assert_close(out, expected)


def test_exact_attention_is_comfyuis_own_softmax_attention_not_handed_to_an_override(comfy):
    """torch's kernel returning the log-sum-exp stands in only for ComfyUI's exact attention functions as the
    dispatchers call them: its optimized attention where no override takes the call (on the CPU: sub-quadratic
    or PyTorch), the unwrapped function an override is given; never another pack's function or a quantised one."""
    import comfy.ldm.modules.attention as comfy_attention
    features = pack_module("nodes.comfy_features")
    glue_attention = features.comfy_attention_function()
    assert features.computes_exact_attention(glue_attention, {})
    if features.has_attention_override():
        assert not features.computes_exact_attention(glue_attention, {"optimized_attention_override": print})
        for name in ("attention_pytorch", "attention_sub_quad", "attention_split", "attention_basic"):
            assert features.computes_exact_attention(getattr(comfy_attention, name).__wrapped__,
                                                     {"optimized_attention_override": print}), name
    for name in ("attention_sage", "attention_xformers", "attention_flash"):
        function = getattr(comfy_attention, name, None)
        if function is not None:
            assert not features.computes_exact_attention(function, {}), name
            assert not features.computes_exact_attention(getattr(function, "__wrapped__", function), {}), name
    assert not features.computes_exact_attention(lambda q, k, v, heads, **_: q, {})
