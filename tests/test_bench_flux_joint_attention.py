"""The Flux joint-attention benchmark compares like with like and prints its ratios (its timings are never
asserted): run at a tiny size through the same code as at full size."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import flux_joint_attention as bench  # noqa: E402 (bench/ is not a package)
from harness.comfy_env import pack_module  # noqa: E402

TINY = bench.JointCallSize(heads=2, head_dim=8, text=6, grid=(3, 4), hidden=12, reference_tokens=5, token_dim=10,
                           identity_tokens=3)


@pytest.mark.parametrize("cond_or_uncond", [(0,), (1, 0)], ids=["cond only", "cfg"])
def test_configurations_compute_what_their_ratios_compare(comfy, monkeypatch, cond_or_uncond):
    """guided and ungated differ only by the gate and the map read: with the guided mask at 1 everywhere their
    outputs agree, so (1) times the map read and its softmax path, not another branch; PVA's softmax-only
    configuration serves exactly the keys and parallel queries the processor projects, projecting them once,
    so (2) and (3) time the same joint softmax and differ by the projections; and every configuration changes
    the plain joint attention."""
    pva = pack_module("attention.pva")
    projected = []
    own_queries = pva.JointParallelProjection.queries
    monkeypatch.setattr(pva.JointParallelProjection, "queries",
                        lambda self, call, own=None: projected.append(1) or own_queries(self, call, own))
    calls = bench.joint_calls(TINY, cond_or_uncond, "cpu")
    with torch.inference_mode():
        plain = calls["plain"]()
        ungated, pva_softmax = calls["ungated"](), calls["pva softmax"]()
        torch.testing.assert_close(calls["pva"](), pva_softmax, rtol=0, atol=0)
        assert len(projected) == 2
        torch.testing.assert_close(calls["pva softmax"](), pva_softmax, rtol=0, atol=0)
        assert len(projected) == 2, "the softmax-only configuration projects once"
        calls["pva"]()
        assert len(projected) == 3, "the processor projects in every call"
        guided = calls["guided"]()
        ones = bench.joint_calls(TINY, cond_or_uncond, "cpu", guided_mask=1.0)["guided"]()
    assert plain.shape == (len(cond_or_uncond), TINY.text + TINY.image, TINY.heads * TINY.head_dim)
    torch.testing.assert_close(ones, ungated, rtol=1e-5, atol=1e-5)
    for changed in (ungated, guided, pva_softmax):
        assert (changed - plain).abs().max() > 1e-3
    assert (guided - ungated).abs().max() > 1e-3  # the mask gates the branch


@pytest.mark.parametrize("attention_name", ["pytorch", "comfyui"])
def test_report_prints_every_ratio(comfy, capsys, attention_name):
    calls = bench.joint_calls(TINY, (0,), "cpu", attention_name=attention_name)
    lines = bench.report(bench.measure(calls, 1, "cpu"), TINY, (0,), "cpu", attention_name)
    print("\n".join(lines))
    out = capsys.readouterr().out
    for label in ("(1) AdaptiveMaskGuidance guided", "(2) ParallelVisualAttention joint softmax",
                  "(3) ParallelVisualAttention with its parallel query projection"):
        assert label in out
    assert "2 of 24 heads x 8, 6 text + 12 image tokens, cond only, batch 1 (1/57" in out
    assert ("ComfyUI's attention_pytorch" in out) == (attention_name == "pytorch")
