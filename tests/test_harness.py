"""The test harness itself, against the real ComfyUI: tiny models load through stock loaders and sample,
and UI workflows convert and execute. If these fail, no pack test built on them can be trusted."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import checkpoints as ck
from harness.comfy_env import REPO_ROOT, pack_node_ids
from harness.workflows import (WorkflowConversionError, WorkflowValidationError, execute_workflow,
                               saved_image_paths, ui_to_api)


@pytest.fixture(scope="module")
def prompts(sd15):
    _, clip, _ = sd15
    return ck.encode_prompt(clip, "a photo of a cat"), ck.encode_prompt(clip, "blurry")


def test_boot_registers_stock_nodes_and_redirects_folders(stock_comfy):
    mappings = stock_comfy.nodes.NODE_CLASS_MAPPINGS
    for node_id in ("KSampler", "CheckpointLoaderSimple", "ControlNetApplyAdvanced", "LoraLoaderModelOnly",
                    "SamplerCustomAdvanced"):  # the last one comes from comfy_extras
        assert node_id in mappings
    fp = stock_comfy.folder_paths
    assert fp.get_folder_paths("checkpoints") == [str(stock_comfy.models_dir / "checkpoints")]
    assert fp.get_output_directory().startswith(str(stock_comfy.run_dir))
    import comfy.model_management as mm
    assert mm.get_torch_device().type == "cpu"


def test_pack_loads_through_comfyui_loader(comfy):
    ids = pack_node_ids()
    if (REPO_ROOT / "__init__.py").exists():
        assert ids, "the pack imported but registered no nodes"
    for node_id in ids:
        assert comfy.nodes.NODE_CLASS_MAPPINGS[node_id].RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")


def test_tiny_sd15_is_detected_as_sd15_and_samples(sd15, prompts):
    import comfy.supported_models
    model, _, vae = sd15
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_config.unet_config["transformer_depth"] == [1, 1]
    out = ck.sample(model, *prompts, ck.empty_latent(2), seed=1, steps=4)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    again = ck.sample(model, *prompts, ck.empty_latent(2), seed=1, steps=4)
    assert torch.equal(out, again), "sampling must be deterministic for identity tests"
    image = vae.decode(out)
    assert image.shape == (2, 64, 64, 3) and torch.isfinite(image).all()


def test_tiny_controlnet_loads_and_changes_output(stock_comfy, sd15, prompts):
    nodes = stock_comfy.nodes
    model, _, _ = sd15
    control = nodes.ControlNetLoader().load_controlnet(ck.sd15_controlnet_path().name)[0]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(*prompts, control, hint, 1.0, 0.0, 1.0)
    base = ck.sample(model, *prompts, ck.empty_latent(1), seed=2, steps=2)
    controlled = ck.sample(model, positive, negative, ck.empty_latent(1), seed=2, steps=2)
    assert torch.isfinite(controlled).all()
    assert not torch.allclose(base, controlled)


def test_tiny_lora_loads_every_key_and_changes_output(stock_comfy, sd15, prompts):
    from safetensors.torch import load_file
    model, _, _ = sd15
    lora_path = ck.sd15_lora_path()
    n_layers = sum(k.endswith(".lora_up.weight") for k in load_file(str(lora_path)))
    patched = stock_comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_path.name, 1.0)[0]
    assert len(patched.patches) == n_layers > 0
    assert not model.patches, "the loader must patch a clone"
    base = ck.sample(model, *prompts, ck.empty_latent(1), seed=3, steps=2)
    with_lora = ck.sample(patched, *prompts, ck.empty_latent(1), seed=3, steps=2)
    assert torch.isfinite(with_lora).all()
    assert not torch.allclose(base, with_lora)
    assert torch.equal(base, ck.sample(model, *prompts, ck.empty_latent(1), seed=3, steps=2))


def test_reduced_sdxl_samples_with_real_conditioning_shapes(sdxl_model):
    import comfy.model_base
    assert isinstance(sdxl_model.model, comfy.model_base.SDXL)
    assert sdxl_model.model.adm_channels == 2816
    positive, negative = ck.sdxl_conditioning(1, seed=0), ck.sdxl_conditioning(1, seed=1)
    assert positive[0][0].shape == (1, 77, 2048) and positive[0][1]["pooled_output"].shape == (1, 1280)
    out = ck.sample(sdxl_model, positive, negative, ck.empty_latent(2), seed=0, steps=4)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def _txt2img_ui() -> dict:
    """A workflow as the frontend saves it (ComfyUI's default graph, 64x64, 2 steps)."""
    return {
        "last_node_id": 9, "last_link_id": 9, "version": 0.4,
        "nodes": [
            {"id": 4, "type": "CheckpointLoaderSimple", "mode": 0, "inputs": [],
             "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]},
                         {"name": "CLIP", "type": "CLIP", "links": [3, 5]},
                         {"name": "VAE", "type": "VAE", "links": [8]}],
             "widgets_values": [ck.SD15_CHECKPOINT]},
            {"id": 6, "type": "CLIPTextEncode", "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 3},
                        {"name": "text", "type": "STRING", "widget": {"name": "text"}, "link": None}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [4]}],
             "widgets_values": ["a photo of a cat"]},
            {"id": 7, "type": "CLIPTextEncode", "mode": 0,
             "inputs": [{"name": "clip", "type": "CLIP", "link": 5}],
             "outputs": [{"name": "CONDITIONING", "type": "CONDITIONING", "links": [6]}],
             "widgets_values": ["blurry"]},
            {"id": 5, "type": "EmptyLatentImage", "mode": 0, "inputs": [],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [2]}],
             "widgets_values": [64, 64, 1]},
            {"id": 3, "type": "KSampler", "mode": 0,
             "inputs": [{"name": "model", "type": "MODEL", "link": 1},
                        {"name": "positive", "type": "CONDITIONING", "link": 4},
                        {"name": "negative", "type": "CONDITIONING", "link": 6},
                        {"name": "latent_image", "type": "LATENT", "link": 2}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [7]}],
             "widgets_values": [42, "fixed", 2, 7.0, "euler", "normal", 1.0]},
            {"id": 8, "type": "VAEDecode", "mode": 0,
             "inputs": [{"name": "samples", "type": "LATENT", "link": 7},
                        {"name": "vae", "type": "VAE", "link": 8}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [9]}]},
            {"id": 9, "type": "SaveImage", "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 9}],
             "widgets_values": ["harness"]},
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
                  [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"],
                  [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]],
        "groups": [], "config": {}, "extra": {},
    }


