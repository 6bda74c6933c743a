"""The training loop every trainer of the pack runs: a plain-torch loop over a step function.

A trainer supplies its trainable tensors, a ``step_fn`` that returns the loss of one micro-batch, and
an optimizer factory; the loop does gradient accumulation, seeded randomness, atomic checkpoints,
resume, progress and interruption. ComfyUI objects never come in here: progress and interruption are
plain callables (the node glue passes ``comfy.utils.ProgressBar`` and
``comfy.model_management.throw_exception_if_processing_interrupted``).

Nothing trained is lost to an interruption, whichever way it arrives: ``check_interrupted`` before a
micro-batch, an exception from ``on_progress`` (ComfyUI's server raises on Cancel inside its progress hook)
or from the step itself, KeyboardInterrupt. The last finished step is checkpointed before the exception goes
on, whatever ``checkpoint_every`` says (0 means: only then and at the end).

Determinism and resume: every micro-batch gets its own ``torch.Generator`` seeded from
``(seed, step, micro)``, so the randomness of a step does not depend on what ran before it. A
checkpoint holds the trainables, the optimizer state and the finished step count; resuming from it
replays exactly the steps an uninterrupted run would take (the step function must draw all its
randomness from ``MicroStep.generator`` and keep no other state across steps).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .checkpoint import TrainingState
from .runs import RunCheckpoints

ProgressFn = Callable[[int, int, Optional[float]], None]
InterruptCheck = Callable[[], None]
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LoopSettings:
    """How long and how the loop runs.

    ``steps`` counts optimizer steps; each accumulates ``grad_accumulation`` micro-batches.
    ``checkpoints`` (the run's, see ``runs``) are resumed from and written every ``checkpoint_every`` steps
    when that is > 0, and always at the end and on an interruption.
    """

    steps: int
    grad_accumulation: int = 1
    seed: int = 0
    checkpoint_every: int = 0
    checkpoints: Optional[RunCheckpoints] = None

    def __post_init__(self):
        if self.steps < 1 or self.grad_accumulation < 1 or self.checkpoint_every < 0:
            raise ValueError(f"steps and grad_accumulation must be >= 1 and checkpoint_every >= 0, got {self}")


@dataclass(frozen=True)
class MicroStep:
    """What the step function gets: which micro-batch it computes and its private random generator."""

    step: int
    micro: int
    generator: torch.Generator


@dataclass
class TrainingResult:
    #: optimizer steps finished in total (including those of a resumed checkpoint)
    steps: int
    #: the step the run started from (0, or the resumed checkpoint's step)
    resumed_from: int
    #: mean micro-batch loss of every finished optimizer step, from step 0 (kept across resume)
    losses: list[float] = field(default_factory=list)


def micro_step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def fingerprint(**settings) -> str:
    """A stable id of a run's settings (JSON values, tensors and lists of tensors), the run id of ``runs``.
    Anything else is refused: a repr could hold a memory address, and the run would never resume."""
    digest = hashlib.sha256()
    for key in sorted(settings):
        digest.update(key.encode())
        _digest_value(digest, settings[key])
    return digest.hexdigest()


def _digest_value(digest, value) -> None:
    if torch.is_tensor(value):
        digest.update(str((tuple(value.shape), str(value.dtype))).encode())
        digest.update(value.detach().cpu().contiguous().float().numpy().tobytes())
    elif isinstance(value, (list, tuple)) and any(torch.is_tensor(v) for v in value):
        for item in value:
            _digest_value(digest, item)
    else:
        digest.update(json.dumps(value, sort_keys=True).encode())


def train(params: dict[str, torch.Tensor], step_fn: Callable[[MicroStep], torch.Tensor],
          make_optimizer: OptimizerFactory, settings: LoopSettings,
          on_progress: Optional[ProgressFn] = None, check_interrupted: Optional[InterruptCheck] = None) -> TrainingResult:
    """Optimise ``params`` (leaf tensors with ``requires_grad``) in place; see the module docstring.

    ``step_fn(micro) -> loss`` computes one micro-batch's scalar loss with autograd; the loop scales it
    by ``1/grad_accumulation`` and calls backward. ``on_progress(done, total, loss)`` is called once
    at the start (loss None) and after each optimizer step. ``check_interrupted()`` is called before
    every micro-batch and raises to stop. Whatever raises, the last finished step is checkpointed first.
    """
    trainables = list(params.values())
    if not trainables or not all(t.requires_grad and t.is_leaf for t in trainables):
        raise ValueError("train() needs leaf tensors with requires_grad=True")
    optimizer = make_optimizer(trainables)
    start, losses = _resume(params, optimizer, settings)
    saved = start  # the step the newest checkpoint holds (the resumed one, or 0: nothing to keep)
    done = start
    updating = False  # inside optimizer.step(): the parameters are neither the old step's nor the new one's

    def checkpoint(step: int) -> None:
        nonlocal saved
        if settings.checkpoints is None or step == saved:
            return
        detached = {k: v.detach() for k, v in params.items()}
        if not all(bool(torch.isfinite(t).all()) for t in detached.values()):
            return  # a diverged state is worth nothing: the previous checkpoint stays
        settings.checkpoints.save(TrainingState(step, detached, optimizer.state_dict(), settings.checkpoints.run_id,
                                                losses[:step]))
        saved = step

    try:
        if on_progress:
            on_progress(start, settings.steps, None)
        for step in range(start, settings.steps):
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(settings.grad_accumulation):
                if check_interrupted is not None:
                    check_interrupted()
                loss = step_fn(MicroStep(step, micro, micro_step_generator(settings.seed, step, micro)))
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower the learning rate")
                (loss / settings.grad_accumulation).backward()
                step_loss += loss.item() / settings.grad_accumulation
            updating = True
            optimizer.step()
            updating = False
            losses.append(step_loss)
            done = step + 1
            if settings.checkpoint_every and done % settings.checkpoint_every == 0:
                checkpoint(done)
            if on_progress:
                on_progress(done, settings.steps, step_loss)
    except BaseException:
        if not updating:
            checkpoint(done)
        raise
    checkpoint(settings.steps)
    optimizer.zero_grad(set_to_none=True)
    return TrainingResult(settings.steps, start, losses)


def _resume(params, optimizer, settings: LoopSettings) -> tuple[int, list[float]]:
    state = settings.checkpoints.load(settings.steps) if settings.checkpoints is not None else None
    if state is None:
        return 0, []
    if set(state.params) != set(params):
        raise ValueError(f"checkpoint of run {settings.checkpoints.run_id[:16]} holds {sorted(state.params)}, this run "
                         f"trains {sorted(params)}")
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(state.params[name])
    optimizer.load_state_dict(state.optimizer)
    return state.step, list(state.losses[:state.step])

