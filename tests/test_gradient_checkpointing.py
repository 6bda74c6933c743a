"""Gradient checkpointing of the trainers' frozen model (training/checkpointing.py, nodes/training_glue.py
``checkpointed_blocks``): it must change nothing but memory. First a toy model that does to its blocks what ComfyUI's
models do (one options dict, rewritten before each block; state that hooks of one model call set while a block
runs; in-place adds to what a normalisation saved), then the trainers in the real ComfyUI: one training step's loss
and every trained gradient with the blocks checkpointed equal the plain step's (to float32's rounding), on the tiny
SD1.5 (DisenDiffTrainer: res blocks and spatial transformers, attention maps in the loss; RealCustomTrainer nightly),
Flux dev (PVATrainer: the parallel queries read the block's query input, which a hook of the model call records)
and Z-Image (RealCustomTrainer: blocks named by pre-hooks of the model call), and backward did recompute blocks."""
from __future__ import annotations

import contextlib

import pytest
import torch

from harness.comfy_env import pack_module
from harness.nightly import only_nightly
from personalization_nodes.training.checkpointing import CheckpointedForward


class ToyBlocks(torch.nn.Module):
    """Three blocks that do what ComfyUI's models do to theirs: called with one options dict that the model rewrites
    before each (ComfyUI writes the running block's name into transformer_options), reading an input that a hook of
    the model call records while the block runs (as the pack records a block's query input), and adding to their
    input in place after normalising it (Flux's blocks: ``x += ...``, the normalisation having saved ``x``)."""

    def __init__(self):
        super().__init__()
        self.scales = torch.nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
        self.recorded = None
        self.hook_active = False

    def block_forward(self, layer, x, options):
        normed = torch.nn.functional.layer_norm(x, (4,))
        if self.hook_active:
            self.recorded = normed
        x += layer(normed) * self.scales[options["block_index"]]
        return x + self.recorded.sin()

    @contextlib.contextmanager
    def call_hooks(self):
        self.hook_active = True
        try:
            yield
        finally:
            self.hook_active = False

    def forward(self, x, forwards):
        options = {}
        with self.call_hooks():
            for i, block in enumerate(self.blocks):
                options["block_index"] = i
                x = forwards[i](block, x=x, options=options)  # by name, as Flux calls its blocks
        return x.square().sum()


def toy_gradients(checkpointed: bool):
    torch.manual_seed(0)
    model = ToyBlocks()
    x = torch.randn(2, 4)  # an input without gradient, which the first block's in-place add gives one
    if checkpointed:
        forwards = [CheckpointedForward(model.block_forward, lambda args, kwargs: model.call_hooks())
                    for _ in model.blocks]
    else:
        forwards = [model.block_forward] * 3
    # as the trainers run the frozen model: autograd keeps copies of what it saves (nodes.training_glue)
    with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
        loss = model(x, forwards)
    loss.backward()
    return [p.grad.clone() for p in model.parameters()], forwards


def test_a_checkpointed_block_recomputes_what_it_computed_in_the_forward_pass():
    plain, _ = toy_gradients(False)
    checkpointed, forwards = toy_gradients(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checkpointed))
    assert [f.recomputations for f in forwards] == [1, 1, 1]


def one_step_gradients(prepare, params_of, monkeypatch, checkpointing: bool):
    """Loss and gradients of one micro-step of the trainer that ``prepare(checkpointing)`` sets up, and the
    checkpointed forwards it installed."""
    glue = pack_module("nodes.training_glue")
    loop = pack_module("training.loop")
    installed = []
    real = glue.checkpointed_blocks
    monkeypatch.setattr(glue, "checkpointed_blocks", lambda patched: installed.extend(real(patched)) or installed)
    with glue.training_mode():
        prepared = prepare(checkpointing)
        params = params_of(prepared)
        step = prepared[1] if isinstance(prepared, tuple) else prepared.step
        loss = step(loop.MicroStep(0, 0, loop.micro_step_generator(3, 0, 0)))
        loss.backward()
    monkeypatch.setattr(glue, "checkpointed_blocks", real)
    return loss.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}, installed


