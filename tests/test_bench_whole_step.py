"""The whole-step benchmark compares like with like (its timings are never asserted)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import whole_step  # noqa: E402 (bench/ is not a package)


def test_official_style_aligned_replace_computes_what_shared_attention_batch_computes(comfy):
    """The benchmark's official formulation (AdaIN on every row, one attention call over [own; first image's]
    keys) gives the output of our processor with the node's defaults: the reference row's duplicated keys
    leave its softmax unchanged and AdaIN toward itself is the identity."""
    from comfy.ldm.modules.attention import optimized_attention
    from harness.comfy_env import pack_module

    style_aligned = pack_module("attention.style_aligned")
    heads, chunks = 2, 2
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(chunks * 3, 24, heads * 8, generator=gen) for _ in range(3))
    official = whole_step.official_shared_attention(q, k, v, {"n_heads": heads, "cond_or_uncond": [1, 0]})

    def attention(q_, k_, v_, mask=None):
        return optimized_attention(q_, k_, v_, heads, mask=mask)
    ours = style_aligned.shared_self_attention(q, k, v, chunks, style_aligned.StyleAlignedSettings(), attention)
    assert (official - ours).abs().max() <= 1e-4
