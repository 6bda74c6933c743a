"""Parallel Visual Attention benchmark; prints ratios measured in one run (never asserted in tests).

(a) per-step sampling time, ParallelVisualAttention-patched / plain, on the tiny SD1.5 of the test
    harness (real ComfyUI, CPU unless a GPU is there), CFG 1 (paper's inpainting) and CFG 6;
(b) one cross-attention call at real SD2 size (320 channels = 5 heads x 64, 4096 queries, 77 text + 10
    identity tokens, batch 2, both rows cond): our joint softmax through the dispatcher (parallel query
    projection and identity key/value projections included; the node glue's check of ComfyUI's exact attention,
    so the identity keys merge in by the fused kernel's log-sum-exp where it serves) / the unpatched layer's
    fused attention over the 77 text keys, both with ComfyUI's PyTorch attention (SDPA), called in turns (on the
    CPU timed by this process's CPU time, so run it with OMP_NUM_THREADS=1 on a shared machine); target <= 1.5;
(c) identity-tune optimizer steps per second on the tiny model.

Usage: .venv/bin/python bench/pva.py [--skip-sampling] [--repeats N]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from timing import best_of, best_of_interleaved, parse_bench_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PVA_SETTINGS = dict(strength=1.0, uncond_identity=False, images_per_identity=0, start_percent=0.0, end_percent=1.0)


def joint_softmax_vs_plain(repeats: int, device: str) -> tuple[float, float]:
    from harness.comfy_env import boot_comfy, pack_module

    boot_comfy()
    dispatcher = pack_module("attention.dispatcher")
    pva = pack_module("attention.pva")
    heads, dim_head, queries, batch, context = 5, 64, 4096, 2, 1024
    channels = heads * dim_head
    torch.manual_seed(0)
    projection = pva.ParallelProjection(channels, context, channels).to(device)
    processor = pva.ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"input_1_0": projection}),
                                                     torch.randn(1, 10, context, device=device))
    hidden = torch.randn(batch, queries, channels, device=device)
    q = torch.randn(batch, queries, channels, device=device)
    k, v = (torch.randn(batch, 77, channels, device=device) for _ in range(2))
    options = {"n_heads": heads, "dim_head": dim_head, "block": ("input", 1), "block_index": 0,
               "cond_or_uncond": [0], dispatcher.CHAIN_KEY: dispatcher.ProcessorChain().with_processor(processor)}

    import comfy.ldm.modules.attention as comfy_attention
    attention = comfy_attention.attention_pytorch  # the default on NVIDIA GPUs, --use-pytorch-cross-attention elsewhere
    layer = dispatcher.AttentionDispatcher(dispatcher.CROSS_ATTENTION, attention,
                                           is_exact_attention=pack_module("nodes.comfy_features").computes_exact_attention)

    def ours():
        call_options = dict(options)
        dispatcher.stash_hidden_states(hidden, None, None, call_options)
        return layer(q, k, v, call_options)

    clock = time.process_time if device == "cpu" else time.perf_counter  # CPU: the work, whatever else runs
    with torch.inference_mode():
        times = best_of_interleaved({"ours": ours, "plain": lambda: attention(q, k, v, heads)}, repeats, clock)
    return times["ours"], times["plain"]


def sampling_step_ratio(repeats: int, cfg: float, steps: int = 4) -> tuple[float, float]:
    from harness import checkpoints
    from harness.pack_nodes import run_node
    from harness.pva_assets import arcface_path, pva_path

    model, clip, _vae = checkpoints.load_sd15()
    arcface_path()
    pva = run_node("PVALoader", pva_name=pva_path("arcface").name)[0]
    references = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    patched = run_node("ParallelVisualAttention", model=model, pva=pva, references=references, **PVA_SETTINGS)[0]
    positive = checkpoints.encode_prompt(clip, "photo of a person")
    negative = checkpoints.encode_prompt(clip, "photo of a person")
    latent = {"samples": torch.zeros(2, 4, 8, 8)}

    def run(m):
        return lambda: checkpoints.sample(m, positive, negative, latent, seed=1, steps=steps, cfg=cfg)
    return best_of(run(patched), repeats) / steps, best_of(run(model), repeats) / steps


def identity_tune_steps_per_second(steps: int = 4) -> float:
    from harness.checkpoints import load_sd15
    from harness.comfy_env import pack_module
    from harness.pack_nodes import run_node
    from harness.pva_assets import arcface_path, pva_path

    glue, loop, tune_nodes = (pack_module(m) for m in ("nodes.training_glue", "training.loop", "nodes.pva_training"))
    model, clip, vae = load_sd15()
    arcface_path()
    pva = run_node("PVALoader", pva_name=pva_path("arcface").name)[0]
    photos = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with glue.training_mode():
        tune = tune_nodes.prepare_identity_tune(model, clip, vae, pva, photos, bins=2, seed=0)
        optimizer = tune_nodes.identity_tune_optimizer(tune.params, 2e-5, 1e-3)
        start = time.perf_counter()
        loop.train(tune.params, tune.step, optimizer, loop.LoopSettings(steps, 2, 0))
        return steps / (time.perf_counter() - start)


def main() -> None:
    args, device = parse_bench_args(__doc__)
    if not args.skip_sampling:
        for cfg in (1.0, 6.0):
            patched, plain = sampling_step_ratio(args.repeats, cfg)
            print(f"(a) tiny SD1.5, batch 2, cfg {cfg:g}: {patched * 1e3:.1f} ms/step patched vs {plain * 1e3:.1f} ms/step "
                  f"plain -> ratio {patched / plain:.2f}")
    ours, plain = joint_softmax_vs_plain(args.repeats, device)
    print(f"(b) SD2-size cross-attention (4096 queries, 77 + 10 keys): {ours * 1e3:.2f} ms joint vs {plain * 1e3:.2f} ms "
          f"text-only fused -> ratio {ours / plain:.2f} (target <= 1.5)")
    print(f"(c) identity tune on the tiny SD1.5 (64 px, 2 timestep bins per step): "
          f"{identity_tune_steps_per_second():.2f} optimizer steps/s")


if __name__ == "__main__":
    main()
