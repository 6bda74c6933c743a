"""The pack trainers set up for one optimizer step, shared by the trainer benchmarks (run as scripts, so this
folder is on sys.path; the test harness's folder must be too).

Each ``*_run`` function builds a trainer's real run through its own prepare function, as the node does, inside
``training_glue.training_mode()``, and returns a :class:`TrainerRun`: the trainer's micro-batch step function
and the optimizer over its trainables (the node's own AdamW and groups).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class TrainerRun:
    step: Callable  # MicroStep -> loss
    optimizer: torch.optim.Optimizer
    trained: dict[str, torch.Tensor]  # what the run trains (and its files hold)


def _images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def disendiff_run(model, clip, vae, size: int, micro_batch: int, accumulation: int, steps: int = 250,
                  checkpointing: Optional[bool] = None) -> TrainerRun:
    """DisenDiffTrainer: two concepts ("cat", "dog") of one image, without augmentation."""
    from harness.comfy_env import pack_module

    nodes_disendiff, disendiff = pack_module("nodes.disendiff"), pack_module("training.disendiff")
    settings = disendiff.DisenDiffSettings(steps=steps, micro_batch=micro_batch, grad_accumulation=accumulation,
                                           augment=False)
    run = nodes_disendiff.prepare_training(model, clip, vae, _images(1, size), ["cat", "dog"], "bench", settings,
                                           seed=1, resolution=size, gradient_checkpointing=checkpointing)
    optimizer = torch.optim.AdamW(list(run.params.values()), lr=settings.learning_rate, weight_decay=0.01)
    return TrainerRun(run.step, optimizer, run.params)


def detex_run(model, clip, vae, size: int, micro_batch: int, accumulation: int, attribute_source: str = "mappers",
              steps: int = 250, checkpointing: Optional[bool] = None) -> TrainerRun:
    """DecoupledTokenTrainer on three subject images with a centred square mask (the tiny CLIP vision model of the
    test harness feeds the mappers)."""
    from harness.comfy_env import pack_module
    from harness.pva_assets import tiny_clip_vision

    detex, recipe = pack_module("nodes.detex"), pack_module("training.detex")
    data, templates = pack_module("training.detex_data"), pack_module("training.detex_prompts")
    masks = torch.zeros(3, size, size)
    masks[:, size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    settings = recipe.DetexSettings(steps=steps, micro_batch=micro_batch, grad_accumulation=accumulation)
    run = detex.DetexTraining(model, clip, vae, tiny_clip_vision() if attribute_source == "mappers" else None,
                              data.prepare_subject(_images(3, size), masks, size),
                              templates.PromptTemplate.parse(templates.DEFAULT_TEMPLATE), "dog", attribute_source,
                              settings, seed=1, augmented_views=0, regularization_images=None, reg_caption="",
                              gradient_checkpointing=checkpointing)
    params = run.parameters()
    optimizer = recipe.optimizer_factory(settings, run.mapper_parameters())(list(params.values()))
    return TrainerRun(run.step, optimizer, params)


def realcustom_run(model, clip, vae, size: int, micro_batch: int, checkpointing: Optional[bool] = None,
                   word_mask: bool = False) -> TrainerRun:
    """RealCustomTrainer with the adaptive scoring module on two captioned images (the tiny CLIP vision model of
    the test harness encodes the references)."""
    from harness.comfy_env import pack_module
    from harness.realcustom import tiny_clip_vision

    trainer = pack_module("nodes.realcustom_trainer")
    adapter, step = trainer.prepare_training(
        model, clip, vae, tiny_clip_vision(), _images(2, size), ["a photo of a red toy on a table",
                                                                 "a photo of a blue toy in the grass"],
        size, False, micro_batch, seed=1, adaptive_scoring=True, target_words=["toy", "toy"],
        word_mask_training=word_mask, gradient_checkpointing=checkpointing)
    trained = dict(adapter.named_parameters())
    return TrainerRun(step, torch.optim.AdamW(list(trained.values()), lr=1e-4), trained)


def pva_run(model, clip, vae, size: int, stage1: bool, checkpointing: Optional[bool] = None) -> TrainerRun:
    """PVATrainer (``stage1``: projections, token transformer and identity word from the trainer's own initial PVA)
    or PVAIdentityTune (projections and word) on two photos of one person, one micro-batch per step; the identity
    encoder is the test harness's tiny CLIP vision model."""
    from harness.comfy_env import pack_module
    from harness.pva_assets import tiny_clip_vision

    training = pack_module("nodes.pva_training")
    photos = _images(2, size)
    pva = training.initial_pva(model, clip, "clip_vision", "person", seed=1, clip_vision=tiny_clip_vision(),
                               probe=photos)
    tune = training.prepare_training(model, clip, vae, pva, photos, ((0, 1),), stage1, 1, seed=1,
                                     clip_vision=tiny_clip_vision(), gradient_checkpointing=checkpointing)
    optimizer = training.identity_tune_optimizer(tune.params, 1e-5, 1e-3, 1e-4 if stage1 else 0.0)(
        list(tune.params.values()))
    return TrainerRun(tune.step, optimizer, tune.params)
