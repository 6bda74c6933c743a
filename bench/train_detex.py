"""DETEX trainer benchmark; prints ratios measured in one run (never asserted in tests).

Seconds per optimizer step (micro-batch 2 × accumulation 2) and peak memory of the DETEX trainer
(attribute mappers; and the free-vectors switch) next to the DisenDiff trainer on the same model,
resolution, batch and accumulation. DETEX adds one text encoding per sample (each sample has its own
pose/background words) and two small MLPs; DisenDiff adds attention-map capture and a VAE encode of fresh
target views per micro-batch (DETEX encodes its pool of views once). Both train the same
K/V deltas with the same shared loop, so the ratio shows what each technique's extras cost.

Each configuration runs in its own child process (bench/timing.py ``compare_trainers``), whose peak
resident memory above the loaded model is reported on the CPU, plus CUDA's peak allocation on a GPU.
Runs on the tiny SD1.5 of the test harness (real ComfyUI; CPU unless a GPU is there).
Usage: .venv/bin/python bench/train_detex.py [--resolution 128] [--steps 3]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from timing import compare_trainers, describe_peaks, describe_seconds, describe_trainer_run, optimizer_steps, parse_trainer_args  # noqa: E402 (needs the path above)

ACCUMULATION = 2


def build(loaded, options):
    """One configuration's optimizer step (runs in the child process)."""
    from harness.comfy_env import pack_module
    from harness.pva_assets import tiny_clip_vision

    model, clip, vae = loaded
    glue = pack_module("nodes.training_glue")
    size, steps = options["resolution"], options["steps"]
    images = torch.rand(3, size, size, 3, generator=torch.Generator().manual_seed(0))
    with glue.training_mode():
        if options["trainer"] == "disendiff":
            nodes_disendiff, disendiff = pack_module("nodes.disendiff"), pack_module("training.disendiff")
            settings = disendiff.DisenDiffSettings(steps=steps, micro_batch=2, grad_accumulation=ACCUMULATION,
                                                   augment=False)
            run = nodes_disendiff.prepare_training(model, clip, vae, images[:1], ["cat", "dog"], "bench", settings,
                                                   seed=1, resolution=size)
            step, params = run.step, run.params
            optimizer = torch.optim.AdamW(list(params.values()), lr=settings.learning_rate, weight_decay=0.01)
        else:
            detex, recipe = pack_module("nodes.detex"), pack_module("training.detex")
            data, templates = pack_module("training.detex_data"), pack_module("training.detex_prompts")
            masks = torch.zeros(3, size, size)
            masks[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
            source = options["attribute_source"]
            settings = recipe.DetexSettings(steps=steps, micro_batch=2, grad_accumulation=ACCUMULATION)
            run = detex.DetexTraining(model, clip, vae, tiny_clip_vision() if source == "mappers" else None,
                                      data.prepare_subject(images, masks, size),
                                      templates.PromptTemplate.parse(templates.DEFAULT_TEMPLATE), "dog", source,
                                      settings, seed=1, augmented_views=0, regularization_images=None, reg_caption="")
            step, params = run.step, run.parameters()
            optimizer = recipe.optimizer_factory(settings, run.mapper_parameters())(list(params.values()))

    return optimizer_steps(step, optimizer, ACCUMULATION)


def main() -> None:
    args = parse_trainer_args()
    common = {"resolution": args.resolution, "steps": args.steps}
    results = compare_trainers(build, {
        "DETEX mappers": {**common, "trainer": "detex", "attribute_source": "mappers"},
        "DETEX free vectors": {**common, "trainer": "detex", "attribute_source": "free vectors"},
        "DisenDiff": {**common, "trainer": "disendiff"},
    }, args.steps)
    seconds = {name: r.seconds_per_step for name, r in results.items()}
    print(describe_trainer_run(args, ACCUMULATION))
    print(describe_seconds(results))
    print(f"ratios: DETEX/DisenDiff {seconds['DETEX mappers'] / seconds['DisenDiff']:.3f}, "
          f"mappers/free vectors {seconds['DETEX mappers'] / seconds['DETEX free vectors']:.3f}")
    print(describe_peaks(results))
    mappers, disendiff = results["DETEX mappers"].peak, results["DisenDiff"].peak
    print(f"peak RSS ratio DETEX/DisenDiff {mappers.rss_mib / disendiff.rss_mib:.3f}")


if __name__ == "__main__":
    main()
