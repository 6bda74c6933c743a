"""Example workflows made runnable on the tiny random checkpoints of the harness: models swapped for the
generated ones, sizes and step counts shrunk, input images and the trainers' exported files written
as stand-ins when no training run made them. Used by tests/test_workflows.py and
scripts/readme_outputs.py."""
from pathlib import Path

import numpy as np
from PIL import Image

from . import checkpoints, pva_assets
from . import realcustom as realcustom_assets

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
SIZE, STEPS = 64, 3

TINY_MODELS = {
    "CheckpointLoaderSimple": ("ckpt_name", checkpoints.sd15_checkpoint_path),
    "ControlNetLoader": ("control_net_name", checkpoints.sd15_controlnet_path),
    "LoraLoader": ("lora_name", checkpoints.sd15_lora_path),
    "LoraLoaderModelOnly": ("lora_name", checkpoints.sd15_lora_path),
}


def shrink_for_tiny_models(api: dict, input_dir: Path, size: int = SIZE, steps: int = STEPS) -> dict:
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and "inpainting" in inputs["ckpt_name"]:
            inputs["ckpt_name"] = pva_assets.sd15_inpaint_checkpoint_path().name
        elif kind in TINY_MODELS:
            name, path = TINY_MODELS[kind]
            inputs[name] = path().name
        elif kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = size
        elif kind in ("KSampler", "SharedAttentionInvertReference"):
            inputs["steps"] = steps
        elif kind == "SharedAttentionApplyReference":
            inputs["offset"] = 1
        elif kind == "PVALoader":
            pva_assets.arcface_path()
            inputs["pva_name"] = pva_assets.pva_path("arcface").name
        elif kind == "DisenDiffTrainer":
            inputs.update(steps=1, resolution=size, batch_size=1, grad_accumulation=1)
        elif kind == "RealCustomTrainer":
            inputs.update(steps=1, resolution=size, batch_size=1, grad_accumulation=1)
        elif kind == "CalibratedCrossAttn":
            _ensure_disendiff_embeddings(inputs["modifiers"])
        elif kind == "DecoupledTokenTrainer":  # free vectors: a ViT-L mapper input is too slow on CPU (node tests cover mappers)
            inputs.update(steps=1, resolution=size, batch_size=1, grad_accumulation=1, augmented_views=0,
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
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
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
