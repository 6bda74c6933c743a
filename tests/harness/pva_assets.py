"""Tiny random-weight assets for PVA tests, built with ComfyUI's and the pack's own classes.

- ``sd15_inpaint_checkpoint_path()``: the tiny SD1.5 checkpoint with a 9-channel input convolution (noisy
  latent 4 + mask 1 + masked-image latent 4), which ComfyUI detects as an inpainting model exactly as it
  does the real ``sd-v1-5-inpainting`` (in_channels read from ``input_blocks.0.0.weight``).
- ``tiny_clip_vision()``: a ``comfy.clip_vision.ClipVisionModel`` from a reduced ViT config (ComfyUI's
  loader only recognises full-size layouts, so it is built in memory).
- ``arcface_path()``: a shallow InsightFace iresnet (layers 1/1/1/1, the real stem, widths and 512-d
  head) saved under the real backbone's file name in ``models/pva``.
- ``pva_path(encoder, family)``: PVA weights for the tiny SD1.5 U-Net (4- and 9-channel variants share their
  transformer blocks), the reduced SD2 / SDXL U-Nets of ``checkpoints.model_patcher`` or the tiny Flux dev /
  SD3.5 Large of ``dit`` (``dit_pva_weights``), with that family's cross-attention (joint-attention) layout
  and identity-word encoders, initialised as the paper does, then perturbed so identity changes the output.
- ``faces``, ``pva_model``: random reference "faces" and ParallelVisualAttention with the widget defaults.

Files are cached like ``checkpoints`` (HARNESS_VERSION in the name, atomic writes, checked finite).
"""
from __future__ import annotations

import json

import torch

from . import checkpoints, dit
from .checkpoints import HARNESS_VERSION, _cached, _fp16, randomize_
from .comfy_env import boot_comfy, cache_dir, models_dir, pack_module
from .memory import model_cache
from .pack_nodes import run_node

SD15_INPAINT_CHECKPOINT = f"tiny_sd15_inpainting_{HARNESS_VERSION}.safetensors"
ARCFACE_LAYERS = (1, 1, 1, 1)
#: widths of the identity word per text encoder (ComfyUI's tokenizer keys) of each model family
IDENTITY_WORD_WIDTHS = {"sd15": {"l": 768}, "sd2": {"h": 1024}, "sdxl": {"l": 768, "g": 1280}}
#: ParallelVisualAttention's widget defaults
PVA_DEFAULTS = dict(strength=1.0, uncond_identity=False, images_per_identity=0, start_percent=0.0, end_percent=1.0)
CLIP_VISION_CONFIG = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 128, "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "num_attention_heads": 4, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": 32, "torch_dtype": "float32",
}
#: feature width of each identity encoder: ArcFace's 512-d embedding, the tiny CLIP vision model's projection
ENCODER_FEATURE_DIMS = {"arcface": 512, "clip_vision": CLIP_VISION_CONFIG["projection_dim"]}


def _build_sd15_inpaint() -> dict:
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(checkpoints.sd15_checkpoint_path()), safe_load=True)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    gen = torch.Generator().manual_seed(6)
    sd[key] = (torch.randn(sd[key].shape[0], 9, *sd[key].shape[2:], generator=gen) * 0.02).to(sd[key].dtype)
    return sd


def sd15_inpaint_checkpoint_path():
    """Tiny SD1.5 inpainting-layout checkpoint (9 input channels) in models/checkpoints."""
    return _cached("checkpoints", SD15_INPAINT_CHECKPOINT, _build_sd15_inpaint)


@model_cache
def tiny_clip_vision():
    """A ClipVisionModel (ComfyUI's class) of a reduced ViT with random weights; image_embeds are 32-d."""
    boot_comfy(require_pack=False)
    import comfy.clip_vision

    config = cache_dir() / f"tiny_clip_vision_pva_{HARNESS_VERSION}.json"
    config.write_text(json.dumps(CLIP_VISION_CONFIG))
    model = comfy.clip_vision.ClipVisionModel(str(config))
    randomize_(model.model, seed=7)
    return model


def _build_arcface() -> dict:
    iresnet = pack_module("attention.pva_identity").IResNet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        net = iresnet(ARCFACE_LAYERS)
    return _fp16(net.state_dict())


def arcface_path():
    """A shallow random iresnet as models/pva/ms1mv3_arcface_r50.safetensors."""
    return _cached("pva", pack_module("nodes.pva").ARCFACE_FILE, _build_arcface)


