"""What the trainer tests measure a step function with: the loss of fixed micro-steps, and a cancel at a given
check of the training loop."""
from __future__ import annotations

import torch

from .comfy_env import pack_module


def probe_loss(step, first: int, count: int, seed: int, micros: int = 1) -> float:
    """Mean loss, without gradients, of the micro-steps ``first .. first + count - 1`` of a trainer's ``step``
    (micro index: position mod ``micros``), each drawing from ``micro_step_generator(seed, step, 0)``: the same
    noise and timesteps before and after training."""
    loop = pack_module("training.loop")
    with torch.no_grad():
        return sum(float(step(loop.MicroStep(first + i, i % micros, loop.micro_step_generator(seed, first + i, 0))))
                   for i in range(count)) / count


def interrupting_at(call: int | None):
    """A ``check_interrupted`` for ``training.loop.train`` that raises KeyboardInterrupt at its ``call``-th call
    (the loop checks every micro-step), as a cancel inside a step; None never interrupts."""
    calls = 0

    def check():
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
    return check
