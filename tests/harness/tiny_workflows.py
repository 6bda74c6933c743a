"""Example workflows made runnable on the tiny random checkpoints of the harness: models swapped for the
generated ones, sizes and step counts shrunk, input images and the trainers' exported files written
as stand-ins when no training run made them; Flux, Flux.2, SD3.5 and Z-Image workflows get the tiny DiT models
of harness.dit.
Used by tests/test_workflows.py, scripts/readme_outputs.py
(on API prompts) and scripts/demo_assets.py (on the UI-format demo copies), so both run the same way."""
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from . import checkpoints, dit, pva_assets
from . import realcustom as realcustom_assets

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
SIZE, STEPS = 64, 3

TINY_MODELS = {
    "CheckpointLoaderSimple": ("ckpt_name", checkpoints.sd15_checkpoint_path),
    "ControlNetLoader": ("control_net_name", checkpoints.sd15_controlnet_path),
    "LoraLoader": ("lora_name", checkpoints.sd15_lora_path),
    "LoraLoaderModelOnly": ("lora_name", checkpoints.sd15_lora_path),
}
#: Flux.2's own nodes, which came with Flux.2 in ComfyUI 0.3.71
FLUX2_NODES = ("EmptyFlux2LatentImage", "Flux2Scheduler")


def is_zimage_workflow(workflow: dict) -> bool:
    """Whether the UI-format `workflow` loads Z-Image's text encoder as ComfyUI's Z-Image Turbo template does
    (CLIPLoader type "lumina2": harness.dit.family_of reads the API prompt the same way)."""
    return any(node["type"] == "CLIPLoader" and node["widgets_values"][1:2] == ["lumina2"]
               for node in workflow["nodes"])


def needs_newer_comfyui(workflow: dict) -> str | None:
    """Why the UI-format `workflow` cannot load or run in this ComfyUI: it uses Flux.2's nodes and this ComfyUI has
    none, or it is a Z-Image graph and this ComfyUI has no Z-Image (Z-Image uses only stock nodes older ComfyUIs have,
    but only a ComfyUI with ``supported_models.ZImage`` builds the model and its Qwen3 text encoder); both are so on
    the oldest leg's 0.3.52. None where it can."""
    from .comfy_env import boot_comfy
    registered = boot_comfy(require_pack=False).nodes.NODE_CLASS_MAPPINGS
    absent = sorted(({node["type"] for node in workflow["nodes"]} & set(FLUX2_NODES)) - set(registered))
    if absent:
        return f"a Flux.2 workflow: this ComfyUI has no {', '.join(absent)} (Flux.2 came with 0.3.71)"
    if is_zimage_workflow(workflow):
        import comfy.supported_models
        if not hasattr(comfy.supported_models, "ZImage"):
            return "a Z-Image workflow: this ComfyUI has no Z-Image (supported_models.ZImage; the pinned 0.3.75 has it)"
    return None