def _build_pva(encoder: str, feature_dim: int, family: str):
    pva_weights = pack_module("attention.pva_weights")
    model = checkpoints.load_sd15()[0] if family == "sd15" else checkpoints.model_patcher(family, in_channels=9)
    blocks = [b for b in pack_module("nodes.patching").transformer_blocks(model) if b.has_cross_attention]
    projections = pack_module("nodes.pva").parallel_projections(model, blocks)
    gen = torch.Generator().manual_seed(9)
    word = {name: torch.randn(1, width, generator=gen) for name, width in IDENTITY_WORD_WIDTHS[family].items()}
    weights = pva_weights.PVAWeights.initial(projections, encoder, feature_dim, word, seed=10, layers=1, feedforward=64)
    with torch.no_grad():
        for projection in weights.parallel.values():
            for p in projection.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        weights.token_transformer.pos_enc.normal_(generator=gen)
    return weights


def pva_path(encoder: str = "arcface", family: str = "sd15"):
    """Tiny PVA weights in models/pva for the tiny U-Net of ``family`` ("sd15", "sd2", "sdxl") or the tiny
    Flux dev / SD3.5 Large of harness.dit ("flux", "sd35"); encoder "arcface" or "clip_vision". The Flux file
    also fits the tiny FLUX.1 Fill: PVA's parallel projections are per block, and Fill's blocks are dev's
    (only its input layer is wider)."""
    version = dit.DIT_HARNESS_VERSION if family in DIT_IDENTITY_WORD_WIDTHS else HARNESS_VERSION
    path = models_dir() / "pva" / f"tiny_pva_{family}_{encoder}_{version}.safetensors"
    if not path.exists():
        if family in DIT_IDENTITY_WORD_WIDTHS:
            model = {"flux": lambda: dit.flux_model("dev"), "sd35": lambda: dit.sd35_model("large")}[family]()
            weights = dit_pva_weights(family, model, encoder=encoder)
        else:
            weights = _build_pva(encoder, ENCODER_FEATURE_DIMS[encoder], family)
        checkpoints.require_finite(weights.state_dict(), path.name)
        pack_module("attention.pva_weights").save_pva(path, weights)
        boot_comfy().folder_paths.filename_list_cache.clear()
    return path


def faces(count: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """``count`` random IMAGEs standing in for square, aligned face crops."""
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def pva_model(model, pva, references, **overrides):
    """The MODEL patched by ParallelVisualAttention with PVA_DEFAULTS, overridden by ``overrides``."""
    return run_node("ParallelVisualAttention", model=model, pva=pva, references=references,
                    **{**PVA_DEFAULTS, **overrides})[0]


#: widths of the identity word per text encoder of the tiny DiT families (Flux: CLIP-L and T5-XXL; SD3.5: CLIP-L,
#: CLIP-G and T5-XXL; Chroma: T5-XXL)
DIT_IDENTITY_WORD_WIDTHS = {"flux": {"l": 768, "t5xxl": 4096}, "sd35": {"l": 768, "g": 1280, "t5xxl": 4096},
                            "chroma": {"t5xxl": 4096}, "flux2": {"mistral3_24b": 64},
                            "zimage": {"qwen3_4b": 64}, "qwen_image": {"qwen25_7b": 64}}


def dit_pva_weights(family: str, model, perturbed: bool = True, encoder: str = "clip_vision", rank: int = 0,
                    block_selection: str = "all"):
    """PVA weights (``encoder``: "clip_vision", the tiny CLIP vision model's features, or "arcface") for the tiny
    DiT ``model`` of ``family`` ("flux", "sd35", "chroma", "flux2",
    "zimage", "qwen_image"), initialised from its blocks as the paper does (full-rank copies, or with ``rank`` > 0 the
    low-rank form, on the ``block_selection``), then (``perturbed``) changed a little so the parallel queries and keys
    differ from the block's own."""
    found = [b for b in pack_module("nodes.patching").transformer_blocks(model, families=pack_module(
        "attention.blocks").ALL_FAMILIES) if b.has_cross_attention]
    keys = set(pack_module("attention.blocks").selected_blocks(block_selection, [b.key for b in found]))
    blocks = [b for b in found if b.key in keys]
    gen = torch.Generator().manual_seed(11)
    word = {name: torch.randn(1, width, generator=gen) for name, width in DIT_IDENTITY_WORD_WIDTHS[family].items()}
    weights = pack_module("attention.pva_weights").PVAWeights.initial(
        lambda: pack_module("nodes.pva").parallel_projections(model, blocks, rank), encoder,
        ENCODER_FEATURE_DIMS[encoder], word, family=blocks[0].family, seed=12, block_selection=block_selection,
        layers=1, feedforward=64)
    if perturbed:
        with torch.no_grad():
            for projection in weights.parallel.values():
                for p in projection.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    weights.token_transformer.pos_enc.data.normal_(generator=gen)
    return weights


def loaded_pva(weights, name: str = "tiny dit pva"):
    """A LoadedPVA (PVALoader's output) of in-memory ``weights``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    return pack_module("nodes.pva").LoadedPVA(name, weights, comfy.model_patcher.ModelPatcher(
        weights, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()))
