"""Every trainer in the edit-and-run loop a user goes through, executed by ComfyUI's own executor (one executor for
the whole loop, as the server keeps one), and Cancel pressed through the server's own progress hook.

The loop: train, then more steps (the run continues), a new seed and a new image (new runs: the earlier run's
exported files are kept under the next numbered name, never overwritten), then back to the first settings (the
first run is found finished: nothing is trained again and its files come back, bit for bit). The rules are those
of training/runs.py; tests/test_training_core.py checks them on a toy problem, with bit-exact resumes.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import checkpoints, pva_assets
from harness import realcustom as realcustom_assets
from harness.server_hook import server_progress_hook
from harness.tiny_workflows import write_input_image
from harness.workflows import WorkflowExecutionError, execute_workflow, new_executor

RUN_ID_KEY = "training_run"
SIZE = 64
IMAGES = ("edit_loop_a.png", "edit_loop_b.png")
#: each trainer's exported files: (models folder, suffix after the output name)
EXPORTS = {
    "DisenDiffTrainer": [("embeddings", "_new1"), ("embeddings", "_new2"), ("loras", "_disendiff_kv")],
    "DecoupledTokenTrainer": [("embeddings", "_V"), ("embeddings", "_pose_0"), ("embeddings", "_bg_2"),
                              ("loras", "_detex_kv")],
    "RealCustomTrainer": [("realcustom", "")],
    "PVATrainer": [("pva", "")],
    "PVAIdentityTune": [("pva", "")],
}
CHECKPOINT_FOLDERS = {"DisenDiffTrainer": "disendiff_checkpoints", "DecoupledTokenTrainer": "detex_checkpoints",
                      "RealCustomTrainer": "realcustom_checkpoints", "PVATrainer": "pva_checkpoints",
                      "PVAIdentityTune": "pva_checkpoints"}


@pytest.fixture
def folders(comfy, tmp_path):
    """Private models and output folders (registered first, as extra_model_paths.yaml would), so the trainers'
    files never reach the shared test cache; the input pictures."""
    folder_paths = comfy.folder_paths
    models = {kind: tmp_path / "models" / kind for kind in ("embeddings", "loras", "realcustom", "pva")}
    for kind, path in models.items():
        path.mkdir(parents=True)
        folder_paths.add_model_folder_path(kind, str(path), is_default=True)
    old_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.filename_list_cache.clear()
    for index, name in enumerate(IMAGES):
        write_input_image(name, Path(folder_paths.get_input_directory()), SIZE + 8 * index)
    yield models, tmp_path / "output"
    folder_paths.set_output_directory(old_output)
    for kind, path in models.items():
        folder_paths.folder_names_and_paths[kind][0].remove(str(path))
    folder_paths.filename_list_cache.clear()


def _node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def trainer_prompt(trainer: str, name: str, steps: int, seed: int, image: str, checkpoint_every: int = 0) -> dict:
    """An API prompt a user would queue: the tiny SD1.5 checkpoint, a loaded picture (repeated into the batch the
    trainer needs; its transparent centre as DETEX's subject mask) and the trainer."""
    prompt = {
        "ckpt": _node("CheckpointLoaderSimple", ckpt_name=checkpoints.sd15_checkpoint_path().name),
        "image": _node("LoadImage", image=image),
        "photos": _node("RepeatImageBatch", image=["image", 0], amount=3 if trainer == "DecoupledTokenTrainer" else 2),
    }
    common = {"model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "name": name, "steps": steps, "seed": seed,
              "checkpoint_every": checkpoint_every}
    if trainer in ("PVATrainer", "PVAIdentityTune"):
        pva_assets.arcface_path()
        # continues from the tiny PVA file: a fresh start builds the paper-size token transformer (slow on a CPU)
        prompt["pva"] = _node("PVALoader", pva_name=pva_assets.pva_path("arcface").name)
    if trainer == "DisenDiffTrainer":
        prompt["train"] = _node(trainer, **common, image=["image", 0], class_words="cat, dog", learning_rate=1e-3,
                                batch_size=1, grad_accumulation=1, resolution=SIZE, augment=False)
    elif trainer == "DecoupledTokenTrainer":
        prompt["mask"] = _node("MaskToImage", mask=["image", 1])
        prompt["masks"] = _node("RepeatImageBatch", image=["mask", 0], amount=3)
        prompt["subject"] = _node("ImageToMask", image=["masks", 0], channel="red")
        prompt["train"] = _node(
            trainer, **common, images=["photos", 0], masks=["subject", 0], class_word="dog", learning_rate=1e-3,
            mapper_learning_rate=1e-3, batch_size=1, grad_accumulation=1,
            template="photo of a {V} {class}[ with {P} pose][ in {B} background]", attribute_source="free vectors",
            subject_branch_probability=0.5, mask_normalization="all elements", augmented_views=0, resolution=SIZE,
            mask_dilation=0)
    elif trainer == "RealCustomTrainer":
        prompt["vision"] = _node("CLIPVisionLoader", clip_name=realcustom_assets.vitl_clip_vision_path().name)
        prompt["train"] = _node(trainer, **common, clip_vision=["vision", 0], images=["photos", 0],
                                captions="a photo of a toy", learning_rate=1e-3, batch_size=1, grad_accumulation=1,
                                resolution=SIZE, crop=False)
    elif trainer == "PVATrainer":
        prompt["train"] = _node(trainer, **common, pva=["pva", 0], images=["photos", 0], images_per_identity=2,
                                encoder="arcface", learning_rate=1e-4, transformer_learning_rate=1e-4,
                                word_learning_rate=1e-3, timestep_bins=1, init_word="person", resolution=SIZE)
    else:
        prompt["train"] = _node(trainer, **common, pva=["pva", 0], photos=["photos", 0], learning_rate=1e-4,
                                word_learning_rate=1e-3, timestep_bins=1, resolution=SIZE)
    return prompt


def _exports(models: dict, trainer: str, name: str) -> dict[str, Path]:
    return {suffix: models[kind] / f"{name}{suffix}.safetensors" for kind, suffix in EXPORTS[trainer]}


def _run_id(path: Path) -> str:
    with safe_open(str(path), "pt") as f:
        return f.metadata()[RUN_ID_KEY]


def _runs_of(models, trainer, name) -> set[str]:
    """The run ids recorded by the files of one output name (one run's files all record the same)."""
    return {_run_id(path) for path in _exports(models, trainer, name).values()}


def _console(caplog, trainer) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "personalization" and r.getMessage().startswith(trainer)]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", list(EXPORTS))
def test_edit_and_run_again(trainer, folders, caplog):
    """Run, more steps, a new seed, a new image, back: what a user does with Run in ComfyUI."""
    models, output = folders
    executor = new_executor()
    name = "edit_loop"
    caplog.set_level(logging.INFO, logger="personalization")

    def run(steps, seed, image):
        caplog.clear()
        execute_workflow(trainer_prompt(trainer, name, steps, seed, IMAGES[image]), executor=executor)
        return _console(caplog, trainer)

    lines = run(1, seed=0, image=0)
    assert lines[0] == f"{trainer}: training 1 steps"
    assert re.fullmatch(rf"{trainer}: step 1/1, loss \d+\.\d+, \d+\.\d+ s/step", lines[1]), "the console line"
    (first,) = _runs_of(models, trainer, name)
    assert f"{trainer}: resuming at step 1 of 2" in run(2, seed=0, image=0), "more steps continue the run"
    assert _runs_of(models, trainer, name) == {first}
    checkpoints_written = sorted(p.name for p in (output / CHECKPOINT_FOLDERS[trainer] / name).iterdir())
    assert checkpoints_written == [f"run-{first[:16]}.step-2.safetensors"], "the continued checkpoint replaces the first"
    first_files = {suffix: load_file(str(path)) for suffix, path in _exports(models, trainer, name).items()}

    assert f"{trainer}: training 1 steps" in run(1, seed=1, image=0), "a new seed is a new run"
    (second,) = _runs_of(models, trainer, name)
    assert second != first and _runs_of(models, trainer, f"{name}_00001") == {first}, "the first run's files are kept"

    assert f"{trainer}: training 1 steps" in run(1, seed=1, image=1), "a new image is a new run"
    (third,) = _runs_of(models, trainer, name)
    assert third not in (first, second) and _runs_of(models, trainer, f"{name}_00002") == {second}

    lines = run(2, seed=0, image=0)
    assert f"{trainer}: resuming at step 2 of 2" in lines and not any("s/step" in line for line in lines), \
        "back to the first settings: found finished, nothing trained again"
    assert _runs_of(models, trainer, name) == {first} and _runs_of(models, trainer, f"{name}_00003") == {third}
    for suffix, path in _exports(models, trainer, name).items():
        again = load_file(str(path))
        assert again.keys() == first_files[suffix].keys()
        assert all(torch.equal(again[key], first_files[suffix][key]) for key in again), suffix