def check_checkpointing_changes_nothing(prepare, params_of, monkeypatch):
    loss, grads, none = one_step_gradients(prepare, params_of, monkeypatch, False)
    loss_ckpt, grads_ckpt, forwards = one_step_gradients(prepare, params_of, monkeypatch, True)
    assert not none and forwards and sum(f.recomputations for f in forwards) >= len(forwards) // 2
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and any(bool(g.abs().sum() > 0) for g in grads.values())
    for name in grads:  # float32 rounding: the same operations, a copied input may take another kernel
        error = float((grads_ckpt[name] - grads[name]).norm())
        assert error <= 1e-5 * float(grads[name].norm()) + 1e-12, (name, error)


def realcustom_prepare(model, clip, vae):
    from harness.realcustom import tiny_clip_vision
    from test_realcustom_trainer_dit import CAPTIONS, dataset
    trainer = pack_module("nodes.realcustom_trainer")
    return lambda checkpointing: trainer.prepare_training(
        model, clip, vae, tiny_clip_vision(), dataset(), CAPTIONS.split("\n"), 64, False, 2, 0, True,
        ["toy", "toy"], False, gradient_checkpointing=checkpointing)


def realcustom_params(prepared):
    return dict(prepared[0].named_parameters())


def test_disendiff_on_sd15_with_its_attention_maps_in_the_loss(sd15, monkeypatch):
    """DisenDiff's calibration losses read the attention maps its recorder keeps from inside the blocks (with their
    graph), and its K/V changes are weight wrappers of the frozen layers."""
    disendiff = pack_module("nodes.disendiff")
    recipe = pack_module("training.disendiff")
    settings = recipe.DisenDiffSettings(steps=1, learning_rate=1e-3, micro_batch=2, grad_accumulation=1, augment=False)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))

    def prepare(checkpointing):
        return disendiff.prepare_training(*sd15, image, ["cat", "dog"], "ckpt_test", settings, seed=1, resolution=64,
                                          gradient_checkpointing=checkpointing)
    check_checkpointing_changes_nothing(prepare, lambda prepared: prepared.params, monkeypatch)


def test_realcustom_on_sd15_res_blocks_and_transformers(sd15, monkeypatch):
    only_nightly("the default run checkpoints SD1.5's blocks with DisenDiff's trainer")
    check_checkpointing_changes_nothing(realcustom_prepare(*sd15), realcustom_params, monkeypatch)


def test_realcustom_on_zimage_blocks_named_by_hooks_of_the_call(comfy, monkeypatch):
    from harness import dit
    from harness.zimage import TinyZImage
    zimage = TinyZImage()
    check_checkpointing_changes_nothing(realcustom_prepare(zimage.model, zimage.clip, dit.vae()), realcustom_params,
                                        monkeypatch)


def test_pva_stage1_on_flux_parallel_queries_from_recorded_block_inputs(comfy, monkeypatch):
    from harness import dit
    from harness.family_techniques import family_pva
    from harness.pva_assets import faces, tiny_clip_vision
    flux = dit.TinyFamily("flux")
    pva = family_pva(flux)
    training = pack_module("nodes.pva_training")

    def prepare(checkpointing):
        return training.prepare_training(flux.model, flux.clip, dit.vae(), pva, faces(4, seed=5, size=32),
                                         ((0, 1), (2, 3)), True, 1, 0, tiny_clip_vision(),
                                         gradient_checkpointing=checkpointing)
    check_checkpointing_changes_nothing(prepare, lambda prepared: prepared.params, monkeypatch)


@pytest.mark.parametrize("parameters, resolution, expected", [(0.86e9, 512, True), (12e9, 1024, True),
                                                              (0.02e9, 512, False), (0.02e9, 1024, True)])
def test_the_default_checkpoints_large_models_and_high_resolutions(parameters, resolution, expected):
    glue = pack_module("nodes.training_glue")

    class Model:  # a model of that many parameters, without allocating them
        class model:
            class diffusion_model:
                @staticmethod
                def parameters():
                    return [torch.empty(int(parameters), device="meta")]
    assert glue.checkpoints_blocks(Model, resolution) is expected
    assert glue.checkpoints_blocks(Model, resolution, asked=not expected) is (not expected)
