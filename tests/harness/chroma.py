"""A tiny random-weight Chroma (``comfy.ldm.chroma.model.Chroma`` inside ``comfy.model_base.Chroma``, config
``comfy.supported_models.Chroma``) and its text encoder, built with ComfyUI's own classes and key names and
recognised as Chroma by ComfyUI's own detection, as harness.dit builds Flux.

Reduced config ``CHROMA_DIT``, and why each number:
  hidden_size 256, num_heads 2, axes_dim [16, 56, 56], depth 2 double + 2 single blocks, context_in_dim 4096,
    patch 2, qkv_bias, theta 10000: Flux's harness values (harness.dit's docstring says why), since Chroma keeps
    Flux.1's blocks; in/out channels 64: Chroma's image embedder takes the 2 x 2 patches of 16 latent channels.
  The ``distilled_guidance_layer`` approximator: in_dim 64 (Chroma's forward feeds it 16 timestep + 16 guidance +
    32 modulation-index features), out_dim 256 (the width), hidden_dim 64 and 1 layer instead of 5120 and 5.
  Why the detection is completed: ComfyUI's detection pins num_heads 24 (as for Flux) and the approximator's
    hidden_dim 5120, out_dim 3072 and n_layers 5, which only a full-size file matches (a 5120-wide approximator
    alone is 131M parameters). So the file has the real key names, ComfyUI's detection reads it back (class
    Chroma, depths, widths) and the harness supplies only the heads (width / 128) and the approximator's sizes,
    read from the file.
Text encoder: ComfyUI's PixArtTokenizer and PixArt T5-XXL model (what ``CLIPLoader`` type "chroma" builds: T5
  alone, not padded), with harness.dit's reduced T5-XXL weights.
Weights: harness.dit.randomize_ with the fan-in scale, as the Flux harness (its docstring says why).
"""
from __future__ import annotations

from pathlib import Path

from .checkpoints import _cached
from .comfy_env import boot_comfy
from .dit import (TEXT_ENCODER_OPTIONS, TinyFamily, _load, _model_patcher, _name, built_and_read_back,
                  comfy_detection, lora_path, text_encoder_path)
from .memory import model_cache

CHROMA_DIT = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=256,
                  mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=64, n_layers=1)
#: the prefix of Chroma's modulation approximator in the file
APPROXIMATOR = "distilled_guidance_layer."


def _detected_chroma_config(sd: dict):
    """ComfyUI's own detection of a Chroma state dict, completed with what it pins (see the docstring)."""
    config = comfy_detection(sd, "Chroma", "Chroma")
    unet = config.unet_config
    layers = {key.split(".")[2] for key in sd if key.startswith(APPROXIMATOR + "layers.")}
    unet.update(num_heads=unet["hidden_size"] // sum(unet["axes_dim"]), n_layers=len(layers),
                hidden_dim=sd[APPROXIMATOR + "in_proj.weight"].shape[0],
                out_dim=sd[APPROXIMATOR + "out_proj.weight"].shape[0])
    return config


def _build_chroma() -> dict:
    import comfy.ops
    from comfy.ldm.chroma.model import Chroma

    return built_and_read_back(Chroma(**CHROMA_DIT, operations=comfy.ops.disable_weight_init), CHROMA_DIT, 70,
                               _detected_chroma_config, "Chroma")


def chroma_path() -> Path:
    """The tiny Chroma with the real key names (a diffusion-model file, fp16)."""
    return _cached("tiny_dit", _name("chroma"), _build_chroma)


@model_cache
def chroma_model():
    """ModelPatcher of the tiny Chroma (comfy.model_base.Chroma). Once per process until released: clone()
    before patching."""
    boot_comfy(require_pack=False)
    sd = _load(chroma_path())
    return _model_patcher(_detected_chroma_config(sd), sd)


@model_cache
def chroma_clip():
    """CLIP of Chroma: ComfyUI's PixArtTokenizer and PixArt T5-XXL (T5 alone, not padded), reduced."""
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart

    clip = comfy.sd.CLIP(comfy.supported_models_base.ClipTarget(pixart.PixArtTokenizer, pixart.pixart_te()),
                         model_options=TEXT_ENCODER_OPTIONS)
    missing, unexpected = clip.cond_stage_model.t5xxl.load_sd(_load(text_encoder_path("t5xxl")))
    if missing or unexpected:
        raise RuntimeError(f"reduced t5xxl: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


def chroma_lora_path() -> Path:
    """Flux's tiny LoRA (harness.dit.lora_path): diffusers names that ComfyUI maps onto Chroma's blocks too."""
    return lora_path("flux")


class TinyChroma(TinyFamily):
    """The tiny Chroma as the family tests use it (harness.dit.TinyFamily's encode and sample), sampled at CFG 4 as
    Chroma's examples are (no distilled guidance)."""

    def __init__(self):
        self.name = "chroma"
        self.model = chroma_model()
        self.clip = chroma_clip()
        self.cfg = 4.0
