"""RealCustom test models: CLIP-vision encoders built with ComfyUI's own classes, random adapters.

- `tiny_clip_vision()`: a real `comfy.clip_vision.ClipVisionModel` (CLIP_VISION) from a tiny config
  (32-px images, 2 layers), for node tests; it is never written to disk (the stock loader detects models
  by their layer count, so a file of it would not load).
- `vitl_clip_vision_path()`: a random ViT-L/14 CLIP-vision file in models/clip_vision, the smallest
  layout the stock CLIPVisionLoader detects, for workflow tests.
- `tiny_siglip_vision()` / `tiny_dinov2_path()`: the released model's two encoders reduced (a SigLIP
  CLIP_VISION of ComfyUI's own class at 384 px / patch 14, and a DINOv2-with-registers file in timm's layout
  with the 518-px position grid of the real one), for the released-model path.
- `adapter_path(...)`: a random adapter of this pack's CLIP-vision format for a model's cross-attention
  blocks (a DiT's joint blocks), in models/realcustom, recording the family it is given.
"""
from __future__ import annotations

import json
import os

import torch

from .checkpoints import _cached, randomize_, require_finite
from .comfy_env import boot_comfy, cache_dir, models_dir
from .memory import model_cache

TINY_CLIP_VISION = dict(
    attention_dropout=0.0, dropout=0.0, hidden_act="quick_gelu", hidden_size=32, image_size=32,
    initializer_factor=1.0, initializer_range=0.02, intermediate_size=64, layer_norm_eps=1e-5,
    model_type="clip_vision_model", num_attention_heads=2, num_channels=3, num_hidden_layers=2, patch_size=8,
    projection_dim=16)
VITL_CLIP_VISION = "tiny_vitl_clip_vision_v1.safetensors"
TINY_SIGLIP_VISION = dict(
    num_channels=3, hidden_act="gelu_pytorch_tanh", hidden_size=64, image_size=384, intermediate_size=128,
    model_type="siglip_vision_model", num_attention_heads=2, num_hidden_layers=2, patch_size=14,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
#: reduced DINOv2-L/14-reg4: width 64 (one 64-channel head), 3 blocks, 4 registers, 37×37 position grid (518 px)
TINY_DINOV2 = dict(dim=64, depth=3, hidden=128, patch=14, registers=4, grid=37)
TINY_DINOV2_FILE = "tiny_dinov2_reg4_v1.safetensors"


@model_cache
def tiny_clip_vision():
    boot_comfy(require_pack=False)
    import comfy.clip_vision

    config = cache_dir() / "tiny_clip_vision_realcustom_v1.json"  # own name: PVA's tiny config differs
    config.write_text(json.dumps(TINY_CLIP_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    randomize_(model.model, seed=11)
    return model


@model_cache
def tiny_siglip_vision():
    boot_comfy(require_pack=False)
    import comfy.clip_vision

    config = cache_dir() / "tiny_siglip_vision_realcustom_v1.json"
    config.write_text(json.dumps(TINY_SIGLIP_VISION))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    randomize_(model.model, seed=13, std=0.05)
    return model


def _build_dinov2() -> dict:
    from .comfy_env import pack_module
    encoder = pack_module("attention.realcustom_encoder").RegisterViT(**TINY_DINOV2)
    randomize_(encoder, seed=14, std=0.05)
    return encoder.state_dict()


def tiny_dinov2_path():
    return _cached("clip_vision", TINY_DINOV2_FILE, _build_dinov2)


def _build_vitl() -> dict:
    import comfy.clip_vision

    model = comfy.clip_vision.ClipVisionModel(str(boot_comfy(require_pack=False).comfy_dir / "comfy" / "clip_vision_config_vitl.json"))
    return {k: v.to(torch.float16) for k, v in randomize_(model.model, seed=12).state_dict().items()}


def vitl_clip_vision_path():
    return _cached("clip_vision", VITL_CLIP_VISION, _build_vitl)


def adapter_state_dict(blocks, vision_dim: int, token_dim: int, seed: int = 0, std: float = 0.05,
                       scoring: bool = False, latent_channels: int = 4) -> dict:
    """Random adapter tensors (this pack's format) for `blocks` (TransformerBlock list of a model), with the
    adaptive scoring module when ``scoring`` (reading text of ``token_dim`` and latents of ``latent_channels``)."""
    from .comfy_env import pack_module
    weights = pack_module("attention.realcustom_weights")
    realcustom = pack_module("attention.realcustom")
    shapes = {b.key: (b.channels, token_dim) for b in blocks if b.has_cross_attention}
    scorer = (pack_module("attention.realcustom_scoring").AdaptiveScoring(vision_dim, token_dim, latent_channels)
              if scoring else None)
    adapter = weights.RealCustomAdapter(weights.CLIP_VISION_FORMAT, weights.LinearProjector(vision_dim, token_dim),
                                        realcustom.ImageBranchWeights(shapes), scorer)
    randomize_(adapter, seed=seed, std=std)
    return adapter.state_dict()


def write_adapter(path, state_dict: dict, format_name: str | None, family: str | None = None) -> None:
    """Save an adapter file atomically, with the format (None: like the released checkpoint) and the model
    family's file tag (None: none recorded, as U-Net files before the DiT families) in metadata."""
    import comfy.utils
    require_finite(state_dict, path.name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    metadata = {**({"format": format_name} if format_name else {}), **({"family": family} if family else {})} or None
    comfy.utils.save_torch_file({k: v.clone() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    boot_comfy(require_pack=False).folder_paths.filename_list_cache.clear()


def adapter_path(name: str, blocks, vision_dim: int, token_dim: int, seed: int = 0, scoring: bool = False,
                 family: str | None = None, latent_channels: int = 4):
    """A random CLIP-vision-format adapter at models/realcustom/<name> (written once per cache) for ``blocks``;
    ``family``: the family tag its file records (None: none, read as a U-Net adapter)."""
    path = models_dir() / "realcustom" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_adapter(path, adapter_state_dict(blocks, vision_dim, token_dim, seed, scoring=scoring,
                                               latent_channels=latent_channels), "realcustom.clip_vision", family)
    return path


def sd15_workflow_adapter_path():
    """Adapter for the tiny SD1.5 checkpoint reading the ViT-L file's 1024-d features (workflow tests)."""
    from .checkpoints import load_sd15
    from .comfy_env import pack_module
    path = models_dir() / "realcustom" / "tiny_realcustom_sd15_vitl_v1.safetensors"
    if not path.exists():
        blocks = pack_module("nodes.patching").transformer_blocks(load_sd15()[0])
        adapter_path(path.name, blocks, vision_dim=1024, token_dim=768)
    return path


def flux_workflow_adapter_path():
    """Adapter for the tiny Flux dev of harness.dit reading the ViT-L file's 1024-d features, its file tagged
    "flux" as the trainer tags it (workflow tests)."""
    from . import dit
    from .comfy_env import pack_module
    path = models_dir() / "realcustom" / f"tiny_realcustom_flux_vitl_{dit.DIT_HARNESS_VERSION}.safetensors"
    if not path.exists():
        blocks = pack_module("nodes.patching").transformer_blocks(
            dit.flux_model("dev"), families=pack_module("attention.blocks").ALL_FAMILIES)
        adapter_path(path.name, blocks, vision_dim=1024, token_dim=64, family="flux", latent_channels=16)
    return path
