"""RealCustom adaptive mask guidance benchmark; prints ratios measured in one run (never asserted in tests).

At real SDXL cross-attention sizes (1024² image: 4096 queries × 640 channels and 1024 × 1280; 77 text
tokens, 729 image tokens; cond + uncond, batch 1 each), over one U-Net's worth of such layers:

(a) time of the cross-attention layers with mask guidance (word map read from the same pass, the
    "previous step" source) / the same image branch ungated (no map read, all-ones mask).
    Target: <= 1.10. Also: with the mask frozen (no map read) / ungated.
(b) the released schedule ("text-only pass", the node's default): one extra cond-only pass of these
    layers per updating step, as a ratio to (a)'s guided time (the whole U-Net pays a cond-only forward in
    addition; bench/map_source.py measures whole sampling runs of both sources).
(c) peak memory of map capture over all layers (CUDA allocator peak on a GPU, the process's resident-set
    high-water mark on the CPU): extra peak over the ungated run, in units of one layer's full attention
    probabilities and of all layers' full probabilities; capture keeps only the reduced word map, so the
    extra should stay near one layer's transient probabilities.

Usage: .venv/bin/python bench/mask_guidance.py [--repeats N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import torch
from timing import best_of, peak_since, start_peak_tracking

ROOT = Path(__file__).resolve().parents[1]
# The pure-torch packages need no ComfyUI: expose the repo as a namespace without running its __init__.
_package = types.ModuleType("personalization_nodes")
_package.__path__ = [str(ROOT)]
sys.modules.setdefault("personalization_nodes", _package)

# (queries, channels, heads, layers) of SDXL's cross-attention at 1024² (70 layers: 4 at 64², 66 at 32²)
SDXL_LAYERS = [(4096, 640, 10, 4), (1024, 1280, 20, 66)]
TEXT_TOKENS, IMAGE_TOKENS, TOKEN_DIM = 77, 729, 2048


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers-scale", type=float, default=1.0 if torch.cuda.is_available() else 0.1,
                        help="fraction of the 70 layers to run (CPU default 0.1 to stay short)")
    args = parser.parse_args()
    device, dtype = args.device, (torch.float16 if args.device == "cuda" else torch.float32)

    from personalization_nodes.attention import realcustom as rc
    from personalization_nodes.attention.dispatcher import (
        CHAIN_KEY,
        CROSS_ATTENTION,
        AttentionDispatcher,
        ProcessorChain,
    )
    from personalization_nodes.attention.sdpa import sdpa_attention

    gen = torch.Generator().manual_seed(0)
    layers = []
    for queries, channels, heads, count in SDXL_LAYERS:
        for index in range(max(1, round(count * args.layers_scale))):
            side = int(queries ** 0.5)
            block = ("output", 0 if side == 64 else 1, index)
            layers.append(dict(block=block, heads=heads, side=side,
                               q=torch.randn(2, queries, channels, generator=gen).to(device, dtype),
                               k=torch.randn(2, TEXT_TOKENS, channels, generator=gen).to(device, dtype),
                               v=torch.randn(2, TEXT_TOKENS, channels, generator=gen).to(device, dtype)))
    weights = rc.ImageBranchWeights({layer["block"]: (layer["q"].shape[-1], TOKEN_DIM) for layer in layers}).to(device, dtype)
    tokens = rc.ImageTokens(torch.randn(1, IMAGE_TOKENS, TOKEN_DIM, generator=gen).to(device, dtype),
                            torch.randn(1, IMAGE_TOKENS, TOKEN_DIM, generator=gen).to(device, dtype))
    indicator = torch.zeros(TEXT_TOKENS)
    indicator[5] = 1.0
    chain = ProcessorChain().with_processor(rc.WordMapReader()).with_processor(rc.MaskedImageBranch(weights))
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)

    def new_run(capturing: bool):
        run = rc.MaskGuidanceRun(rc.MaskSettings(), indicator, total_steps=25,
                                 update_fraction=1.0, text_only_pass=False, tokens=tokens)
        run.mask = torch.rand(1, 64, 64, device=device)
        run.capturing = capturing
        return run

    def unet_layers(run, cond_or_uncond=(0, 1)):
        rows = len(cond_or_uncond)
        for layer in layers:
            options = {"n_heads": layer["heads"], "dim_head": layer["q"].shape[-1] // layer["heads"],
                       "block": layer["block"][:2], "block_index": layer["block"][2], "cond_or_uncond": list(cond_or_uncond),
                       "activations_shape": [rows, layer["q"].shape[-1], layer["side"], layer["side"]],
                       CHAIN_KEY: chain, rc.RUN_KEY: run}
            dispatcher(layer["q"][:rows], layer["k"][:rows], layer["v"][:rows], options)

    ungated_run = rc.TrainingRun(tokens, mask=torch.ones(1, 1, 1, device=device))
    with torch.no_grad():
        ungated = best_of(lambda: unet_layers(ungated_run), args.repeats)
        guided = best_of(lambda: unet_layers(new_run(capturing=True)), args.repeats)
        frozen = best_of(lambda: unet_layers(new_run(capturing=False)), args.repeats)

        def text_only_pass():
            run = new_run(capturing=True)
            run.injecting = False
            unet_layers(run, cond_or_uncond=(0,))
        extra_pass = best_of(text_only_pass, args.repeats)

    print(f"device {device}, {len(layers)} SDXL-size cross-attention layers, cond+uncond")
    print(f"(a) guided, map read in the same pass / ungated branch: {guided / ungated:.3f}  (target <= 1.10)")
    print(f"    guided, mask frozen / ungated branch:              {frozen / ungated:.3f}")
    print(f"(b) released 'text-only pass': extra cond-only pass / guided pass of these layers: {extra_pass / guided:.3f}")

    def peak_mib(fn) -> float:
        baseline = start_peak_tracking()
        with torch.no_grad():
            fn()
        peak = peak_since(baseline)
        return peak.cuda_mib if device == "cuda" else peak.rss_mib

    peaks = {"ungated": [], "guided": []}
    for _ in range(max(3, args.repeats)):  # alternating, lowest of each: allocator caches blur single peaks
        peaks["ungated"].append(peak_mib(lambda: unet_layers(ungated_run)))
        peaks["guided"].append(peak_mib(lambda: unet_layers(new_run(capturing=True))))
    ungated_peak, guided_peak = min(peaks["ungated"]), min(peaks["guided"])
    one_layer = max(2 * layer["heads"] * layer["q"].shape[1] * TEXT_TOKENS * 4 for layer in layers) / 2**20
    all_layers = sum(2 * layer["heads"] * layer["q"].shape[1] * TEXT_TOKENS * 4 for layer in layers) / 2**20
    extra = guided_peak - ungated_peak
    print(f"(c) extra peak memory of map capture ({'CUDA allocator' if device == 'cuda' else 'CPU resident set'}): "
          f"{extra:.1f} MiB = {extra / one_layer:.2f} x one layer's fp32 probabilities, "
          f"{extra / all_layers:.3f} x all layers' ({all_layers:.0f} MiB)")


if __name__ == "__main__":
    main()
