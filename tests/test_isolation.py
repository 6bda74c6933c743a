"""Hardening: patched and unpatched graphs, cached and uncached, in ONE ComfyUI process never leak into
each other, and memory does not grow run after run."""
import gc
import random

import psutil
import torch

from harness import checkpoints
from harness.pack_nodes import SHARED_ATTENTION_DEFAULTS
from harness.workflows import execute_workflow, new_executor

RUNS = 100


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
