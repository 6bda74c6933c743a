"""DETEX trainer benchmark; prints ratios measured in one run (never asserted in tests).

Seconds per optimizer step (micro-batch 2 × accumulation 2) and peak GPU memory of the DETEX trainer
(attribute mappers; and the free-vectors switch) next to the DisenDiff trainer on the same model,
resolution, batch and accumulation. DETEX adds one text encoding per sample (each sample has its own
pose/background words) and two small MLPs; DisenDiff adds attention-map capture. Both train the same
K/V deltas with the same shared loop, so the ratio shows what each technique's extras cost.

Runs on the tiny SD1.5 of the test harness (real ComfyUI; CPU unless a GPU is there).
Usage: .venv/bin/python bench/train_detex.py [--resolution 128] [--steps 3]
"""
from __future__ import annotations

import argparse
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
    from harness.pva_assets import tiny_clip_vision

    boot_comfy()
    detex = pack_module("nodes.detex")
    recipe = pack_module("training.detex")
    data = pack_module("training.detex_data")
    templates = pack_module("training.detex_prompts")
    glue = pack_module("nodes.training_glue")
    loop = pack_module("training.loop")
    model, clip, vae = load_sd15()
    size = args.resolution
    images = torch.rand(3, size, size, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(3, size, size)
    masks[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    accumulation = 2

    def timed(step, params, make_optimizer) -> tuple[float, float]:
        optimizer = make_optimizer(list(params.values()))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for index in range(args.steps + 1):  # the first step warms up
            start = time.perf_counter()
            for micro in range(accumulation):
                loss = step(loop.MicroStep(index, micro, loop.micro_step_generator(1, index, micro)))
                (loss / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
        return min(times[1:]), peak

    def run_detex(source: str) -> tuple[float, float]:
        settings = recipe.DetexSettings(steps=args.steps, micro_batch=2, grad_accumulation=accumulation)
        with glue.training_mode():
            run = detex.DetexTraining(model, clip, vae, tiny_clip_vision() if source == "mappers" else None,
                                      data.prepare_subject(images, masks, size),
                                      templates.PromptTemplate.parse(templates.DEFAULT_TEMPLATE), "dog", source,
                                      settings, seed=1, augmented_views=0, regularization_images=None, reg_caption="")
            return timed(run.step, run.parameters(), recipe.optimizer_factory(settings, run.mapper_parameters()))

    def run_disendiff() -> tuple[float, float]:
        nodes_disendiff = pack_module("nodes.disendiff")
        disendiff = pack_module("training.disendiff")
        settings = disendiff.DisenDiffSettings(steps=args.steps, micro_batch=2, grad_accumulation=accumulation, augment=False)
        with glue.training_mode():
            run = nodes_disendiff.prepare_training(model, clip, vae, images[:1], ["cat", "dog"], "bench", settings,
                                                   seed=1, resolution=size)
            return timed(run.step, run.params, lambda tensors: torch.optim.AdamW(tensors, lr=settings.learning_rate,
                                                                                  weight_decay=0.01))

    mappers, mappers_peak = run_detex("mappers")
    free, free_peak = run_detex("free vectors")
    disendiff, disendiff_peak = run_disendiff()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}, tiny SD1.5, {size}px, micro-batch 2 x accumulation {accumulation}")
    print(f"seconds per optimizer step: DETEX mappers {mappers:.3f}, DETEX free vectors {free:.3f}, "
          f"DisenDiff {disendiff:.3f}")
    print(f"ratios: DETEX/DisenDiff {mappers / disendiff:.3f}, mappers/free vectors {mappers / free:.3f}")
    print(f"peak GPU memory MiB: DETEX mappers {mappers_peak:.0f}, free vectors {free_peak:.0f}, DisenDiff {disendiff_peak:.0f}")


if __name__ == "__main__":
    main()