def _disendiff_lora(models, name) -> dict:
    return load_file(str(models["loras"] / f"{name}_disendiff_kv.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_every", [0, 3])
def test_cancel_in_the_server_keeps_the_training(checkpoint_every, folders, caplog):
    """Cancel pressed at step 4 of 6 through the server's own progress hook, which raises inside the progress bar's
    update: the next Run continues from step 4, whatever checkpoint_every is (0: only at the end and on Cancel; 3:
    the cancel comes after the periodic checkpoint), and ends where an uninterrupted run ends."""
    models, output = folders
    executor = new_executor()
    caplog.set_level(logging.INFO, logger="personalization")
    with server_progress_hook(cancel_at=4), pytest.raises(WorkflowExecutionError, match="execution_interrupted"):
        execute_workflow(trainer_prompt("DisenDiffTrainer", "cancelled", 6, 0, IMAGES[0], checkpoint_every),
                         executor=executor)
    kept = [p.name for p in (output / "disendiff_checkpoints" / "cancelled").iterdir()]
    assert len(kept) == 1 and re.fullmatch(r"run-\w+\.step-4\.safetensors", kept[0]), kept
    caplog.clear()
    with server_progress_hook():
        execute_workflow(trainer_prompt("DisenDiffTrainer", "cancelled", 6, 0, IMAGES[0], checkpoint_every),
                         executor=executor)
    assert "DisenDiffTrainer: resuming at step 4 of 6" in _console(caplog, "DisenDiffTrainer")
    execute_workflow(trainer_prompt("DisenDiffTrainer", "straight", 6, 0, IMAGES[0], checkpoint_every),
                     executor=executor)
    resumed, straight = _disendiff_lora(models, "cancelled"), _disendiff_lora(models, "straight")
    assert all(torch.equal(resumed[key], straight[key]) for key in straight)
