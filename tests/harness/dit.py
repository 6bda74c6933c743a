"""Tiny random-weight DiT families for tests: Flux (dev, schnell and Fill layouts) and SD3.5 (Large and Medium
layouts), their text encoders (CLIP-L, CLIP-G, T5-XXL), the 16-channel VAE, a LoRA and a ControlNet of each
family, all built with ComfyUI's own classes, with the real key names, recognised by ComfyUI's own model
detection and run by its own samplers and nodes.

Reduced configs, and why each number
------------------------------------
Flux (``comfy.ldm.flux.model.Flux`` inside ``comfy.model_base.Flux``, config ``comfy.supported_models.Flux``
for dev, ``FluxSchnell`` for schnell, ``FluxInpaint`` for fill), ``FLUX_DIT``:
  hidden_size 256, num_heads 2: the head dim must stay 128 = sum(axes_dim [16, 56, 56]), the real RoPE split
    over the (index, row, column) position ids; 2 heads so that per-head code paths run.
  depth 2 double + 2 single blocks: two of each kind, so a block selection that names the first, the last
    or one kind of block differs from "all blocks".
  context_in_dim 4096, vec_in_dim 768: the real T5-XXL and CLIP-L pooled widths, so real text-encoder output
    fits; in/out channels 16, patch 2, mlp_ratio 4, qkv_bias, theta 10000: the real values.
  guidance_embed: dev has ``guidance_in`` (detected as Flux, guidance-distilled: FluxGuidance feeds it);
    schnell has not (detected as FluxSchnell). fill: dev with in_channels 96 (FLUX.1 Fill: noisy latent 16 +
    masked-image latent 16 + the 8x8 pixel mask folded into 64 channels; detected as FluxInpaint), for the
    inpainting conditioning of PVA's trainers and InpaintModelConditioning.
  Why not through UNETLoader: ComfyUI's detection PINS num_heads = 24 for Flux (model_detection.py) and
    reads the width from ``img_in``, so any file narrower than 3072 (24 x 128) fails to build. A 3072-wide
    Flux has 404M parameters (1.5 GiB in fp32, the CPU inference dtype) even with one double block and no
    single block, far over the suite's memory budget. So the weights are cached in a file with the real key
    names, ComfyUI's own detection reads it back (class Flux / FluxSchnell, depths, widths, guidance) and the
    model is built the way ``comfy.sd.load_diffusion_model_state_dict`` builds it, the harness supplying
    only num_heads = hidden_size // 128. The same holds for the Flux ControlNet and ControlNetLoader.
SD3.5 (``OpenAISignatureMMDITWrapper`` inside ``comfy.model_base.SD3``, config ``comfy.supported_models.SD3``),
loaded by the stock UNETLoader from models/diffusion_models, ``SD35_DIT``:
  depth 3: SD3 detection derives everything from it (hidden 64 x depth = 192, heads = depth = 3, head dim
    64 as in the real models, 3 joint blocks); the last block's context stream is pre_only, as in the real
    model, so 3 blocks leave two full joint blocks before it.
  qk_norm "rms" (``ln_q``/``ln_k`` present): what SD3.5 has and SD3.0 has not.
  Large: no ``x_block.attn2``. Medium (MMDiT-X): ``x_block_self_attn_layers`` [0, 1], the second image-only
    self-attention in the first blocks (the real Medium has it in blocks 0..12 of 24).
  pos_embed_max_size 32 (real: 192 Large, 384 Medium): covers images up to 512 px at 1/36 of the table.
  context 4096 (T5-XXL width; SD3ClipModel zero-pads CLIP-L+G to it), adm 2048 (pooled CLIP-L 768 + G 1280).
Text encoders (ComfyUI's FluxClipModel / SD3ClipModel with their real tokenizers, built in memory because
the stock loaders build fixed full-size configs, e.g. a 4.7B-parameter T5-XXL):
  T5-XXL ``T5XXL_REDUCED``: d_model 4096 (the output width is the real one), 1 layer, 2 heads of d_kv 64,
    d_ff 256. Its 32128 x 4096 embedding (263 MB in fp16, the text-encoder dtype on CPU) stays: every id of
    the real tokenizer must exist. The biggest tensor of the DiT harness.
  CLIP-L and CLIP-G: 3 layers, real widths and vocabularies (SD3 reads the penultimate layer, and ComfyUI
    wants more layers than that index; as harness.text_encoders.reduced_clip).
VAE: ComfyUI fixes the Flux / SD3 autoencoder (ch 128, ch_mult 1 2 4 4, z 16, no quant convs: 84M
  parameters, 336 MB in fp32 on CPU); one file serves both families (their latent formats, the scale and
  shift, belong to the model config), loaded by the stock VAELoader.
LoRA: rank 4 on every attention projection, diffusers/PEFT names (``transformer.*.lora_A/lora_B``), which
  ComfyUI's key map slices into the fused qkv weights. ControlNet: Flux in the XLabs layout (2 double
  blocks, hint image; ComfyUI's ControlNetFlux), SD3.5 in Stability's layout (2 blocks, VAE-encoded hint;
  ComfyUI's ControlNetEmbedder, loaded by the stock ControlNetLoader).

Weights, from a fixed seed per file: every normalisation layer (LayerNorm, GroupNorm, and the RMSNorms of
Flux, MMDiT and T5, whose weight Flux calls ``scale``) at identity. Text encoders and VAE: normal(0, 0.02)
like harness.checkpoints. DiT models and their ControlNets: weight matrices and kernels normal(0,
1/sqrt(fan_in)), biases and other tensors normal(0, 0.02). Why: with 0.02 everywhere the adaLN-zero gates
come out ~0.02, so each block barely moves the residual stream: replacing every attention by uniform
attention changed a 2-step Flux sample by 0.2%, too little for a test to tell a technique from noise; with
the fan-in scale each map keeps its input's scale, the gates are O(1) and that change is 8% on Flux and
19-28% on SD3.5 (tests/test_dit_harness.py asserts > 3%). The attention logits themselves were never
degenerate: Flux and SD3.5 RMS-normalise q and k per head (scale 1), so q.k / sqrt(head dim) has a
standard deviation near 1 whatever the std (measured ~1.0; the probabilities are ~0.4 nats from uniform);
T5 has no 1/sqrt(d) and its q, k come from RMS-normalised tokens through 4096-wide projections.
Buffers: the only one in these files, the MMDiT's ``pos_embed``, which ComfyUI allocates uninitialised for the
checkpoint to fill, holds a fixed 2-D sin-cos table like the real model's (sd3_pos_embed); tests/test_harness_files.py
builds every DiT file in NaN-poisoned memory to catch any tensor a builder leaves uninitialised.

Workflows: use_tiny_dit_models() points an API prompt's loaders at these models, through stock loaders
where they can load them and test-only stand-in nodes (stand_in_nodes()) where they cannot; family_of() tells
a prompt's family from its text-encoder loaders, variant_of() the variant from a model file's name
(flux1-fill-dev.safetensors: the tiny Fill). SD3.5 is also written as a checkpoint with the VAE inside
(sd35_checkpoint_path), the layout of Stability's sd3.5_large.safetensors that ComfyUI's SD3.5 examples load
with CheckpointLoaderSimple. A Flux.2 prompt (CLIPLoader type "flux2") gets harness.flux2's tiny Flux.2 [dev],
its Mistral 3 text encoder (both through stand-ins, for the reasons of Flux), VAE and LoRA. A Z-Image prompt
(CLIPLoader type "lumina2", as ComfyUI's Z-Image Turbo template loads qwen_3_4b.safetensors: ComfyUI picks Z-Image's
Qwen3 text encoder from the file, whatever the type) gets harness.zimage's tiny Z-Image and its Qwen3 4B text encoder
(both through stand-ins: ComfyUI's detection tells Z-Image by the real width alone, harness.zimage's docstring), the
16-channel Flux VAE of this module (Z-Image's latent is Flux.1's) and harness.zimage's LoRA.

Memory: every loader is a harness.memory.model_cache (once per process, clone() before patching) that
``release()`` empties for some families and conftest empties for all after every test module; the module holds
no other reference, so a released family is freed when the tests drop theirs.
Files are cached like harness.checkpoints (atomic writes, finite values checked before writing,
``DIT_HARNESS_VERSION`` in the names: dit2 since ``pos_embed`` is initialised; dit1 SD3.5 files hold whatever
memory held, inf/NaN on some machines).
"""
from __future__ import annotations

