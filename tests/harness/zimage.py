"""A tiny random-weight Z-Image (``comfy.ldm.lumina.model.NextDiT`` with Z-Image's options inside
``comfy.model_base.Lumina2``, config ``comfy.supported_models.ZImage``) and its Qwen3 4B text encoder, built with
ComfyUI's own classes and key names and read back by ComfyUI's own detection, as harness.chroma builds Chroma and
harness.flux2 Flux.2.

Reduced config ``ZIMAGE_DIT``, and why each number:
  dim 256, n_heads 2, n_kv_heads 2: the head dim must stay 128 = sum(axes_dims [32, 48, 48]), Z-Image's RoPE split
    over its three position axes (sequence index, row, column; NextDiT asserts it); 2 heads so that per-head code
    paths run; as many key/value heads as query heads, as the real model (30 and 30: no grouped-query attention).
    Real: 3840 wide.
  n_layers 2 main ``layers`` (real 30): two, so a block selection that names the first or the last differs from
    "all". The refiners keep the real 2 ``noise_refiner`` (image tokens only, modulated by the timestep) and 2
    ``context_refiner`` (text tokens only, unmodulated) blocks: ComfyUI reads no refiner count from the file, it
    builds NextDiT's default of 2.
  cap_feat_dim 64: the width of the tiny text encoder's hidden states (real: Qwen3 4B's 2560).
  in_channels 16, patch_size 2: the real values (the 16-channel Flux autoencoder's latent, 2 x 2 patches: one token
    per 16 x 16 pixels).
  qk_norm, ffn_dim_multiplier 8/3 (SwiGLU: 682 rounded up to a multiple of 256 = 768 wide; real 10240), rope_theta
    256, axes_lens [1536, 512, 512], time_scale 1000, z_image_modulation (a timestep embedding 256 wide, gates through
    tanh), pad_tokens_multiple 32 (the learnt ``cap_pad_token`` and ``x_pad_token`` fill the text and the image
    tokens up to a multiple of 32): the real values, exactly what ComfyUI's detection sets for a Z-Image file.
  What stays smaller than the real model without a field of its own: the timestep embedder's hidden width,
    min(dim, 1024) = 256 (real 1024).
  Why the detection is completed: ComfyUI tells Z-Image from Lumina 2 by the width alone. model_detection.py sets
    Z-Image's options (heads, RoPE, modulation, padding, ...) only when ``cap_embedder.1.weight`` is 3840 rows
    wide, and supported_models.ZImage matches only ``dim`` 3840: a narrower file is detected as a plain Lumina 2
    with none of them, and a 3840-wide file has the real model's ~6.15B parameters (one main block alone 181M).
    So the harness shows ComfyUI's detection the file with that one key seen at the real width (a meta tensor: no
    memory, no values) and takes everything else from it (class ZImage, layer count, text width, every Z-Image
    option, the padding because ``cap_pad_token`` is there); it supplies only the width (the file's) and the heads
    (width / 128).
Text encoder: what ``CLIPLoader`` builds for a Qwen3 4B file (any type: ComfyUI detects the file as QWEN3_4B by its
  ``q_norm`` keys): ComfyUI's ZImageTokenizer (the Qwen2.5 tokenizer files ComfyUI ships, which Qwen3 shares, and
  the chat template ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``) and ZImageTEModel (the
  hidden state after the second-to-last layer, layer "hidden" index -2, without the final norm), reduced through
  ComfyUI's own ``qwen3_4b_model_config`` option by ``QWEN3_4B_REDUCED``: width 64 (real 2560), MLP 128, 2 query
  heads sharing 1 key/value head (grouped-query attention, as the real 32 over 8), 3 layers (real 36): ComfyUI's
  SDClipModel asserts more layers than the index it reads (|-2| < 3), so two layers make the state it reads and the
  last one runs with its output dropped, as in the real model. The head dim stays 128: ComfyUI's Qwen3_4BConfig
  fixes it (a class attribute, not a field its options can set). The real vocabulary stays (151936 x 64: 9.7M of
  the encoder's 9.9M parameters), so every id of the real tokenizer exists. The template's tokens are kept in the
  conditioning: ZImageTEModel encodes the whole templated prompt and returns every token (a 5-word prompt: 13).
  Weights: normal(0, 0.02), norms at identity (harness.dit.randomize_, as harness.dit's text encoders), built in
  memory from a fixed seed.
Weights of the DiT: harness.dit.randomize_ with the fan-in scale, as the Flux harness (its docstring says why); the
  two pad tokens (parameters not named weight) normal(0, 0.02).
Sequence the main layers get: the text (every templated token, through ``cap_embedder`` and the context refiners)
  filled with ``cap_pad_token`` to a multiple of 32, then the image patches (through the noise refiners) filled
  with ``x_pad_token`` to a multiple of 32, with no mask, so the padding is attended (NextDiT gives the main layers
  and the noise refiners none; the context refiners get the encoder's mask only where it has zeros, and a prompt's
  is all ones); 64 x 64 px and a 5-word prompt: 13 -> 32 text + 16 -> 32 image = 64 tokens. RoPE positions: text
  token i (padding included) at (i + 1, 0, 0), image patches at (padded text length + 1, row, column), image padding
  at (0, 0, 0).
Sampling: the 16-channel Flux latent (latent_formats.Flux, as Lumina 2) at 1/8 of the image from stock
  EmptySD3LatentImage, and harness.dit.vae() is its autoencoder; FLOW model sampling with ComfyUI's Z-Image shift 3;
  CFG 1, as ComfyUI's Z-Image Turbo example samples (its negative, ConditioningZeroOut of the prompt, is never run
  at CFG 1).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import _cached, encode_prompt
from .comfy_env import boot_comfy
from .dit import TinyFamily, _load, _model_patcher, _name, built_and_read_back, comfy_detection, peft_lora, randomize_
from .memory import model_cache

#: ComfyUI's Qwen3_4BConfig fields the tiny text encoder changes (the vocabulary is the real tokenizer's)
QWEN3_4B_REDUCED = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                        num_key_value_heads=1)

ZIMAGE_DIT = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_heads=2, n_kv_heads=2, n_layers=2,
                  cap_feat_dim=QWEN3_4B_REDUCED["hidden_size"], qk_norm=True, axes_dims=[32, 48, 48],
                  axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                  z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)
#: the width by which ComfyUI's detection and supported_models.ZImage tell Z-Image from Lumina 2
ZIMAGE_REAL_WIDTH = 3840
#: the file's key ComfyUI reads the width (its rows) and the text width (its columns) from
WIDTH_KEY = "cap_embedder.1.weight"


def _detected_zimage_config(sd: dict):
    """ComfyUI's own detection of a Z-Image state dict, completed with the width and the heads (see the
    docstring)."""
    width, text_width = sd[WIDTH_KEY].shape
    at_real_width = dict(sd)
    at_real_width[WIDTH_KEY] = torch.empty(ZIMAGE_REAL_WIDTH, text_width, device="meta")
    config = comfy_detection(at_real_width, "ZImage", "Z-Image")
    unet = config.unet_config
    unet["dim"] = width
    unet["n_heads"] = unet["n_kv_heads"] = width // sum(unet["axes_dims"])
    return config


def _build_zimage() -> dict:
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    return built_and_read_back(NextDiT(**ZIMAGE_DIT, operations=comfy.ops.disable_weight_init), ZIMAGE_DIT, 90,
                               _detected_zimage_config, "Z-Image")


def zimage_path() -> Path:
    """The tiny Z-Image with the real key names (a diffusion-model file, fp16)."""
    return _cached("tiny_dit", _name("zimage"), _build_zimage)


@model_cache
def zimage_model():
    """ModelPatcher of the tiny Z-Image (comfy.model_base.Lumina2 with supported_models.ZImage's config: FLOW model
    sampling with shift 3). Once per process until released: clone() before patching."""
    boot_comfy(require_pack=False)
    sd = _load(zimage_path())
    return _model_patcher(_detected_zimage_config(sd), sd)


@model_cache
def zimage_clip():
    """CLIP of Z-Image: ComfyUI's ZImageTokenizer and ZImageTEModel (Qwen3 4B), reduced (module docstring); encodes
    a prompt, chat template included, into [1, tokens, 64]. Once per process until released: clone() before
    changing it."""
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.z_image as z_image

    target = comfy.supported_models_base.ClipTarget(z_image.ZImageTokenizer, z_image.te())
    clip = comfy.sd.CLIP(target, model_options={"qwen3_4b_model_config": QWEN3_4B_REDUCED})
    randomize_(clip.cond_stage_model.qwen3_4b.transformer, seed=91)
    return clip


def _build_zimage_lora(rank: int = 4) -> dict:
    """Rank-4 LoRA in the diffusers names ComfyUI maps onto Z-Image (comfy.utils.z_image_to_diffusers, through
    comfy.lora's Lumina2 branch) on the q/k/v of every main block: ComfyUI slices them into the fused qkv."""
    return peft_lora([f"diffusion_model.layers.{layer}.attention.{projection}"
                      for layer in range(ZIMAGE_DIT["n_layers"]) for projection in ("to_q", "to_k", "to_v")],
                     ZIMAGE_DIT["dim"], rank, seed=92)


def zimage_lora_path() -> Path:
    """The tiny Z-Image's LoRA (_build_zimage_lora) in models/loras."""
    boot_comfy(require_pack=False)
    return _cached("loras", _name("zimage_lora"), _build_zimage_lora)


class TinyZImage(TinyFamily):
    """The tiny Z-Image as the family tests use it (harness.dit.TinyFamily's sample: stock EmptySD3LatentImage,
    16 channels at 1/8), sampled at CFG 1 as ComfyUI's Z-Image Turbo example is, prompts through stock
    CLIPTextEncode."""

    def __init__(self):
        self.name = "zimage"
        self.model = zimage_model()
        self.clip = zimage_clip()
        self.cfg = 1.0

    def encode(self, text: str) -> list:
        """``text`` through stock CLIPTextEncode."""
        return encode_prompt(self.clip, text)
