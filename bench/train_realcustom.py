"""RealCustomTrainer benchmark; prints ratios measured in one run (never asserted in tests).

Seconds per optimizer step (micro-batch 2 × accumulation 2) and peak memory of the paper's training
(branch ungated, eq. 4, with the adaptive scoring module) vs our [R] word-mask training, which adds a
no-grad text-only forward per micro-batch to read each caption's word mask and gates the branch with it.
The ratio is the price of the option; the paper's default pays nothing for the target words.

Each variant runs in its own child process (bench/timing.py ``compare_trainers``); their steps alternate,
so machine load affects them alike. Runs on the tiny SD1.5 of the test harness (real ComfyUI; CPU unless
a GPU is there).
Usage: .venv/bin/python bench/train_realcustom.py [--resolution 128] [--steps 3]
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from trainer_runs import realcustom_run  # noqa: E402
from timing import compare_trainers, describe_peaks, describe_seconds, describe_trainer_run, optimizer_steps, parse_trainer_args  # noqa: E402 (needs the path above)

ACCUMULATION = 2


def build(loaded, options):
    """One variant's optimizer step (runs in the child process)."""
    from harness.comfy_env import pack_module

    with pack_module("nodes.training_glue").training_mode():
        run = realcustom_run(*loaded, options["resolution"], 2, word_mask=options["word_mask"])
    return optimizer_steps(run.step, run.optimizer, ACCUMULATION)


def main() -> None:
    args = parse_trainer_args()
    common = {"resolution": args.resolution}
    results = compare_trainers(build, {"paper": {**common, "word_mask": False},
                                       "word mask": {**common, "word_mask": True}}, args.steps)
    print(describe_trainer_run(args, ACCUMULATION))
    print(describe_seconds(results, ("word mask", "paper")))
    print(describe_peaks(results))


if __name__ == "__main__":
    main()