import contextlib
import gc
import sys
from pathlib import Path

import torch

from .checkpoints import _cached
from .comfy_env import boot_comfy
from .memory import model_cache, trim_heap

DIT_HARNESS_VERSION = "dit2"

FLUX_VARIANTS = ("dev", "schnell", "fill")
FLUX_DIT = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True)
#: XLabs Flux ControlNets have two double blocks and no single block.
FLUX_CONTROLNET_DEPTHS = dict(depth=2, depth_single_blocks=0)

SD35_VARIANTS = {"large": [], "medium": [0, 1]}  # variant -> x_block_self_attn_layers
SD35_DEPTH = 3  # MMDiT: hidden 64 * depth, depth heads, depth joint blocks
SD35_DIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=SD35_DEPTH, input_size=None, adm_in_channels=2048,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 64 * SD35_DEPTH}},
                num_patches=32 * 32, pos_embed_max_size=32, qk_norm="rms", pos_embed_scaling_factor=None)
SD35_CONTROLNET_BLOCKS = 2

T5XXL_REDUCED = {"num_layers": 1, "num_heads": 2, "d_ff": 256}  # d_model 4096, d_kv 64, vocab 32128 kept
CLIP_LAYERS = 3
#: ComfyUI's ``<encoder>_model_config`` overrides, read by each SDClipModel it builds.
TEXT_ENCODER_OPTIONS = {"clip_l_model_config": {"num_hidden_layers": CLIP_LAYERS},
                        "clip_g_model_config": {"num_hidden_layers": CLIP_LAYERS},
                        "t5xxl_model_config": T5XXL_REDUCED}
