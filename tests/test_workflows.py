"""Every workflows/*.json, converted to API format and executed by ComfyUI's own executor on the tiny
checkpoints (sizes and step counts shrunk, models swapped for the generated ones)."""
from pathlib import Path

import pytest
from PIL import Image

from harness import dit
from harness.comfy_env import pack_module
from harness.tiny_workflows import (SIZE, STEPS, TINY_MODELS, WORKFLOWS, demo_assets, needs_newer_comfyui,
                                    shrink_for_tiny_models)
from harness.workflows import execute_workflow, load_ui_workflow, saved_image_paths, ui_to_api

# What each workflow must produce: SaveImage image count.
EXPECTED_IMAGES = {
    "01 StyleAligned - a batch in one style, from text": 4,
    "02 StyleAligned - the style of your own image": 3,
    "03 StyleAligned - with a depth ControlNet": 4,
    "04 StyleAligned - on top of a LoRA": 4,
    "05 DisenDiff - learn two concepts from one photo, then sample": 2,
    "06 DisenDiff - the exported files with a ControlNet": 2,
    "07 DETEX - learn a subject without its poses and backgrounds": 1,
    "08 DETEX - the same seed with a pose kept and dropped": 2,
    # the image, what 'toy' covers on each training image, the word mask of every step
    "09 RealCustom - train an image branch, then sample": 1 + 2 + STEPS,
    "10 RealCustom - with a ControlNet": 1 + STEPS,
    "11 PVA - identity-preserving face inpainting": 1,
    "12 PVA - on top of a LoRA, with a text edit": 1,
    # 2 first-pass images, the 'toy' mask of each image at every step, the 2 face-inpainted images
    "13 All five techniques in one graph": 2 + 2 * STEPS + 2,
    "14 StyleAligned - Flux, a batch in one style": 4,
    "15 StyleAligned - SD3.5, the style of your own image": 3,
    # as 09: the image, what 'toy' covers on each training image, the word mask of every step
    "16 RealCustom - Flux, train an image branch, then sample": 1 + 2 + STEPS,
    "17 PVA - Flux, identity-preserving face inpainting": 1,
    # as 13's first pass: 2 images, the 'toy' mask of each image at every step
    "18 Composition - Flux, four techniques, a LoRA and a ControlNet in one graph": 2 + 2 * STEPS,
    "19 StyleAligned - Flux.2, a batch in one style": 4,
    # as 09 and 16: the image, what 'toy' covers on each training image, the word mask of every step
    "20 RealCustom - Z-Image, train an image branch, then sample": 1 + 2 + STEPS,
}
# Loader type -> (the models folder of the files it loads, the inputs that name them).
LOADER_FILES = {"CheckpointLoaderSimple": ("checkpoints", ["ckpt_name"]),
                "UNETLoader": ("diffusion_models", ["unet_name"]), "VAELoader": ("vae", ["vae_name"]),
                "CLIPLoader": ("text_encoders", ["clip_name"]),
                "DualCLIPLoader": ("text_encoders", ["clip_name1", "clip_name2"]),
                "TripleCLIPLoader": ("text_encoders", ["clip_name1", "clip_name2", "clip_name3"]),
                "ControlNetLoader": ("controlnet", ["control_net_name"]), "LoraLoader": ("loras", ["lora_name"]),
                "LoraLoaderModelOnly": ("loras", ["lora_name"]), "CLIPVisionLoader": ("clip_vision", ["clip_name"]),
                "PVALoader": ("pva", ["pva_name"]), "RealCustomLoader": ("realcustom", ["adapter_name"])}
BASE_MODEL_LOADERS = ("CheckpointLoaderSimple", "UNETLoader")
# Loaders of the files the pack's trainers write (the read-me note names the trainer or workflow): no download.
TRAINED_FILE_LOADERS = ("PVALoader", "RealCustomLoader")


