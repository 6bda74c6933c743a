"""RealCustom image-branch layouts and block selections, trained alike; prints what it measured in one run (never
asserted in tests). Their sizes at full scale: bench/adapter_sizes.py (RealCustom section).

On the tiny Flux dev and SD3.5 Large of the test harness (real ComfyUI, CPU unless a GPU is there), each layout /
rank / block selection trains the same way (released setting: no scoring, ungated; 16 AdamW steps at lr 3e-3,
batch 2, 64 px), and the loss on a fixed probe (3 micro-steps of noise and timesteps the training never draws) is
taken before and after: the share of the loss it removed.

Usage: .venv/bin/python bench/realcustom_branch.py [--steps 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = [("per-block", "all", 16), ("shared + low-rank", "all", 16), ("shared + low-rank", "all", 4),
            ("shared + low-rank", "double", 16), ("shared + low-rank", "every_2", 16)]


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
                adapter, step = trainer.prepare_training(family.model, family.clip, vae, tiny_clip_vision(), images,
                                                         captions, 64, False, 2, 0, False, None, False, layout, rank,
                                                         selection)
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
    parser.add_argument("--steps", type=int, default=16)
    measure(parser.parse_args().steps)


if __name__ == "__main__":
    main()
