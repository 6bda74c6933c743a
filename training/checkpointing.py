"""Gradient checkpointing of a model's repeated blocks (per block, as ComfyUI's own LoRA trainer offers it).

A checkpointed block keeps only its inputs during the forward pass; backward runs the block again to get what it
needs. The result is the plain run's to the bit: the recomputation performs the same operations on the same inputs.
Four things would make it differ, and :class:`CheckpointedForward` takes care of them:

- a model that hands its blocks one options dict and changes it between blocks (ComfyUI writes the running block's
  name into ``transformer_options`` before each): the recomputation, run during backward, would see the last
  block's name. Every dict argument is copied when the block is called, so it recomputes with what it first saw.
- a block that adds in place to an input it gets by name (ComfyUI's Flux blocks: ``img += ...``): the
  recomputation would start from the changed input (torch's checkpoint keeps the positional ones itself). Each run
  of the block gets its own copy of every tensor passed by name (autograd sees the copy).
- a block that changes in place a tensor autograd saved from it (Flux's blocks normalise ``x`` and later add to
  it): the checkpoint keeps what the recomputation saves as it is, so backward would read the changed tensor
  (the plain run is protected by the trainers' saved-tensor copies, which do not reach inside a checkpoint). The
  recomputation saves copies (:func:`_saving_copies`), only while backward recomputes one block.
- state a block's forward reads from hooks that live for one model call (hooks that record each block's inputs
  for a processor): the recomputation runs after the call. ``recompute_context(args, kwargs)`` gives the context
  to re-enter around a recomputation.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional

import torch
from torch.utils.checkpoint import checkpoint

RecomputeContext = Callable[[tuple, dict], ContextManager]


def _no_context(_args, _kwargs) -> ContextManager:
    return contextlib.nullcontext()


@contextlib.contextmanager
def _saving_copies():
    """Inside a recomputation: the checkpoint's own saving (the innermost saved-tensor hooks) gets a copy of each
    tensor autograd saves."""
    pack, unpack = torch._C._autograd._top_saved_tensors_default_hooks(False)
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: pack(tensor.clone()), unpack):
        yield


def _snapshot(value):
    return dict(value) if isinstance(value, dict) else value


def _own_copy(value):
    return value.clone() if torch.is_tensor(value) and value.is_floating_point() else value


class CheckpointedForward:
    """A drop-in ``forward`` of one block that checkpoints it whenever gradients are on."""

    def __init__(self, forward: Callable, recompute_context: Optional[RecomputeContext] = None):
        self.forward = forward
        self.recompute_context = recompute_context or _no_context
        #: how many times backward recomputed the block (what shows the checkpointing at work)
        self.recomputations = 0

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        args = tuple(_snapshot(a) for a in args)
        kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
        first_run = True

        def run(*run_args, **run_kwargs):
            nonlocal first_run
            run_kwargs = {k: _own_copy(v) for k, v in run_kwargs.items()}
            if first_run:
                first_run = False
                return self.forward(*run_args, **run_kwargs)
            self.recomputations += 1
            with self.recompute_context(run_args, run_kwargs), _saving_copies():
                return self.forward(*run_args, **run_kwargs)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)
