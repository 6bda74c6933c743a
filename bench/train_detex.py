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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from trainer_runs import detex_run, disendiff_run  # noqa: E402
from timing import compare_trainers, describe_peaks, describe_seconds, describe_trainer_run, optimizer_steps, parse_trainer_args  # noqa: E402 (needs the path above)

ACCUMULATION = 2


def build(loaded, options):
    """One configuration's optimizer step (runs in the child process)."""
    from harness.comfy_env import pack_module

    glue = pack_module("nodes.training_glue")
    size, steps = options["resolution"], options["steps"]
    with glue.training_mode():
        if options["trainer"] == "disendiff":
            run = disendiff_run(*loaded, size, 2, ACCUMULATION, steps=steps)
        else:
            run = detex_run(*loaded, size, 2, ACCUMULATION, options["attribute_source"], steps=steps)
    return optimizer_steps(run.step, run.optimizer, ACCUMULATION)


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
