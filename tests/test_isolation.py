"""Hardening: patched and unpatched graphs, cached and uncached, in ONE ComfyUI process never leak into
each other, and memory does not grow run after run."""
import gc
import random
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from harness import checkpoints
from harness.pack_nodes import SHARED_ATTENTION_DEFAULTS
from harness.tiny_workflows import shrink_for_tiny_models
from harness.workflows import execute_workflow, load_ui_workflow, new_executor, ui_to_api

RUNS = 70  # 50 after the warm-up: a leak of a few MiB per run shows; fewer keeps the suite in its 10 minutes


def graph(seed: int, patch: dict | None) -> dict:
    """txt2img on the tiny SD1.5, optionally through SharedAttentionBatch with ``patch`` overrides."""
    api = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoints.sd15_checkpoint_path().name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a toy train, origami"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 2, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
    }
    api["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "isolation"}}
    if patch is not None:
        api["shared"] = {"class_type": "SharedAttentionBatch",
                         "inputs": {"model": ["ckpt", 0], **{**SHARED_ATTENTION_DEFAULTS, **patch}}}
        api["sampler"]["inputs"]["model"] = ["shared", 0]
    return api


def latent_of(results) -> torch.Tensor:
    return results["sampler"].outputs[0][0]["samples"]


PATCHES = [
    {},
    {"share_group_norm": True},
    {"shared_score_shift": 0.693, "share_group_norm": True},
    {"full_attention_share": True},
    {"blocks": "middle", "start_percent": 0.2},
]


def test_mixed_runs_never_leak_and_memory_stays_flat(comfy):
    seeds = (1, 2)
    baseline = {seed: latent_of(execute_workflow(graph(seed, None))) for seed in seeds}
    executor = new_executor()  # one executor for all runs, as the server keeps one
    rng = random.Random(0)
    process = psutil.Process()
    rss_after_warmup = None
    for run in range(RUNS):
        seed = rng.choice(seeds)
        patch = rng.choice([None, None, *PATCHES])  # a third of the runs unpatched
        if rng.random() < 0.3:
            seed = 100 + run  # a fresh seed: the sampler runs again (uncached), the loaders stay cached
        results = execute_workflow(graph(seed, patch), executor=executor)
        if patch is None and seed in baseline:
            assert torch.equal(latent_of(results), baseline[seed]), f"run {run}: unpatched output changed"
        if run == 19:
            gc.collect()
            rss_after_warmup = process.memory_info().rss
    gc.collect()
    growth = process.memory_info().rss - rss_after_warmup
    assert growth < 300 * 2**20, f"memory grew by {growth / 2**20:.0f} MiB over {RUNS - 20} runs"


# ---- one process, one executor: sampling with the pack's object patches, then every trainer -----------------------

def _workflow_graph(stem: str, input_dir: Path) -> dict:
    path = Path(__file__).resolve().parents[1] / "workflows" / f"{stem}.json"
    return shrink_for_tiny_models(ui_to_api(load_ui_workflow(path)), input_dir)


def _pva_graph(node: str, input_dir: Path) -> dict:
    """PVATrainer / PVAIdentityTune on the tiny SD1.5 (the checkpoint the StyleAligned graph sampled with),
    continuing from the tiny PVA file, 1 step."""
    from harness.pva_assets import arcface_path, pva_path
    arcface_path()
    photo = "isolation_face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(input_dir / photo)
    photos = "images" if node == "PVATrainer" else "photos"
    common = dict(model=["ckpt", 0], clip=["ckpt", 1], vae=["ckpt", 2], pva=["pva", 0], name=f"isolation_{node}",
                  steps=1, learning_rate=1e-4, word_learning_rate=1e-3, timestep_bins=1, seed=0, checkpoint_every=0,
                  resolution=64)
    common[photos] = ["photos", 0]
    if node == "PVATrainer":
        common.update(images_per_identity=2, encoder="arcface", transformer_learning_rate=1e-4, init_word="person")
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoints.sd15_checkpoint_path().name}},
        "pva": {"class_type": "PVALoader", "inputs": {"pva_name": pva_path("arcface").name}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "photos": {"class_type": "RepeatImageBatch", "inputs": {"image": ["photo", 0], "amount": 2}},
        "train": {"class_type": node, "inputs": common},
    }


TRAINER_GRAPHS = {
    "DisenDiffTrainer": lambda d: _workflow_graph("05 DisenDiff - learn two concepts from one photo, then sample", d),
    "DecoupledTokenTrainer": lambda d: _workflow_graph(
        "07 DETEX - learn a subject without its poses and backgrounds", d),
    "RealCustomTrainer": lambda d: _workflow_graph("09 RealCustom - train an image branch, then sample", d),
    "PVATrainer": lambda d: _pva_graph("PVATrainer", d),
    "PVAIdentityTune": lambda d: _pva_graph("PVAIdentityTune", d),
}
#: every object patch the pack makes on a shared U-Net (StyleAligned's GroupNorm sharing), as node inputs
OBJECT_PATCHING_GRAPHS = {"share_group_norm": {"share_group_norm": True}}


#: the trainers this runs on by default: one whose trainable copy patches the U-Net's attention (RealCustom) and one
#: that also trains through the text encoder (PVA stage 1); the others build their trainable copies with the same
#: training_glue and run nightly
TRAINERS_BY_DEFAULT = ("RealCustomTrainer", "PVATrainer")


@pytest.mark.parametrize("patch", OBJECT_PATCHING_GRAPHS, ids=str)
@pytest.mark.parametrize("trainer", [name if name in TRAINERS_BY_DEFAULT else pytest.param(name, marks=pytest.mark.nightly)
                                     for name in TRAINER_GRAPHS])
def test_trainer_after_sampling_with_object_patches_in_one_process(comfy, trainer, patch):
    """ComfyUI keeps the last sampled clone's object patches applied to the shared U-Net: a trainer that
    discovered its modules from that live tree missed the norms (the newcomer's crash 'Inference tensors
    cannot be saved for backward' in group_norm)."""
    executor = new_executor()
    input_dir = Path(comfy.folder_paths.get_input_directory())
    execute_workflow(graph(7, OBJECT_PATCHING_GRAPHS[patch]), executor=executor)
    graph_of_trainer = TRAINER_GRAPHS[trainer](input_dir)
    assert any(node["class_type"] == trainer for node in graph_of_trainer.values())
    execute_workflow(graph_of_trainer, executor=executor)
    # nothing of the training run stays on the shared U-Net: sampling after it equals a fresh process's
    after_training = latent_of(execute_workflow(graph(8, OBJECT_PATCHING_GRAPHS[patch]), executor=executor))
    fresh = latent_of(execute_workflow(graph(8, OBJECT_PATCHING_GRAPHS[patch]), executor=new_executor()))
    assert torch.equal(after_training, fresh)
