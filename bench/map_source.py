"""AdaptiveMaskGuidance's two map sources; prints what it measured in one run (never asserted in tests).

- "text-only pass" (the default, the paper's and the released code's schedule): before each updating step
  a forward of the cond rows without the image branch reads the word map that gates that same step.
- "previous step" (the fast option): the map is read from the cond rows of the guided pass itself and
  gates the next step; only step 0 runs the text-only forward.

On the tiny SD1.5 of the test harness in the real ComfyUI (CPU unless a GPU is there), one image, CFG 5,
a random adapter of this pack's format: (a) seconds per sampling run of each source (best of --repeats,
alternating; CPU seconds of the process on the CPU, wall seconds on a GPU) and their ratio; (b) how far the masks of each step are apart: the largest difference of
a mask value, and how many of the kept positions one source keeps and the other does not. Step 0 is the
same map in both (no subject injected yet); the difference comes from the later steps.

Usage: OMP_NUM_THREADS=1 .venv/bin/python bench/map_source.py [--resolution 256] [--steps 20] [--update-fraction 1.0] [--repeats 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a photo of a toy on a wooden table in a sunny garden"
ADAPTER = "bench_map_source_sd15_v1.safetensors"


def seconds_of(fn) -> float:
    """GPU: wall seconds (CUDA waited for). CPU: this process's CPU seconds, which other jobs on a shared
    machine disturb far less than wall time (run with OMP_NUM_THREADS=1: one thread)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--update-fraction", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    from harness import checkpoints
    from harness.comfy_env import boot_comfy, pack_module
    from harness.pack_nodes import run_node
    from harness.realcustom import TINY_CLIP_VISION, adapter_path, tiny_clip_vision

    boot_comfy()
    model, clip, _vae = checkpoints.load_sd15()
    adapter_path(ADAPTER, pack_module("nodes.patching").transformer_blocks(model), TINY_CLIP_VISION["hidden_size"], 768)
    adapter = run_node("RealCustomLoader", adapter_name=ADAPTER)[0]
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    reference = run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(), image=image,
                         crop=False)[0]
    positive, negative = checkpoints.encode_prompt(clip, PROMPT), checkpoints.encode_prompt(clip, "")
    latent = checkpoints.empty_latent(1, args.resolution, args.resolution)
    sources = pack_module("nodes.realcustom").MAP_SOURCES
    runs = {}
    for source in sources:
        patched, masks = run_node("AdaptiveMaskGuidance", model=model, reference=reference, clip=clip, prompt=PROMPT,
                                  word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                                  update_fraction=args.update_fraction, map_source=source, uncond_image="black image",
                                  strength=1.0, scope_selection="top-k", guidance="CFG (released code)",
                                  image_guidance=12.5)
        runs[source] = (patched, masks)

    def sampling(source, steps=args.steps):
        return lambda: checkpoints.sample(runs[source][0], positive, negative, latent, seed=1, steps=steps, cfg=5.0)

    seconds = {source: float("inf") for source in sources}
    for source in sources:
        sampling(source, steps=1)()  # warm-up
    for _ in range(args.repeats):  # alternating, so machine load hits both alike
        for source in sources:
            seconds[source] = min(seconds[source], seconds_of(sampling(source)))
    released, fast = sources
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, tiny SD1.5 at {args.resolution} px, {args.steps} steps, CFG 5, batch 1, "
          f"update_fraction {args.update_fraction}")
    print(f"(a) seconds per sampling run: {released} {seconds[released]:.2f}, {fast} {seconds[fast]:.2f}; "
          f"ratio {seconds[released] / seconds[fast]:.2f}")

    released_masks, fast_masks = runs[released][1].steps, runs[fast][1].steps
    largest, swapped, kept = 0.0, [], int((released_masks[0] > 0).sum())
    for step, (a, b) in enumerate(zip(released_masks, fast_masks)):
        if step == 0:
            assert torch.allclose(a, b, atol=1e-5), "step 0 reads the same map in both sources"
            continue
        largest = max(largest, float((a - b).abs().max()))
        swapped.append(int(((a > 0) & (b == 0)).sum()))
    grid = tuple(released_masks[0].shape[-2:])
    print(f"(b) masks on a {grid[0]}x{grid[1]} grid, {kept} positions kept per step: largest value difference "
          f"{largest:.3f}; kept by the released schedule but not by previous step: {min(swapped)}-{max(swapped)} "
          f"positions per step (mean {sum(swapped) / len(swapped):.1f}) over steps 1-{len(released_masks) - 1}")


if __name__ == "__main__":
    main()
