"""StyleAligned benchmark; prints ratios measured in one run (never asserted in tests).

(a) per-step sampling time, SharedAttentionBatch-patched / plain, batch 4 on the tiny SD1.5 of the
    test harness (real ComfyUI, CPU unless a GPU is there);
(b) at real SD1.5 self-attention size (320 channels = 8 heads x 40, 4096 tokens, batch 4, one chunk):
    our processor / one plain scaled-dot-product attention over the same concatenated keys (the
    official code's SDPA path with precomputed [K; K_ref], [V; V_ref]). Target: (b) <= 1.15.
(c) at real Flux joint-attention size (24 heads x 128, 512 text + 4096 image tokens, batch 4, one chunk,
    q/k/v as Flux hands them: (B, heads, L, d)): the pack's joint dispatcher with StyleAligned / one plain
    scaled-dot-product attention of every query over the same concatenated keys [text, image, reference
    image]. Target: (c) <= 1.10. ``--flux-heads`` runs a fraction of the 24 heads (the ratio does not depend
    on the head count; a CPU takes ~10 s per full-size call).

Usage: .venv/bin/python bench/shared_attention.py [--skip-sampling] [--repeats N] [--flux-heads H]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from timing import best_of, best_of_interleaved, parse_bench_args, work_clock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def processor_vs_sdpa(repeats: int, device: str) -> tuple[float, float]:
    from harness.comfy_env import boot_comfy, pack_module

    boot_comfy()
    style_aligned = pack_module("attention.style_aligned")
    sdpa = pack_module("attention.sdpa")
    heads, tokens, channels, batch = 8, 4096, 320, 4
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, tokens, channels, device=device) for _ in range(3))
    settings = style_aligned.StyleAlignedSettings()

    def attention(q_, k_, v_, mask=None):
        return sdpa.sdpa_attention(q_, k_, v_, heads, mask=mask)

    keys = torch.cat([k, k[:1].expand(batch, -1, -1)], dim=1)
    values = torch.cat([v, v[:1].expand(batch, -1, -1)], dim=1)
    with torch.inference_mode():
        times = best_of_interleaved({"ours": lambda: style_aligned.shared_self_attention(q, k, v, 1, settings, attention),
                                     "plain": lambda: attention(q, keys, values)}, repeats, work_clock(device))
    return times["ours"], times["plain"]


def joint_dispatcher_vs_sdpa(repeats: int, device: str, heads: int) -> tuple[float, float]:
    from harness.comfy_env import boot_comfy, pack_module

    boot_comfy()
    import comfy.ldm.modules.attention as comfy_attention

    style_aligned, joint, dispatcher = (pack_module(f"attention.{m}") for m in ("style_aligned", "joint", "dispatcher"))
    text, grid, dim, batch = 512, (64, 64), 128, 4
    image = grid[0] * grid[1]
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, text + image, dim, device=device) for _ in range(3))
    processor = style_aligned.SharedAttentionProcessor(settings=style_aligned.StyleAlignedSettings(),
                                                       blocks=frozenset({("double", 0, 0)}))
    options = {dispatcher.CHAIN_KEY: dispatcher.ProcessorChain().with_processor(processor),
               joint.LAYOUT_KEY: joint.LayoutRecord(joint.JointLayout(text, grid)), "cond_or_uncond": [0],
               "block_type": "double", "block_index": 0}
    override = joint.JointAttentionDispatcher()
    # ComfyUI's own attention function, unwrapped as wrap_attn hands it to an override
    attention = comfy_attention.optimized_attention.__wrapped__
    keys = torch.cat([k, k[:1, :, text:].expand(batch, -1, -1, -1)], dim=2)
    values = torch.cat([v, v[:1, :, text:].expand(batch, -1, -1, -1)], dim=2)
    with torch.inference_mode():
        times = best_of_interleaved(
            {"ours": lambda: override(attention, q, k, v, heads, skip_reshape=True, transformer_options=options),
             "plain": lambda: attention(q, keys, values, heads, skip_reshape=True)}, repeats, work_clock(device))
    return times["ours"], times["plain"]


def sampling_step_ratio(repeats: int, steps: int = 4) -> tuple[float, float]:
    from harness import checkpoints
    from harness.pack_nodes import shared_attention

    model, clip, _vae = checkpoints.load_sd15()
    patched = shared_attention(model)
    positive = checkpoints.encode_prompt(clip, "a toy train")
    negative = checkpoints.encode_prompt(clip, "")
    latent = {"samples": torch.zeros(4, 4, 8, 8)}

    def run(m):
        return lambda: checkpoints.sample(m, positive, negative, latent, seed=1, steps=steps, cfg=7.0)
    return best_of(run(patched), repeats) / steps, best_of(run(model), repeats) / steps


def main() -> None:
    args, device = parse_bench_args(__doc__, lambda parser: parser.add_argument("--flux-heads", type=int, default=24))
    if not args.skip_sampling:
        patched, plain = sampling_step_ratio(args.repeats)
        print(f"(a) tiny SD1.5, batch 4, cfg 7: {patched * 1e3:.1f} ms/step patched vs {plain * 1e3:.1f} ms/step plain "
              f"-> ratio {patched / plain:.3f}")
    ours, plain = processor_vs_sdpa(args.repeats, device)
    print(f"(b) 8x40 heads, 4096 tokens, batch 4 (CPU: process CPU time): processor {ours * 1e3:.1f} ms vs SDPA over the same concatenated "
          f"keys {plain * 1e3:.1f} ms -> ratio {ours / plain:.3f} (target <= 1.15)")
    ours, plain = joint_dispatcher_vs_sdpa(args.repeats, device, args.flux_heads)
    print(f"(c) Flux joint attention, {args.flux_heads} of 24 heads x 128, 512 text + 4096 image tokens, batch 4: "
          f"dispatcher {ours * 1e3:.1f} ms vs one SDPA over the same concatenated keys {plain * 1e3:.1f} ms -> ratio "
          f"{ours / plain:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
