"""DisenDiff trainer benchmark; prints ratios measured in one run (never asserted in tests).

Seconds per optimizer step (micro-batch 2 × accumulation 2) and peak memory of our trainer vs a
straightforward reference loop over the same model, batch, noise and losses: the reference
materialises the attention probabilities of EVERY cross-attention layer per head (as the official
code's patched CrossAttention stores them) and picks the map layers afterwards, where ours reads
head-averaged maps of the map layers only and keeps the fused attention elsewhere. Target: ≤ 1.0.

Each variant runs in its own child process (bench/timing.py ``compare_trainers``), whose peak
resident memory above the loaded model is reported on the CPU, plus CUDA's peak allocation on a GPU;
their steps alternate, so machine load affects them alike.
Runs on the tiny SD1.5 of the test harness (real ComfyUI; CPU unless a GPU is there).
Usage: .venv/bin/python bench/train_disendiff.py [--resolution 128] [--steps 3]
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from timing import compare_trainers, describe_peaks, describe_seconds, describe_trainer_run, optimizer_steps, parse_trainer_args  # noqa: E402 (needs the path above)

ACCUMULATION = 2


def build(loaded, options):
    """One variant's optimizer step (runs in the child process)."""
    from harness.comfy_env import pack_module

    model, clip, vae = loaded
    nodes_disendiff, glue = pack_module("nodes.disendiff"), pack_module("nodes.training_glue")
    recipe, maps, patching = pack_module("training.disendiff"), pack_module("attention.token_maps"), pack_module("nodes.patching")
    size = options["resolution"]
    latent_shape = (1, 4, size // 8, size // 8)

    class EveryLayerRecorder(maps.MapRecorder):
        """Reference: full per-head probabilities of every cross-attention layer, filtered afterwards."""

        def active(self, call):
            return True

        def read_probs(self, probs, call):
            self.maps.append((call.block, probs))

        def layer_mean(self):
            kept = [maps.to_spatial(p.mean(1), latent_shape) for key, p in self.maps if key in self.blocks]
            return torch.stack(kept).mean(0)

    image = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(0))
    settings = recipe.DisenDiffSettings(steps=options["steps"], micro_batch=2, grad_accumulation=ACCUMULATION,
                                        augment=False)
    with glue.training_mode():
        run = nodes_disendiff.prepare_training(model, clip, vae, image, ["cat", "dog"], "bench", settings,
                                               seed=1, resolution=size)
        step = run.step
        if options["reference"]:
            naive = EveryLayerRecorder(blocks=step.recorder.blocks)
            blocks = [b for b in patching.transformer_blocks(model) if b.has_cross_attention]
            patching.add_attention_processor(run.trainable, naive, blocks)
            step = dataclasses.replace(step, recorder=naive)
        optimizer = torch.optim.AdamW(list(run.params.values()), lr=settings.learning_rate, weight_decay=0.01)

    return optimizer_steps(step, optimizer, ACCUMULATION)


def main() -> None:
    args = parse_trainer_args()
    common = {"resolution": args.resolution, "steps": args.steps}
    results = compare_trainers(build, {"ours": {**common, "reference": False},
                                       "reference": {**common, "reference": True}}, args.steps)
    ours, ref = results["ours"], results["reference"]
    print(describe_trainer_run(args, ACCUMULATION))
    print(describe_seconds(results, ("ours", "reference"), " (target <= 1.0)"))
    print(describe_peaks(results))
    print(f"peak RSS ratio ours/reference {ours.peak.rss_mib / ref.peak.rss_mib:.3f}")
    if ours.peak.cuda_mib is not None:
        print(f"peak CUDA memory ratio ours/reference {ours.peak.cuda_mib / ref.peak.cuda_mib:.3f}")


if __name__ == "__main__":
    main()
