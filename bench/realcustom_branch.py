"""RealCustom image-branch layouts at real scale; prints what it computed or measured (never asserted in tests).

(a) Sizes, from the real layer shapes (modules built on the meta device, so nothing is allocated): parameters,
    the adapter file (fp32, as the trainer saves it), the fp32 Adam moments, and the whole training state
    (weights + gradients + both moments, 16 bytes a parameter), of the branch (and the CLIP-vision projector,
    SigLIP-so400m's 1152 channels to the text context's width) for Flux.1 dev (19 double + 38 single blocks,
    3072 wide, T5 4096), SD3.5 Large (38 joint blocks, 2432 wide, T5 4096), SDXL (70 layers, 640/1280 wide, 2048)
    and SD1.5 (16 layers, 320-1280 wide, 768): today's per-block layout on every block against the shared +
    low-rank layout and the block selections. The other Flux adapters are the anchors (their published files).
(b) With --measure: on the tiny Flux dev and SD3.5 Large of the test harness (real ComfyUI, CPU unless a GPU is
    there), each layout / block selection trained the same way (released setting: no scoring, ungated; 16 AdamW
    steps at lr 3e-3, batch 2, 64 px), and the loss on a fixed probe (3 micro-steps of noise and timesteps the
    training never draws) before and after: the share of the loss it removed.

Usage: .venv/bin/python bench/realcustom_branch.py [--measure] [--steps 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SIGLIP_CHANNELS = 1152


def _flux_dev():
    """``{block: (attention width, token width)}`` of Flux.1 dev's branch, from its real configuration."""
    return {**{("double", i, 0): (3072, 4096) for i in range(19)}, **{("single", i, 0): (3072, 4096) for i in range(38)}}


def _sd35_large():
    return {("joint", i, 0): (2432, 4096) for i in range(38)}


def _sdxl():
    layers = {("input", 4): (2, 640), ("input", 5): (2, 640), ("input", 7): (10, 1280), ("input", 8): (10, 1280),
              ("middle", 0): (10, 1280), **{("output", i): (10, 1280) for i in range(3)},
              **{("output", i): (2, 640) for i in range(3, 6)}}
    return {(kind, block, index): (width, 2048) for (kind, block), (depth, width) in layers.items()
            for index in range(depth)}


def _sd15():
    widths = {("input", 1): 320, ("input", 2): 320, ("input", 4): 640, ("input", 5): 640, ("input", 7): 1280,
              ("input", 8): 1280, ("middle", 0): 1280, ("output", 3): 1280, ("output", 4): 1280, ("output", 5): 1280,
              ("output", 6): 640, ("output", 7): 640, ("output", 8): 640, ("output", 9): 320, ("output", 10): 320,
              ("output", 11): 320}
    return {(kind, block, 0): (width, 768) for (kind, block), width in widths.items()}


#: name: (block shapes, the pack's family constant)
MODELS = {"Flux.1 dev": (_flux_dev, "FLUX"), "SD3.5 Large": (_sd35_large, "MMDIT"), "SDXL": (_sdxl, "UNET"),
          "SD1.5": (_sd15, "UNET")}
#: the other adapters of Flux.1 dev, as published (parameters): the issue's anchors
ANCHORS = {"PuLID-Flux (20 cross-attentions + ID encoder)": 0.57e9, "XLabs IP-Adapter Flux (19 double blocks)": 0.49e9,
           "Flux Redux (no per-block weights)": 65e6}


def branch_parameters(shapes, layout: str, rank: int, selection: str) -> int:
    from harness.comfy_env import pack_module
    weights = pack_module("attention.realcustom_weights")
    served = weights.select_branch_blocks(list(shapes), selection)
    with torch.device("meta"):
        branch = weights.new_branch({key: shapes[key] for key in served}, layout, rank)
    return sum(p.numel() for p in branch.parameters())


def projector_parameters(token_dim: int) -> int:
    from harness.comfy_env import pack_module
    with torch.device("meta"):
        projector = pack_module("attention.realcustom_weights").LinearProjector(SIGLIP_CHANNELS, token_dim)
    return sum(p.numel() for p in projector.parameters())