FAMILY_ENCODERS = {"flux": ("clip_l", "t5xxl"), "sd35": ("clip_l", "clip_g", "t5xxl")}

# ComfyUI fixes this autoencoder in comfy.sd.VAE for 16-channel latents (Flux ae, SD3 vae).
FLUX_SD3_VAE_DDCONFIG = {'double_z': True, 'z_channels': 16, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                         'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                         'dropout': 0.0}

# Real conditioning widths and token counts of a short prompt: Flux pads T5 to 256 tokens; SD3 concatenates
# CLIP-L+G (77, zero-padded to 4096) and T5 padded to 77.
CONDITIONING_SHAPES = {"flux": dict(tokens=256, context=4096, pooled=768),
                       "sd35": dict(tokens=154, context=4096, pooled=2048)}


def _name(stem: str) -> str:
    return f"tiny_{stem}_{DIT_HARNESS_VERSION}.safetensors"


# ---------------------------------------------------------------- weights


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float | None = 0.02) -> torch.nn.Module:
    """normal(0, std) from ``seed`` for every parameter except normalisation layers (any module whose class
    name contains "Norm": LayerNorm, GroupNorm, Flux/MMDiT/T5 RMSNorm), whose weight or scale is set to 1
    and bias to 0. ``std=None``: weight matrices and kernels get 1/sqrt(fan_in) (each map keeps its input's
    scale), biases and other tensors 0.02."""
    gen = torch.Generator().manual_seed(seed)
    norm_params = set()
    for m in module.modules():
        if "Norm" in type(m).__name__:
            for name, p in m.named_parameters(recurse=False):
                p.fill_(0.0 if name == "bias" else 1.0)
                norm_params.add(id(p))
    for name, p in module.named_parameters():
        if id(p) in norm_params:
            continue
        scale = std
        if scale is None:
            scale = p[0].numel() ** -0.5 if name.endswith("weight") and p.ndim >= 2 else 0.02
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return module


def _fp16(sd: dict) -> dict:
    return {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}


def _load(path: Path) -> dict:
    import comfy.utils
    return comfy.utils.load_torch_file(str(path))


# ---------------------------------------------------------------- Flux


def flux_config(variant: str = "dev") -> dict:
    """The reduced Flux unet_config of ``variant`` (see the module docstring)."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"Flux variant {variant!r}: expected one of {FLUX_VARIANTS}")
    return dict(FLUX_DIT, guidance_embed=variant != "schnell", in_channels=96 if variant == "fill" else 16)


def _flux_heads(unet_config: dict) -> int:
    """The head count ComfyUI's detection cannot read (it pins 24): the width over the RoPE head dim."""
    return unet_config["hidden_size"] // sum(unet_config["axes_dim"])


def comfy_detection(sd: dict, expected: str, what: str, exact: bool = True):
    """ComfyUI's own detection of a tiny DiT's state dict (``model_config_from_unet``), which must make it a
    ``comfy.supported_models.<expected>`` config (``exact``: that class, not one of its subclasses); RuntimeError
    naming ``what`` otherwise."""
    import comfy.model_detection
    import comfy.supported_models

    config = comfy.model_detection.model_config_from_unet(sd, "")
    expected_class = getattr(comfy.supported_models, expected)
    if (type(config) is not expected_class) if exact else not isinstance(config, expected_class):
        raise RuntimeError(f"tiny {what} layout detected as {type(config).__name__}, not {expected}")
    return config


def built_and_read_back(net: torch.nn.Module, built: dict, seed: int, detect, what: str) -> dict:
    """The fp16 state dict of ``net`` (built from the config ``built``) randomised from ``seed`` with the fan-in
    scale, after checking that ``detect`` (ComfyUI's detection, completed) reads every value of ``built`` back;
    RuntimeError naming ``what`` otherwise."""
    sd = _fp16(randomize_(net, seed=seed, std=None).state_dict())
    detected = detect(sd).unet_config
    wrong = {k: (v, detected.get(k)) for k, v in built.items() if detected.get(k) != v}
    if wrong:
        raise RuntimeError(f"ComfyUI reads the tiny {what} back differently: {wrong}")
    return sd


def _detected_flux_config(sd: dict):
    """ComfyUI's own detection of a Flux state dict, completed with the head count (see the docstring)."""
    config = comfy_detection(sd, "Flux", "Flux", exact=False)
    config.unet_config["num_heads"] = _flux_heads(config.unet_config)
    return config


def _build_flux(variant: str) -> dict:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    config = flux_config(variant)
    return built_and_read_back(Flux(**config, operations=comfy.ops.disable_weight_init), config,
                               20 + FLUX_VARIANTS.index(variant), _detected_flux_config, f"Flux {variant}")


def flux_path(variant: str = "dev") -> Path:
    """The tiny Flux ``variant`` ("dev", "schnell" or "fill") with the real key names (a diffusion-model file, fp16).
    Kept out of models/diffusion_models: UNETLoader cannot build it (module docstring)."""
    flux_config(variant)
    return _cached("tiny_dit", _name(f"flux_{variant}"), lambda: _build_flux(variant))