def tiny_inputs(kind: str, inputs: dict, size: int, steps: int, train_steps: int, family: str | None = None) -> dict:
    """The inputs of a node of type `kind` (its current `inputs` by name) to change so that it runs on the
    tiny models at `size` px, `steps` sampling steps and `train_steps` training steps; files it names but
    no earlier run made (a trainer's exported embeddings, PVA and RealCustom files) are written as random
    stand-ins, for the tiny model of `family` (harness.dit.family_of; None: the U-Nets)."""
    if kind == "CheckpointLoaderSimple" and "inpainting" in inputs["ckpt_name"]:
        return {"ckpt_name": pva_assets.sd15_inpaint_checkpoint_path().name}
    if kind in TINY_MODELS:
        name, path = TINY_MODELS[kind]
        return {name: path().name}
    if kind in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyFlux2LatentImage"):
        return {"width": size, "height": size}
    if kind == "Flux2Scheduler":  # its size is the latent's
        return {"steps": steps, "width": size, "height": size}
    if kind in ("KSampler", "SharedAttentionInvertReference"):
        return {"steps": steps}
    if kind == "SharedAttentionApplyReference":
        return {"offset": 1}
    if kind == "PVALoader":
        pva_assets.arcface_path()
        return {"pva_name": pva_assets.pva_path("arcface", family or "sd15").name}
    if kind in ("DisenDiffTrainer", "RealCustomTrainer"):
        return {"steps": train_steps, "resolution": size, "batch_size": 1, "grad_accumulation": 1}
    if kind == "DecoupledTokenTrainer":
        return {"steps": train_steps, "resolution": size, "batch_size": 1, "grad_accumulation": 1, "augmented_views": 0}
    if kind == "CalibratedCrossAttn":
        _ensure_disendiff_embeddings(inputs["modifiers"])
    elif kind == "DecoupledTokenPrompt" and isinstance(inputs["name"], str):
        _ensure_detex_embeddings(inputs["name"], inputs["image_index"])
    elif kind == "CLIPVisionLoader":
        return {"clip_name": realcustom_assets.vitl_clip_vision_path().name}
    elif kind == "RealCustomLoader":
        adapter = realcustom_assets.flux_workflow_adapter_path if family == "flux" else \
            realcustom_assets.sd15_workflow_adapter_path
        return {"adapter_name": adapter().name}
    return {}


def write_input_image(name: str, input_dir: Path, size: int) -> None:
    """A random picture as input/<name> (what a LoadImage of the example names), transparent in its central
    square: LoadImage's MASK (1 - alpha) is that square, the region an inpainting graph repaints (an opaque
    picture's mask is empty, and its inpainting would keep every pixel)."""
    rng = np.random.default_rng(len(name))
    pixels = rng.integers(0, 255, (size, size, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4, 3] = 0
    Image.fromarray(pixels, "RGBA").save(input_dir / name)


def shrink_for_tiny_models(api: dict, input_dir: Path, size: int = SIZE, steps: int = STEPS) -> dict:
    """`api` made runnable on the tiny models, in place. A Flux, Flux.2, SD3.5 or Z-Image prompt
    (harness.dit.family_of) gets the tiny models of its family, some through test-only loaders: execute it inside
    `with harness.dit.stand_in_nodes():` and free them after with harness.dit.release(family)."""
    family = dit.family_of(api)
    if family:
        dit.use_tiny_dit_models(api, family)
    for node in api.values():
        kind, inputs = node["class_type"], node["inputs"]
        if family and kind in TINY_MODELS:
            continue  # use_tiny_dit_models chose the family's files
        inputs.update(tiny_inputs(kind, inputs, size, steps, train_steps=1, family=family))
        # free vectors: a ViT-L mapper input is too slow on CPU (node tests cover mappers)
        if kind == "DecoupledTokenTrainer":
            inputs["attribute_source"] = "free vectors"
            inputs.pop("clip_vision", None)
        elif kind == "LoadImage":
            write_input_image(inputs["image"], input_dir, size)
    return api


def _ensure_disendiff_embeddings(modifiers: str) -> None:
    """The exported-files DisenDiff workflow names embeddings a training run writes (`embedding:<name>`,
    comma-separated); random stand-ins when none ran yet."""
    import torch
    from harness.comfy_env import models_dir
    from safetensors.torch import save_file
    for name in (m.strip()[len("embedding:"):] for m in modifiers.split(",") if m.strip().startswith("embedding:")):
        path = models_dir() / "embeddings" / f"{name}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"clip_l": torch.randn(1, 768, generator=torch.Generator().manual_seed(0)) * 0.02}, str(path))


def _ensure_detex_embeddings(name: str, image_index: int) -> None:
    """The exported-files DETEX workflow names the trainer's embeddings; stand-ins when none ran yet."""
    _ensure_disendiff_embeddings(", ".join(f"embedding:{name}_{suffix}" for suffix in
                                           ("V", f"pose_{image_index}", f"bg_{image_index}")))


def demo_assets():
    """scripts/demo_assets.py as a module: the demo copies scripts/start_comfyui.sh writes."""
    spec = importlib.util.spec_from_file_location("demo_assets", REPO_ROOT / "scripts" / "demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