def row(label: str, parameters: int) -> str:
    return (f"  {label:<44} {parameters / 1e6:>9.1f} M {parameters * 4 / 1e6:>9.0f} MB {parameters * 8 / 1e9:>8.2f} GB "
            f"{parameters * 16 / 1e9:>8.2f} GB")


def print_sizes(rank: int) -> None:
    from harness.comfy_env import pack_module
    realcustom = pack_module("attention.realcustom")
    weights = pack_module("attention.realcustom_weights")
    per_block, shared = realcustom.PER_BLOCK, realcustom.SHARED_LOW_RANK
    print(f"{'':<46} {'params':>11} {'file fp32':>12} {'Adam m+v':>11} {'training':>11}")
    for name, (shapes_of, family) in MODELS.items():
        shapes = shapes_of()
        projector = projector_parameters(next(iter(shapes.values()))[1])
        default = weights.default_layout(getattr(pack_module("attention.blocks"), family), shapes)
        print(f"{name}: {len(shapes)} blocks; + projector {projector / 1e6:.1f} M in every total below "
              f"(default layout: {default})")
        variants = [("today: per-block, all", per_block, "all"), (f"shared + rank {rank}, all", shared, "all"),
                    (f"shared + rank {rank}, every 2nd", shared, "every 2nd"),
                    (f"shared + rank {rank}, every 4th", shared, "every 4th"),
                    ("per-block, every 4th", per_block, "every 4th")]
        if any(key[0] == "double" for key in shapes):
            variants[3:3] = [(f"shared + rank {rank}, double only", shared, "double only"),
                             ("per-block, double only", per_block, "double only")]
        for label, layout, selection in variants:
            print(row(label, projector + branch_parameters(shapes, layout, rank, selection)))
    print("anchors (Flux.1 dev, published files):")
    for label, parameters in ANCHORS.items():
        print(row(label, int(parameters)))


VARIANTS = [("per-block", "all", 16), ("shared + low-rank", "all", 16), ("shared + low-rank", "all", 4),
            ("shared + low-rank", "double only", 16), ("shared + low-rank", "every 2nd", 16)]


def measure(steps: int) -> None:
    from harness import dit
    from harness.comfy_env import boot_comfy, pack_module
    from harness.realcustom import tiny_clip_vision
    from harness.training_probes import probe_loss
    boot_comfy()
    glue, trainer, loop = (pack_module(n) for n in ("nodes.training_glue", "nodes.realcustom_trainer", "training.loop"))
    images = torch.full((2, 64, 64, 3), 0.5)
    images[0, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    images[1, 8:40, 24:56] = torch.tensor([0.1, 0.1, 0.9])
    captions = ["a photo of a red toy", "a photo of a blue toy"]
    vae = dit.vae()
    for family_name in ("flux", "sd35"):
        family = dit.TinyFamily(family_name)
        print(f"tiny {family_name}: loss on the fixed probe, before -> after {steps} steps (share removed)")
        for layout, selection, rank in VARIANTS:
            with glue.training_mode():
                try:
                    adapter, step = trainer.prepare_training(family.model, family.clip, vae, tiny_clip_vision(), images,
                                                             captions, 64, False, 2, 0, False, None, False, layout,
                                                             rank, selection)
                except ValueError as error:
                    print(f"  {layout:<18} rank {rank:<3} {selection:<12} -- {error}")
                    continue
                before = probe_loss(step, 10_000, 3, seed=7)
                loop.train(dict(adapter.named_parameters()), step, lambda p: torch.optim.AdamW(p, lr=3e-3),
                           loop.LoopSettings(steps=steps, seed=0))
                after = probe_loss(step, 10_000, 3, seed=7)
            served = len(adapter.branch.blocks())
            count = sum(p.numel() for p in adapter.branch.parameters())
            print(f"  {layout:<18} rank {rank:<3} {selection:<12} {served} blocks {count / 1e6:6.2f} M: "
                  f"{before:.4f} -> {after:.4f} ({1 - after / before:6.1%})")
        dit.release(family_name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", action="store_true")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from harness.comfy_env import boot_comfy
    boot_comfy()
    print_sizes(args.rank)
    if args.measure:
        measure(args.steps)


if __name__ == "__main__":
    main()