def test_every_workflow_is_covered():
    assert {w.stem for w in WORKFLOWS} == set(EXPECTED_IMAGES)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_executes(comfy, path):
    if reason := needs_newer_comfyui(load_ui_workflow(path)):
        pytest.skip(reason)
    api = ui_to_api(load_ui_workflow(path))
    if dit.family_of(api) and not pack_module("nodes.comfy_features").has_attention_override():
        pytest.skip("the DiT nodes need ComfyUI 0.3.60 (the attention override), and the tiny DiT models follow "
                    "its model detection; test_comfy_features tests the refusal on this ComfyUI")
    api = shrink_for_tiny_models(api, Path(comfy.folder_paths.get_input_directory()))
    with dit.stand_in_nodes():  # the test-only loaders of the Flux / Flux.2 / SD3.5 / Z-Image workflows
        results = execute_workflow(api)
    saves = [node_id for node_id, node in api.items() if node["class_type"] == "SaveImage"]
    assert saves, "every example workflow saves its images"
    images = [p for node_id in saves for p in saved_image_paths(results[node_id])]
    assert len(images) == EXPECTED_IMAGES[path.stem]
    for image in images:
        assert Image.open(image).size == (SIZE, SIZE)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_declared_models_are_files_the_graph_loads(comfy, path):
    """The `models` list feeds the frontend's missing-models dialog: each entry is a file one of the graph's
    loaders names, in that loader's folder, downloadable from a source the dialog accepts; the base model and
    every file of a DiT graph (its diffusion model, text encoders, VAE, LoRA, ControlNet) are declared, except
    the files the pack's trainers write."""
    workflow = load_ui_workflow(path)
    if reason := needs_newer_comfyui(workflow):
        pytest.skip(reason)
    api = ui_to_api(workflow)
    loaders = [node for node in api.values() if node["class_type"] in LOADER_FILES]
    loaded = {(LOADER_FILES[node["class_type"]][0], node["inputs"][name])
              for node in loaders for name in LOADER_FILES[node["class_type"]][1]}
    declared = workflow.get("models") or []
    assert declared, "the models to download, for the missing-models dialog"
    declared_files = {(model["directory"], model["name"]) for model in declared}
    for model in declared:
        assert (model["directory"], model["name"]) in loaded, model
        assert model["url"].startswith(("https://huggingface.co/", "https://civitai.com/")), model
        assert model["name"].endswith((".safetensors", ".sft")), model
    base = next(node for node in loaders if node["class_type"] in BASE_MODEL_LOADERS)
    folder, (name, *_) = LOADER_FILES[base["class_type"]]
    assert (folder, base["inputs"][name]) in declared_files, "the base model"
    if dit.family_of(api):
        downloads = {(LOADER_FILES[node["class_type"]][0], node["inputs"][name]) for node in loaders
                     if node["class_type"] not in TRAINED_FILE_LOADERS for name in LOADER_FILES[node["class_type"]][1]}
        assert downloads <= declared_files, "every file a Flux / Flux.2 / SD3.5 / Z-Image graph loads is a download"


def test_demo_copies_are_never_overwritten(comfy, tmp_path):
    """start_comfyui.sh may run the demo generation again: a user's edits of a demo copy stay."""
    assets = demo_assets()
    input_dir = Path(comfy.folder_paths.get_input_directory())
    copies = assets.write_demo_copies(tmp_path, input_dir)
    copies[0].write_text('{"edited": true}')
    assert assets.write_demo_copies(tmp_path, input_dir) == copies
    assert copies[0].read_text() == '{"edited": true}'


DEMO_COPIES = [path for path in WORKFLOWS if demo_assets().runs_on_demo_models(load_ui_workflow(path))]


def test_demo_copies_are_the_workflows_without_clip_vision_or_pva():
    assert {path.stem[:2] for path in DEMO_COPIES} == {"01", "02", "03", "04", "05", "06", "08"}
    assert demo_assets().trained_names() == ["disendiff_pair", "my_dog", "my_flux_toy_branch", "my_toy_branch",
                                            "my_zimage_toy_branch"]


