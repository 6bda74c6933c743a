"""Every workflows/*.json, converted to API format and executed by ComfyUI's own executor on the tiny
checkpoints (sizes and step counts shrunk, models swapped for the generated ones)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import checkpoints, pva_assets
from harness import realcustom as realcustom_assets
from harness.workflows import execute_workflow, load_ui_workflow, saved_image_paths, ui_to_api

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
SIZE, STEPS = 64, 3

# What each workflow must produce: SaveImage image count.
EXPECTED_IMAGES = {
    "style_aligned_text": 4,
    "style_aligned_lora": 4,
    "style_aligned_controlnet": 4,
    "style_aligned_reference": 3,
    "disendiff_train_then_sample": 2,
    "disendiff_exported_controlnet": 2,
    "pva_face_inpainting": 1,
    "pva_lora": 1,
    "realcustom_generation": 1 + STEPS,  # the image, then the word mask of every step
    "realcustom_controlnet": 1 + STEPS,
    "detex_train_then_sample": 1,
    "detex_pose_kept_vs_dropped": 2,
    # 2 first-pass images, the 'toy' mask of each image at every step, the 2 face-inpainted images
    "composition_all_five": 2 + 2 * STEPS + 2,
}

TINY_MODELS = {
    "CheckpointLoaderSimple": ("ckpt_name", checkpoints.sd15_checkpoint_path),
    "ControlNetLoader": ("control_net_name", checkpoints.sd15_controlnet_path),
    "LoraLoader": ("lora_name", checkpoints.sd15_lora_path),
    "LoraLoaderModelOnly": ("lora_name", checkpoints.sd15_lora_path),
}


def shrink_for_tiny_models(api: dict, input_dir: Path) -> dict:
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and "inpainting" in inputs["ckpt_name"]:
            inputs["ckpt_name"] = pva_assets.sd15_inpaint_checkpoint_path().name
        elif kind in TINY_MODELS:
            name, path = TINY_MODELS[kind]
            inputs[name] = path().name
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = SIZE
        elif kind in ("KSampler", "SharedAttentionInvertReference"):
            inputs["steps"] = STEPS
        elif kind == "SharedAttentionApplyReference":
            inputs["offset"] = 1
        elif kind == "PVALoader":
            pva_assets.arcface_path()
            inputs["pva_name"] = pva_assets.pva_path("arcface").name
        elif kind == "DisenDiffTrainer":
            inputs.update(steps=1, resolution=SIZE, batch_size=1, grad_accumulation=1)
        elif kind == "CalibratedCrossAttn":
            _ensure_disendiff_embeddings(inputs["modifiers"])
        elif kind == "DecoupledTokenTrainer":  # free vectors: a ViT-L mapper input is too slow on CPU (node tests cover mappers)
            inputs.update(steps=1, resolution=SIZE, batch_size=1, grad_accumulation=1, augmented_views=0,
                          attribute_source="free vectors")
            inputs.pop("clip_vision", None)
        elif kind == "DecoupledTokenPrompt" and isinstance(inputs["name"], str):
            _ensure_detex_embeddings(inputs["name"], inputs["image_index"])
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = realcustom_assets.vitl_clip_vision_path().name
        elif kind == "RealCustomLoader":
            inputs["adapter_name"] = realcustom_assets.sd15_workflow_adapter_path().name
        elif kind == "LoadImage":
            rng = np.random.default_rng(len(inputs["image"]))
            pixels = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(input_dir / inputs["image"])
    return api


def _ensure_disendiff_embeddings(modifiers: str) -> None:
    """The exported-files workflow names embeddings a training run writes; stand-ins when none ran yet."""
    import torch
    from harness.comfy_env import models_dir
    from safetensors.torch import save_file
    for name in (m.strip()[len("embedding:"):] for m in modifiers.split(",") if m.strip().startswith("embedding:")):
        path = models_dir() / "embeddings" / f"{name}.safetensors"
        if not path.exists():
            save_file({"clip_l": torch.randn(1, 768, generator=torch.Generator().manual_seed(0)) * 0.02}, str(path))


def _ensure_detex_embeddings(name: str, image_index: int) -> None:
    """The exported-files DETEX workflow names the trainer's embeddings; stand-ins when none ran yet."""
    _ensure_disendiff_embeddings(", ".join(f"embedding:{name}_{suffix}" for suffix in
                                           ("V", f"pose_{image_index}", f"bg_{image_index}")))


def test_every_workflow_is_covered():
    assert {w.stem for w in WORKFLOWS} == set(EXPECTED_IMAGES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes(comfy, path):
    api = shrink_for_tiny_models(ui_to_api(load_ui_workflow(path)), Path(comfy.folder_paths.get_input_directory()))
    results = execute_workflow(api)
    saves = [node_id for node_id, node in api.items() if node["class_type"] == "SaveImage"]
    assert saves, "every example workflow saves its images"
    images = [p for node_id in saves for p in saved_image_paths(results[node_id])]
    assert len(images) == EXPECTED_IMAGES[path.stem]
    for image in images:
        assert Image.open(image).size == (SIZE, SIZE)


def test_demo_copy_of_a_workflow_runs_on_the_demo_models(comfy):
    """scripts/start_comfyui.sh offers these demo copies when no checkpoint is installed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_assets.py"
    spec = importlib.util.spec_from_file_location("demo_assets", path)
    demo_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_assets)
    names = {"checkpoint": checkpoints.sd15_checkpoint_path().name, "controlnet": checkpoints.sd15_controlnet_path().name,
             "lora": checkpoints.sd15_lora_path().name}
    workflow = demo_assets.demo_workflow(load_ui_workflow(WORKFLOWS[0].parent / "style_aligned_lora.json"), names)
    api = ui_to_api(workflow)
    for node in api.values():  # keep the run short; the demo's own sizes are checked below
        if node["class_type"] == "EmptyLatentImage":
            assert node["inputs"]["width"] == demo_assets.DEMO_SIZE
            node["inputs"]["width"] = node["inputs"]["height"] = SIZE
    results = execute_workflow(api)
    saved = [p for node_id, node in api.items() if node["class_type"] == "SaveImage" for p in saved_image_paths(results[node_id])]
    assert len(saved) == 4
    assert "RANDOM-weight" in workflow["extra"]["info"]