def _model_patcher(config, sd: dict):
    """ModelPatcher of ``config``'s model with ``sd``'s weights, as comfy.sd.load_diffusion_model_state_dict
    makes it (dtype choice, offload device, load_model_weights)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                          supported_dtypes=list(config.supported_inference_dtypes),
                          weight_dtype=comfy.utils.weight_dtype(sd))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model(sd, "").to(offload_device)
    expected = {k[len("diffusion_model."):] for k in model.state_dict() if k.startswith("diffusion_model.")}
    if expected != set(sd):
        raise RuntimeError(f"tiny DiT weights do not match the model: missing {sorted(expected - set(sd))[:5]}, "
                           f"unexpected {sorted(set(sd) - expected)[:5]}")
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


@model_cache
def flux_model(variant: str = "dev"):
    """ModelPatcher of the tiny Flux ``variant`` (comfy.model_base.Flux; dev: guidance-distilled, FLUX
    model sampling; schnell: FLOW; fill: dev's layout with FLUX.1 Fill's inpainting input, 16 latent + 16
    masked-image + 64 mask channels, detected as FluxInpaint). Once per process until release("flux"): clone() before patching."""
    boot_comfy(require_pack=False)
    sd = _load(flux_path(variant))
    return _model_patcher(_detected_flux_config(sd), sd)


def _build_flux_controlnet() -> dict:
    import comfy.ops
    from comfy.ldm.flux.controlnet import ControlNetFlux

    config = dict(flux_config("dev"), **FLUX_CONTROLNET_DEPTHS)
    net = ControlNetFlux(operations=comfy.ops.disable_weight_init, **config)
    return _fp16(randomize_(net, seed=22, std=None).state_dict())


def flux_controlnet_path() -> Path:
    """A tiny XLabs-layout Flux ControlNet (``controlnet_blocks``, ``input_hint_block``, fp16); kept out of
    models/controlnet: ControlNetLoader's Flux detection pins 24 heads like UNETLoader's."""
    return _cached("tiny_dit", _name("flux_controlnet"), _build_flux_controlnet)


@model_cache
def flux_controlnet():
    """CONTROL_NET of the tiny Flux ControlNet: comfy.controlnet.load_controlnet_flux_xlabs_mistoline's body
    (ComfyUI's controlnet_config, ControlNetFlux, ControlNet with the y/guidance extra conds), the head count
    supplied. Apply with stock ControlNetApplyAdvanced (hint image, no VAE needed)."""
    boot_comfy(require_pack=False)
    import comfy.controlnet
    from comfy.ldm.flux.controlnet import ControlNetFlux

    sd = _load(flux_controlnet_path())
    model_config, operations, load_device, unet_dtype, manual_cast_dtype, offload_device = \
        comfy.controlnet.controlnet_config(sd)
    model_config.unet_config["num_heads"] = _flux_heads(model_config.unet_config)
    net = ControlNetFlux(mistoline=False, operations=operations, device=offload_device, dtype=unet_dtype,
                         **model_config.unet_config)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"tiny Flux ControlNet keys: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return comfy.controlnet.ControlNet(net, load_device=load_device, manual_cast_dtype=manual_cast_dtype,
                                       extra_conds=["y", "guidance"])


# ---------------------------------------------------------------- SD3.5


def sd35_config(variant: str = "large") -> dict:
    """The reduced SD3.5 unet_config of ``variant`` ("large" or "medium"), as ComfyUI's detection reads it."""
    if variant not in SD35_VARIANTS:
        raise ValueError(f"SD3.5 variant {variant!r}: expected one of {tuple(SD35_VARIANTS)}")
    return dict(SD35_DIT, x_block_self_attn_layers=list(SD35_VARIANTS[variant]))


def _build_sd35(variant: str) -> dict:
    import comfy.model_detection
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    config = sd35_config(variant)
    net = OpenAISignatureMMDITWrapper(**config, operations=comfy.ops.disable_weight_init)
    randomize_(net, seed=30 + list(SD35_VARIANTS).index(variant), std=None)
    net.pos_embed.copy_(sd3_pos_embed(net.hidden_size, config["pos_embed_max_size"]))
    sd = _fp16(net.state_dict())
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    wrong = {k: (v, detected.unet_config.get(k)) for k, v in config.items()
             if detected is not None and detected.unet_config.get(k) != v}
    if type(detected) is not comfy.supported_models.SD3 or wrong:
        raise RuntimeError(f"tiny SD3.5 {variant} detected as {type(detected).__name__}, read back as {wrong}")
    return sd


def sd3_pos_embed(width: int, grid: int) -> torch.Tensor:
    """[1, grid * grid, width]: a fixed 2-D sin-cos table of patch positions, what SD3's MMDiT holds in
    ``pos_embed`` (ComfyUI's get_2d_sincos_pos_embed, row-major over the grid x grid patches, as MMDiT crops it).
    ComfyUI registers that buffer uninitialised (torch.empty) for the checkpoint to fill."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
    return torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float().unsqueeze(0)


def sd35_path(variant: str = "large") -> Path:
    """The tiny SD3.5 ``variant`` in models/diffusion_models (real MMDiT key names, fp16): stock UNETLoader."""
    sd35_config(variant)
    return _cached("diffusion_models", _name(f"sd35_{variant}"), lambda: _build_sd35(variant))


def _build_sd35_checkpoint(variant: str) -> dict:
    model = {f"model.diffusion_model.{k}": v for k, v in _load(sd35_path(variant)).items()}
    return {**model, **{f"first_stage_model.{k}": v for k, v in _load(vae_path()).items()}}


def sd35_checkpoint_path(variant: str = "large") -> Path:
    """The tiny SD3.5 ``variant`` and the VAE in one checkpoint (``model.diffusion_model.*``,
    ``first_stage_model.*``, no text encoders), the layout of Stability's sd3.5_large.safetensors, in
    models/checkpoints: stock CheckpointLoaderSimple loads its MODEL and VAE (its CLIP is None)."""
    sd35_config(variant)
    return _cached("checkpoints", _name(f"sd35_{variant}_checkpoint"), lambda: _build_sd35_checkpoint(variant))


@model_cache
def sd35_model(variant: str = "large"):
    """ModelPatcher of the tiny SD3.5 ``variant`` from stock UNETLoader (comfy.model_base.SD3, FLOW sampling
    with shift 3). Once per process until release("sd35"): clone() before patching."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.UNETLoader().load_unet(sd35_path(variant).name, "default")[0]


def _build_sd35_controlnet() -> dict:
    import comfy.ops
    from comfy.cldm.dit_embedder import ControlNetEmbedder

    net = ControlNetEmbedder(img_size=None, patch_size=2, in_chans=16, attention_head_dim=64,
                             num_attention_heads=SD35_DEPTH, adm_in_channels=2048, num_layers=SD35_CONTROLNET_BLOCKS,
                             main_model_double=SD35_DEPTH, double_y_emb=False, device=None, dtype=None,
                             operations=comfy.ops.disable_weight_init)
    return _fp16(randomize_(net, seed=32, std=None).state_dict())


def sd35_controlnet_path() -> Path:
    """A tiny SD3.5 ControlNet in Stability's layout (what ControlNetLoader's load_controlnet_sd35 reads;
    2 blocks; its hint is VAE-encoded: apply with a VAE) in models/controlnet."""
    return _cached("controlnet", _name("sd35_controlnet"), _build_sd35_controlnet)


@model_cache
def sd35_controlnet():
    """CONTROL_NET of the tiny SD3.5 ControlNet from stock ControlNetLoader."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.ControlNetLoader().load_controlnet(sd35_controlnet_path().name)[0]


# ---------------------------------------------------------------- text encoders


def _text_encoder_module(name: str):
    """ComfyUI's own module of the text encoder ``name``, reduced by TEXT_ENCODER_OPTIONS (fp32)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip

    classes = {"clip_l": comfy.sd1_clip.SDClipModel, "clip_g": comfy.sdxl_clip.SDXLClipG,
               "t5xxl": comfy.text_encoders.sd3_clip.T5XXLModel}
    return classes[name](dtype=torch.float32, model_options=TEXT_ENCODER_OPTIONS)


def _build_text_encoder(name: str) -> dict:
    module = _text_encoder_module(name)
    seed = 40 + list(TEXT_ENCODER_OPTIONS).index(f"{name}_model_config")
    return _fp16(randomize_(module.transformer, seed=seed).state_dict())


def text_encoder_path(name: str) -> Path:
    """Reduced ``name`` ("clip_l", "clip_g" or "t5xxl") weights (fp16), shared by the families; kept out of
    models/text_encoders: the stock CLIP loaders build the full-size configs."""
    return _cached("tiny_dit", _name(f"text_encoder_{name}"), lambda: _build_text_encoder(name))


def _clip(family: str):
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    if family == "flux":
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer,
                                                        comfy.text_encoders.flux.flux_clip())
    else:
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                                        comfy.text_encoders.sd3_clip.sd3_clip())
    clip = comfy.sd.CLIP(target, model_options=TEXT_ENCODER_OPTIONS)
    for name in FAMILY_ENCODERS[family]:
        # Each encoder's own load_sd: SD3ClipModel.load_sd routes CLIP-G by its 31st layer, absent here.
        missing, unexpected = getattr(clip.cond_stage_model, name).load_sd(_load(text_encoder_path(name)))
        if missing or unexpected:
            raise RuntimeError(f"reduced {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


@model_cache
def flux_clip():
    """CLIP of Flux: ComfyUI's FluxTokenizer and FluxClipModel (CLIP-L pooled + T5-XXL sequence), reduced
    (module docstring). Once per process until release("flux"): clone() before changing it."""
    return _clip("flux")


@model_cache
def sd35_clip():
    """CLIP of SD3.5: ComfyUI's SD3Tokenizer and SD3ClipModel (CLIP-L + CLIP-G + T5-XXL), reduced.
    Once per process until release("sd35")."""
    return _clip("sd35")


def encode_as_users_wire_it(family: str, clip, text: str) -> list:
    """``text`` encoded by ``clip`` as a positive prompt of ``family``'s graphs: Flux dev's with FluxGuidance 3.5."""
    from .checkpoints import encode_prompt
    conditioning = encode_prompt(clip, text)
    if family == "flux":
        import nodes
        conditioning = nodes.NODE_CLASS_MAPPINGS["FluxGuidance"]().append(conditioning, 3.5)[0]
    return conditioning


#: the sampler of the DiT node tests: two euler steps
NODE_SAMPLING = dict(steps=2, sampler_name="euler", scheduler="simple")


class TinyFamily:
    """A family's tiny model as the DiT node tests use it: Flux dev (guidance-distilled: sampled at CFG 1, prompts
    with FluxGuidance) or SD3.5 Large (CFG 4), with its text encoders."""

    #: the positive prompt :meth:`sample` encodes when given no conditioning
    prompt = ""

    def __init__(self, name: str):
        self.name = name
        self.model = flux_model("dev") if name == "flux" else sd35_model("large")
        self.clip = flux_clip() if name == "flux" else sd35_clip()
        self.cfg = 1.0 if name == "flux" else 4.0

    def encode(self, text: str) -> list:
        return encode_as_users_wire_it(self.name, self.clip, text)

    def sample(self, model, batch: int = 2, cfg: float | None = None, positive=None, negative=None) -> torch.Tensor:
        """``batch`` latents of ``model`` (seed 3, :data:`NODE_SAMPLING`) at the family's CFG unless ``cfg``."""
        from .checkpoints import sample
        return sample(model, positive or self.encode(self.prompt), negative or self.encode(""), empty_latent(batch),
                      seed=3, cfg=self.cfg if cfg is None else cfg, **NODE_SAMPLING)


def check_strength_zero_is_unpatched(family: TinyFamily, patched) -> None:
    """Batch 2; Flux at CFG 1 (cond pass only), SD3.5 at CFG 1 and CFG 4 (cond and uncond passes):
    ``patched(strength=0.0)`` samples bit for bit what the model does, ``patched()`` changes every image, and the
    input model stays unpatched."""
    from .tensors import relative_change
    for cfg in ((1.0,) if family.name == "flux" else (1.0, 4.0)):
        base = family.sample(family.model, cfg=cfg)
        assert torch.equal(family.sample(patched(strength=0.0), cfg=cfg), base)
        on = family.sample(patched(), cfg=cfg)
        assert relative_change(on[0], base[0]) > 1e-3 and relative_change(on[1], base[1]) > 1e-3
    assert torch.equal(family.sample(family.model, cfg=cfg), base), "the input model must stay unpatched"


def conditioning(family: str = "flux", batch: int = 1, seed: int = 0, tokens: int | None = None,
                 guidance: float | None = None) -> list:
    """CONDITIONING of the real shapes of ``family``'s text encoders, random from ``seed``, for tests that
    need no prompt: "flux" context [B, 256, 4096] (T5-XXL) and pooled_output [B, 768] (CLIP-L); "sd35"
    context [B, 154, 4096] (CLIP-L+G then T5) and pooled_output [B, 2048]. ``tokens`` shortens the context;
    ``guidance`` sets what FluxGuidance sets (the model's default is 3.5)."""
    shapes = CONDITIONING_SHAPES[family]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens or shapes["tokens"], shapes["context"], generator=gen)
    extra = {"pooled_output": torch.randn(batch, shapes["pooled"], generator=gen)}
    if guidance is not None:
        extra["guidance"] = guidance
    return [[context, extra]]


