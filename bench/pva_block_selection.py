"""PVA block selections compared on the tiny Flux dev of the test harness (real ComfyUI, CPU): for each selection
a fresh low-rank file (rank 16, the paper's initialisation: no change yet) is tuned the same steps on the same two
photos (PVAIdentityTune's step, the projections only, word frozen), and the flow-matching loss on a fixed probe
(the trainer tests' probe) is printed before and after, with the trainable parameters. Random tiny weights say
nothing about identity transfer; this measures how much of the fit each selection keeps per parameter.

Usage: .venv/bin/python bench/pva_block_selection.py [--steps N] [--learning-rate LR] [--selections all double ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SELECTIONS = ("all", "double", "every_2", "every_4")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=SELECTIONS)
    args = parser.parse_args()
    from harness import dit
    from harness.comfy_env import boot_comfy, pack_module
    from harness.pva_assets import dit_pva_weights, faces, loaded_pva, tiny_clip_vision
    from harness.training_probes import probe_loss
    boot_comfy()
    nodes_tune, glue, loop = (pack_module(m) for m in ("nodes.pva_training", "nodes.training_glue", "training.loop"))
    family = dit.TinyFamily("flux")
    photos = faces(2, seed=6, size=64)
    print(f"{'blocks':8} {'parameters':>10} {'probe loss before':>18} {'after':>9} {'change':>8}")
    for selection in args.selections:
        pva = loaded_pva(dit_pva_weights("flux", family.model, perturbed=False, rank=16, block_selection=selection))
        with glue.training_mode():
            tune = nodes_tune.prepare_identity_tune(family.model, family.clip, dit.vae(), pva,
                                                    glue.clone_tensors(photos), bins=2, seed=1,
                                                    clip_vision=tiny_clip_vision())
            params = {k: p for k, p in tune.params.items() if k.startswith("parallel.")}
            before = probe_loss(tune.step, 50, 8, seed=99, micros=2)
            optimizer = nodes_tune.identity_tune_optimizer(params, args.learning_rate, 0.0)
            loop.train(params, tune.step, optimizer, loop.LoopSettings(args.steps, 2, 1, 0, None))
            after = probe_loss(tune.step, 50, 8, seed=99, micros=2)
        count = sum(p.numel() for p in params.values())
        print(f"{selection:8} {count:10,} {before:18.5f} {after:9.5f} {100 * (after - before) / before:7.2f}%")


if __name__ == "__main__":
    main()
