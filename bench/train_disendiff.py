"""DisenDiff trainer benchmark; prints ratios measured in one run (never asserted in tests).

Seconds per optimizer step (micro-batch 2 × accumulation 2) and peak GPU memory of our trainer vs a
straightforward reference loop over the same model, batch, noise and losses: the reference
materialises the attention probabilities of EVERY cross-attention layer per head (as the official
code's patched CrossAttention stores them) and picks the map layers afterwards, where ours reads
head-averaged maps of the map layers only and keeps the fused attention elsewhere. Target: ≤ 1.0.

Runs on the tiny SD1.5 of the test harness (real ComfyUI; CPU unless a GPU is there).
Both variants are prepared first and their steps alternate, so machine load affects them alike.
Usage: .venv/bin/python bench/train_disendiff.py [--resolution 128] [--steps 3]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    from harness.checkpoints import load_sd15
    from harness.comfy_env import boot_comfy, pack_module

    boot_comfy()
    import comfy.model_management as comfy_mm  # importable once ComfyUI is booted
    nodes_disendiff = pack_module("nodes.disendiff")
    glue = pack_module("nodes.training_glue")
    recipe = pack_module("training.disendiff")
    maps = pack_module("attention.disendiff")
    patching = pack_module("nodes.patching")
    loop = pack_module("training.loop")
    model, clip, vae = load_sd15()
    image = torch.rand(1, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0))
    settings = recipe.DisenDiffSettings(steps=args.steps, micro_batch=2, grad_accumulation=2, augment=False)

    class EveryLayerRecorder(maps.MapRecorder):
        """Reference: full per-head probabilities of every cross-attention layer, filtered afterwards."""

        def active(self, call):
            return True

        def read_probs(self, probs, call):
            self.maps.append((call.block, probs))

        def layer_mean(self):
            kept = [maps.to_spatial(p.mean(1), call_shape) for key, p in self.maps if key in self.blocks]
            return torch.stack(kept).mean(0)

    def prepare(reference: bool):
        run = nodes_disendiff.prepare_training(model, clip, vae, image, ["cat", "dog"], "bench", settings,
                                               seed=1, resolution=args.resolution)
        step = run.step
        if reference:
            naive = EveryLayerRecorder(blocks=step.recorder.blocks)
            blocks = [b for b in patching.transformer_blocks(model) if b.has_cross_attention]
            patching.add_attention_processor(run.trainable, naive, blocks)
            step = dataclasses.replace(step, recorder=naive)
        optimizer = torch.optim.AdamW(list(run.params.values()), lr=settings.learning_rate, weight_decay=0.01)
        return run, step, optimizer

    def timed_step(variant, index: int) -> tuple[float, float]:
        run, step, optimizer = variant
        comfy_mm.load_models_gpu([run.trainable], force_full_load=True)  # both clones share the U-Net
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for micro in range(settings.grad_accumulation):
            loss = step(loop.MicroStep(index, micro, loop.micro_step_generator(1, index, micro)))
            (loss / settings.grad_accumulation).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
        return time.perf_counter() - start, peak

    call_shape = (1, 4, args.resolution // 8, args.resolution // 8)
    with glue.training_mode():
        variants = {"ours": prepare(reference=False), "reference": prepare(reference=True)}
        times = {name: [] for name in variants}
        peaks = {name: 0.0 for name in variants}
        for index in range(args.steps + 1):  # alternate, so machine load hits both alike; step 0 warms up
            for name, variant in variants.items():
                seconds, peak = timed_step(variant, index)
                if index:
                    times[name].append(seconds)
                    peaks[name] = max(peaks[name], peak)
    ours, ref = statistics.median(times["ours"]), statistics.median(times["reference"])
    ours_peak, ref_peak = peaks["ours"], peaks["reference"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, tiny SD1.5, {args.resolution}px, micro-batch 2 x accumulation 2")
    print(f"seconds per optimizer step: ours {ours:.3f}, reference {ref:.3f}, ratio {ours / ref:.3f} (target <= 1.0)")
    if torch.cuda.is_available():
        print(f"peak GPU memory MiB: ours {ours_peak:.0f}, reference {ref_peak:.0f}, ratio {ours_peak / ref_peak:.3f}")
    else:
        print("peak GPU memory: n/a on the CPU")


if __name__ == "__main__":
    main()