# ---------------------------------------------------------------- VAE, LoRA, latents


def _build_vae() -> dict:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    def part(kind):
        return {"target": f"comfy.ldm.modules.diffusionmodules.model.{kind}", "params": FLUX_SD3_VAE_DDCONFIG}
    vae = AutoencodingEngine(regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                             encoder_config=part("Encoder"), decoder_config=part("Decoder"))
    return _fp16(randomize_(vae, seed=50).state_dict())


def vae_path() -> Path:
    """The 16-channel Flux / SD3 autoencoder (ae layout: encoder.*, decoder.*, fp16) in models/vae."""
    return _cached("vae", _name("flux_sd3_vae"), _build_vae)


@model_cache
def vae():
    """VAE from stock VAELoader (shared by both families). Once per process until release("vae")."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.VAELoader().load_vae(vae_path().name)[0]


def _lora_targets(family: str) -> list[str]:
    """Diffusers names of every attention projection of the tiny ``family`` model (ComfyUI's own map)."""
    import comfy.utils

    if family == "flux":
        keys = comfy.utils.flux_to_diffusers(flux_config("dev"))
        ends = (".attn.to_q.weight", ".attn.to_k.weight", ".attn.to_v.weight",
                ".attn.add_q_proj.weight", ".attn.add_k_proj.weight", ".attn.add_v_proj.weight")
        return sorted(k[:-len(".weight")] for k in keys if k.endswith(ends))
    config = sd35_config("medium")
    keys = comfy.utils.mmdit_to_diffusers(config)
    ends = tuple(f".{a}.{p}.weight" for a in ("attn", "attn2") for p in ("to_q", "to_k", "to_v")) + \
        (".attn.add_q_proj.weight", ".attn.add_k_proj.weight", ".attn.add_v_proj.weight")
    attn2_blocks = {f"transformer_blocks.{i}." for i in config["x_block_self_attn_layers"]}
    return sorted(k[:-len(".weight")] for k in keys if k.endswith(ends)
                  and (".attn2." not in k or any(k.startswith(b) for b in attn2_blocks)))


def peft_lora(targets, width: int, rank: int, seed: int) -> dict:
    """A diffusers/PEFT LoRA (``<target>.lora_A/lora_B.weight``, fp16) of random rank-``rank`` changes of the square
    ``width`` projections ``targets``, drawn in order from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for target in targets:
        sd[f"{target}.lora_A.weight"] = torch.randn(rank, width, generator=gen) * 0.1
        sd[f"{target}.lora_B.weight"] = torch.randn(width, rank, generator=gen) * 0.1
    return _fp16(sd)


def _build_lora(family: str, rank: int = 4) -> dict:
    width = FLUX_DIT["hidden_size"] if family == "flux" else 64 * SD35_DEPTH
    return peft_lora([f"transformer.{target}" for target in _lora_targets(family)], width, rank,
                     seed=60 + ("flux", "sd35").index(family))


def lora_path(family: str = "flux") -> Path:
    """Rank-4 diffusers/PEFT LoRA on every attention q/k/v projection of the tiny ``family`` model (SD3.5:
    Medium's x_block.attn2 included, so on Large those layers are simply absent) in models/loras."""
    return _cached("loras", _name(f"{family}_lora"), lambda: _build_lora(family))


def empty_latent(batch: int = 1, width: int = 64, height: int = 64) -> dict:
    """LATENT of stock EmptySD3LatentImage (16 channels, 1/8 size), what Flux and SD3.5 workflows use."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.NODE_CLASS_MAPPINGS["EmptySD3LatentImage"].execute(width=width, height=height,
                                                                     batch_size=batch).result[0]


# ---------------------------------------------------------------- attention


def comfy_style_attention(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **_):
    """A stand-in for ComfyUI's attention functions with their calling convention: (B, L, heads*d) in and out,
    or (B, heads, L, d) in with ``skip_reshape`` (Flux) and out with ``skip_output_reshape``."""
    if not skip_reshape:
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        while mask.ndim < 4:
            mask = mask.unsqueeze(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


# ---------------------------------------------------------------- workflows


class TinyFluxModelLoader:
    """Test-only stand-in for UNETLoader on Flux files, which stock UNETLoader cannot build this narrow."""
    RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"variant": (list(FLUX_VARIANTS),)}}

    def load(self, variant):
        return (flux_model(variant),)


class TinyFlux2ModelLoader:
    """Test-only stand-in for UNETLoader on Flux.2 files (ComfyUI pins 48 heads: harness.flux2's docstring)."""
    RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        from .flux2 import flux2_model
        return (flux2_model(),)


class TinyZImageModelLoader:
    """Test-only stand-in for UNETLoader on Z-Image files (ComfyUI detects Z-Image only at the real width:
    harness.zimage's docstring)."""
    RETURN_TYPES, FUNCTION, CATEGORY = ("MODEL",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        from .zimage import zimage_model
        return (zimage_model(),)


class TinyDiTTextEncoders:
    """Test-only stand-in for DualCLIPLoader / TripleCLIPLoader and Flux.2's and Z-Image's CLIPLoader, which build the
    full-size text encoders."""
    RETURN_TYPES, FUNCTION, CATEGORY = ("CLIP",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": ([*FAMILY_ENCODERS, "flux2", "zimage"],)}}

    def load(self, family):
        if family == "flux2":
            from .flux2 import flux2_clip
            return (flux2_clip(),)
        if family == "zimage":
            from .zimage import zimage_clip
            return (zimage_clip(),)
        return (flux_clip() if family == "flux" else sd35_clip(),)


class TinyFluxControlNetLoader:
    """Test-only stand-in for ControlNetLoader on Flux ControlNets (same reason as TinyFluxModelLoader)."""
    RETURN_TYPES, FUNCTION, CATEGORY = ("CONTROL_NET",), "load", "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (flux_controlnet(),)


STAND_IN_NODES = {cls.__name__: cls for cls in (TinyFluxModelLoader, TinyFlux2ModelLoader, TinyZImageModelLoader,
                                                  TinyDiTTextEncoders, TinyFluxControlNetLoader)}


@contextlib.contextmanager
def stand_in_nodes():
    """STAND_IN_NODES registered in ComfyUI's node table inside the block (removed after it), to execute
    prompts made by use_tiny_dit_models."""
    mappings = boot_comfy(require_pack=False).nodes.NODE_CLASS_MAPPINGS
    added = {node_id: cls for node_id, cls in STAND_IN_NODES.items() if node_id not in mappings}
    mappings.update(added)
    try:
        yield
    finally:
        for node_id in added:
            mappings.pop(node_id, None)


def family_of(api_prompt: dict) -> str | None:
    """The DiT family ("flux", "flux2", "sd35" or "zimage") of an API prompt, read from its text-encoder loaders as
    ComfyUI reads it (DualCLIPLoader's and CLIPLoader's type; TripleCLIPLoader is SD3's; CLIPLoader "lumina2" is how
    ComfyUI's Z-Image Turbo template loads its Qwen3 4B, and Lumina 2 itself, the type's namesake, is a family the
    pack refuses); None for a prompt of none."""
    families = set()
    for node in api_prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "TripleCLIPLoader" or (kind == "DualCLIPLoader" and inputs.get("type") == "sd3"):
            families.add("sd35")
        elif kind == "DualCLIPLoader" and inputs.get("type") == "flux":
            families.add("flux")
        elif kind == "CLIPLoader" and inputs.get("type") == "flux2":
            families.add("flux2")
        elif kind == "CLIPLoader" and inputs.get("type") == "lumina2":
            families.add("zimage")
    if len(families) > 1:
        raise ValueError(f"a prompt with the text encoders of several DiT families: {sorted(families)}")
    return families.pop() if families else None


def variant_of(family: str, file_name: str) -> str:
    """The tiny variant of ``family`` standing in for the diffusion-model file ``file_name``: the one its name
    spells as the publishers name the files (flux1-fill-dev: "fill", flux1-schnell, sd3.5_medium), else the
    family's first (dev / large)."""
    default, *others = FLUX_VARIANTS if family == "flux" else tuple(SD35_VARIANTS)
    return next((variant for variant in others if variant in file_name.lower()), default)


def use_tiny_dit_models(api_prompt: dict, family: str, variant: str | None = None) -> dict:
    """Point an API prompt of ``family`` ("flux", "flux2", "sd35" or "zimage") at the tiny models, in place: stock
    loaders where they can load them (SD3.5 UNETLoader and CheckpointLoaderSimple, VAELoader, LoRA loaders, the SD3.5
    ControlNetLoader), stand-in nodes where they cannot (Flux, Flux.2 and Z-Image UNETLoader, Flux ControlNetLoader,
    every DiT text-encoder loader); ``variant`` is the model variant (default: the one each loader's file name spells,
    variant_of; Flux.2 and Z-Image have one each, [dev] and Turbo). Execute it inside ``with stand_in_nodes():``."""
    if family == "flux2":
        from . import flux2
    elif family == "zimage":
        from . import zimage
    for node in api_prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader" and family == "flux2":
            node.update(class_type="TinyFlux2ModelLoader", inputs={})
        elif kind == "UNETLoader" and family == "zimage":
            node.update(class_type="TinyZImageModelLoader", inputs={})
        elif kind == "UNETLoader" and family == "flux":
            node.update(class_type="TinyFluxModelLoader",
                        inputs={"variant": variant or variant_of(family, inputs["unet_name"])})
        elif kind == "UNETLoader":
            inputs.update(unet_name=sd35_path(variant or variant_of(family, inputs["unet_name"])).name,
                          weight_dtype="default")
        elif kind == "CheckpointLoaderSimple" and family == "sd35":
            inputs["ckpt_name"] = sd35_checkpoint_path(variant or variant_of(family, inputs["ckpt_name"])).name
        elif kind in ("DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"):
            node.update(class_type="TinyDiTTextEncoders", inputs={"family": family})
        elif kind == "VAELoader":  # Z-Image's latent is Flux.1's: vae_path()
            inputs["vae_name"] = (flux2.flux2_vae_path() if family == "flux2" else vae_path()).name
        elif kind in ("LoraLoaderModelOnly", "LoraLoader"):
            lora = {"flux2": lambda: flux2.flux2_lora_path(), "zimage": lambda: zimage.zimage_lora_path()}.get(
                family, lambda: lora_path(family))
            inputs["lora_name"] = lora().name
        elif kind == "ControlNetLoader" and family == "flux":
            node.update(class_type="TinyFluxControlNetLoader", inputs={})
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = sd35_controlnet_path().name
    return api_prompt


# ---------------------------------------------------------------- lifetime

#: The process-wide caches of each family; release() empties them.
FAMILY_CACHES = {"flux": (flux_model, flux_clip, flux_controlnet), "sd35": (sd35_model, sd35_clip, sd35_controlnet),
                 "vae": (vae,)}


def release(*families: str) -> None:
    """Drop the harness's references to ``families`` ("flux", "sd35", "vae", "flux2": harness.flux2's, "zimage":
    harness.zimage's; all but "flux2" and "zimage" when none given) and collect, so their memory is freed once the
    tests hold none either."""
    for family in families or tuple(FAMILY_CACHES):
        if family == "flux2":
            from . import flux2
            caches = (flux2.flux2_model, flux2.flux2_clip, flux2.flux2_vae)
        elif family == "zimage":
            from . import zimage
            caches = (zimage.zimage_model, zimage.zimage_clip)
        else:
            caches = FAMILY_CACHES[family]
        for cached in caches:
            cached.cache_clear()
    gc.collect()
    if "comfy.model_management" in sys.modules:  # booted: drop ComfyUI's entries for the freed models
        sys.modules["comfy.model_management"].cleanup_models()
    trim_heap()