TXT2IMG_API = {
    "3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "seed": 42, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ck.SD15_CHECKPOINT}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "harness"}},
}


def test_ui_workflow_converts_and_executes(stock_comfy):
    ck.sd15_checkpoint_path()
    api = ui_to_api(_txt2img_ui())
    assert api == TXT2IMG_API
    results = execute_workflow(api)
    image = results["8"].outputs[0][0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    files = saved_image_paths(results["9"])
    assert len(files) == 1 and files[0].is_file() and files[0].suffix == ".png"
    from PIL import Image
    assert Image.open(files[0]).size == (64, 64)


def test_ui_conversion_follows_reroute_bypass_primitive_mute_note(stock_comfy):
    ui = _txt2img_ui()
    nodes, links = ui["nodes"], ui["links"]
    ksampler = next(n for n in nodes if n["id"] == 3)
    # MODEL: checkpoint -> Reroute 10 -> bypassed LoraLoaderModelOnly 11 -> KSampler
    links[0] = [1, 4, 0, 10, 0, "MODEL"]
    links += [[10, 10, 0, 11, 0, "*"], [11, 11, 0, 3, 0, "MODEL"], [12, 12, 0, 3, 4, "INT"],
              [13, 8, 0, 14, 0, "IMAGE"]]
    ksampler["inputs"][0]["link"] = 11
    ksampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 12})
    ksampler["widgets_values"][0] = 7  # a PrimitiveNode keeps the target widget's value in sync
    nodes += [
        {"id": 10, "type": "Reroute", "mode": 0, "inputs": [{"name": "", "type": "*", "link": 1}],
         "outputs": [{"name": "", "type": "MODEL", "links": [10]}]},
        {"id": 11, "type": "LoraLoaderModelOnly", "mode": 4,
         "inputs": [{"name": "model", "type": "MODEL", "link": 10}],
         "outputs": [{"name": "MODEL", "type": "MODEL", "links": [11]}],
         "widgets_values": ["missing.safetensors", 1.0]},
        {"id": 12, "type": "PrimitiveNode", "mode": 0, "inputs": [],
         "outputs": [{"name": "INT", "type": "INT", "links": [12], "widget": {"name": "seed"}}],
         "widgets_values": [7, "fixed"]},
        {"id": 13, "type": "Note", "mode": 0, "inputs": [], "widgets_values": ["hello"]},
        {"id": 14, "type": "PreviewImage", "mode": 2,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 13}]},
    ]
    next(n for n in nodes if n["id"] == 5)["widgets_values"] = [64, 64]  # saved before batch_size existed
    expected = copy.deepcopy(TXT2IMG_API)
    expected["3"]["inputs"]["seed"] = 7
    assert ui_to_api(ui) == expected


def test_ui_conversion_and_validation_errors_are_clear(stock_comfy):
    ui = _txt2img_ui()
    ui["nodes"][0]["type"] = "NoSuchNode"
    with pytest.raises(WorkflowConversionError, match="unknown node type 'NoSuchNode'"):
        ui_to_api(ui)
    ui = _txt2img_ui()
    ui["nodes"][3]["widgets_values"].append(99)  # EmptyLatentImage with a stale extra widget value
    with pytest.raises(WorkflowConversionError, match="left over"):
        ui_to_api(ui)
    api = copy.deepcopy(TXT2IMG_API)
    api["4"]["inputs"]["ckpt_name"] = "absent.safetensors"
    with pytest.raises(WorkflowValidationError, match="ckpt_name"):
        execute_workflow(api)
