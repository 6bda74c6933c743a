"""Every workflows/*.json, converted to API format and executed by ComfyUI's own executor on the tiny
checkpoints (sizes and step counts shrunk, models swapped for the generated ones)."""
from pathlib import Path

import pytest
from PIL import Image

from harness import checkpoints
from harness.tiny_workflows import SIZE, STEPS, WORKFLOWS, shrink_for_tiny_models
from harness.workflows import execute_workflow, load_ui_workflow, saved_image_paths, ui_to_api

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
    "realcustom_train_then_sample": 1 + 2,  # the image, then what 'toy' covers on each training image
    "detex_train_then_sample": 1,
    "detex_pose_kept_vs_dropped": 2,
    # 2 first-pass images, the 'toy' mask of each image at every step, the 2 face-inpainted images
    "composition_all_five": 2 + 2 * STEPS + 2,
}

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