@pytest.mark.parametrize("path", DEMO_COPIES, ids=lambda p: p.stem)
def test_the_demo_notes_describe_the_demo(comfy, path):
    """A demo copy's read-me says it is a demo whose pictures are noise by design, and names the files the
    demo loads and writes (the tiny models, the demo_ names), never the real models or the real outputs."""
    assets = demo_assets()
    original = load_ui_workflow(path)
    workflow = assets.demo_workflow(original, Path(comfy.folder_paths.get_input_directory()))
    note = next(n for n in workflow["nodes"] if n["type"] == "MarkdownNote")["widgets_values"][0]
    assert note.startswith("> **DEMO**") and "noise by design" in note.split("\n\n")[0]
    assert f"{assets.DEMO_SIZE} px" in note.split("\n\n")[0], "what the demo does"
    for model in original.get("models") or []:
        assert model["name"] not in note, "a real model's download"
    for name in assets.trained_names():
        assert name not in note.replace(f"demo_{name}", ""), f"the real output {name}"
    api = ui_to_api(workflow)
    for kind, (widget, _) in TINY_MODELS.items():
        for node in (n for n in api.values() if n["class_type"] == kind):
            assert f"`{node['inputs'][widget]}`" in note or f"/{node['inputs'][widget]}`" in note, \
                f"the demo's {kind} file"


#: the demo copies the default run executes: one sampling graph and one that trains (the demo stand-ins of trained
#: files are made by the same code for every copy); the others run nightly, and every one loads in the frontend test
DEMO_COPIES_BY_DEFAULT = ("01 StyleAligned - a batch in one style, from text",
                          "05 DisenDiff - learn two concepts from one photo, then sample")


@pytest.mark.parametrize("path", [path if path.stem in DEMO_COPIES_BY_DEFAULT else
                                  pytest.param(path, marks=pytest.mark.nightly) for path in DEMO_COPIES],
                         ids=lambda p: p.stem)
def test_every_demo_copy_runs(comfy, path):
    """scripts/start_comfyui.sh offers these demo copies when no checkpoint is installed: each runs end to
    end, before any trainer ran (the trainers' files ship as demo_ stand-ins). Generated at demo size
    (each ran through the server in 2-5 minutes on 2 busy CPU cores); run here at the other workflow
    tests' size (the copies beyond DEMO_COPIES_BY_DEFAULT nightly)."""
    assets = demo_assets()
    input_dir = Path(comfy.folder_paths.get_input_directory())
    workflow = assets.demo_workflow(load_ui_workflow(path), input_dir)
    assert "models" not in workflow, "the tiny files stand in for the real models"
    for node in workflow["nodes"]:  # a random stand-in never answers for a file the real workflows name
        for value in node["widgets_values"] if node["type"] != "MarkdownNote" else ():
            for name in assets.trained_names():
                assert not isinstance(value, str) or name not in value.replace(f"demo_{name}", ""), value
    api = ui_to_api(workflow)
    for node in api.values():
        inputs = node["inputs"]
        if node["class_type"] == "EmptyLatentImage":
            assert inputs["width"] == inputs["height"] == assets.DEMO_SIZE
        elif node["class_type"] == "KSampler":
            assert inputs["steps"] == assets.DEMO_STEPS
        elif node["class_type"].endswith("Trainer"):
            assert (inputs["steps"], inputs["resolution"]) == (assets.DEMO_TRAIN_STEPS, assets.DEMO_SIZE)
    results = execute_workflow(shrink_for_tiny_models(api, input_dir))
    images = [p for node_id, node in api.items() if node["class_type"] == "SaveImage"
              for p in saved_image_paths(results[node_id])]
    assert len(images) == EXPECTED_IMAGES[path.stem]
