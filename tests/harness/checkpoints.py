"""Tiny random-weight models with the REAL SD1.5 / SD2 / SDXL layouts, built with ComfyUI's own classes.

Why random weights: no model can be downloaded here and real ones are too big for CPU tests. The layouts
are the real ones so that stock loaders (CheckpointLoaderSimple, ControlNetLoader, LoraLoader) detect
and load them through their normal code paths, and our patches see real block names and shapes.

Files are built once per cache dir (see comfy_env.cache_dir) and keyed by HARNESS_VERSION in the file
name: bump it whenever a builder changes so stale files are not reused. Writes are atomic (temp + rename)
so parallel sessions never read half a file, and every tensor is checked finite before it is written.

Weights: normal(0, 0.02) from a fixed seed, except normalization layers, which keep torch's init
(weight 1, bias 0) so activations stay O(1) and attention logits are not all ~0.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .comfy_env import boot_comfy, models_dir
from .memory import model_cache

HARNESS_VERSION = "v1"
SD15_CHECKPOINT = f"tiny_sd15_{HARNESS_VERSION}.safetensors"
SD15_CONTROLNET = f"tiny_sd15_controlnet_{HARNESS_VERSION}.safetensors"
SD15_LORA = f"tiny_sd15_lora_{HARNESS_VERSION}.safetensors"

# What comfy.model_detection reads back from the saved weights (levels, res blocks and transformer depths
# come from the keys); SD15 matches on context_dim 768 + model_channels 320, so those stay full size.
SD15_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2],
    num_res_blocks=[1, 1], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, adm_in_channels=None,
    use_spatial_transformer=True, legacy=False, use_checkpoint=False,
    use_temporal_resblock=False, use_temporal_attention=False,
)
# SDXL's detection pins transformer depth 10 and CLIP-G, far too big for CPU, so the SDXL model is built
# directly from comfy.supported_models.SDXL with this reduced config (level 0 without attention and depth
# 2 below, like the real one; ADM of the real size: pooled 1280 + 6 size embeddings of 256).
SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2],
    num_res_blocks=[1, 1], transformer_depth=[0, 2], transformer_depth_output=[0, 0, 2, 2],
    transformer_depth_middle=2, context_dim=2048, use_linear_in_transformer=True,
    adm_in_channels=2816, num_classes="sequential",
    use_spatial_transformer=True, legacy=False, use_checkpoint=False,
    use_temporal_resblock=False, use_temporal_attention=False,
)
# SD2 (512-base / 512-inpainting) as ComfyUI's SD20 class builds it: context 1024 (OpenCLIP ViT-H), linear
# transformer projections, heads of 64 channels (SD20's unet_extra_config) and fp32 attention; reduced like
# SD15_UNET. Built in memory like SDXL (its CLIP-H text encoder is too big for CPU tests).
SD2_UNET = dict(SD15_UNET, context_dim=1024, use_linear_in_transformer=True)
#: ComfyUI's model config class and the reduced U-Net of each family built in memory (model_patcher).
IN_MEMORY_FAMILIES = {"sd2": ("SD20", SD2_UNET), "sdxl": ("SDXL", SDXL_UNET)}
# ComfyUI fixes the SD1.x VAE architecture (comfy/sd.py VAE default ddconfig), so it cannot shrink.
SD_VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                   'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                   'dropout': 0.0}


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter with normal(0, std) from `seed`; norm layers get weight 1, bias 0."""
    gen = torch.Generator().manual_seed(seed)
    norm_params = set()
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                norm_params.add(id(m.weight))
            if m.bias is not None:
                m.bias.zero_()
                norm_params.add(id(m.bias))
    for p in module.parameters():
        if id(p) not in norm_params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return module


def non_finite(tensors) -> list[str]:
    """The names of the floating tensors of ``tensors`` ((name, tensor) pairs, e.g. a state dict's items())
    holding inf or NaN."""
    # The largest magnitude is inf or NaN exactly when some element is (amax propagates NaN); on the CPU it is
    # 3x faster than isfinite on half-precision tensors, seconds per checkpoint.
    return [name for name, tensor in tensors
            if tensor.is_floating_point() and tensor.numel() and not tensor.abs().amax().isfinite()]


def require_finite(state_dict: dict, what: str) -> dict:
    """``state_dict``, checked before it is written to the cache: a tensor holding inf or NaN (memory a builder
    left uninitialised, a bad init) raises here rather than reaching every later test run."""
    bad = non_finite(state_dict.items())
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} tensors hold inf or NaN, e.g. {bad[:5]}")
    return state_dict


def _cached(folder: str, name: str, build) -> Path:
    """Return <cache>/models/<folder>/<name>, calling build() -> state dict to write it if missing."""
    path = models_dir() / folder / name
    if not path.exists():
        import comfy.utils
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = require_finite({k: v.contiguous() for k, v in build().items()}, name)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        comfy.utils.save_torch_file(sd, str(tmp), metadata={"personalization_tests": HARNESS_VERSION})
        os.replace(tmp, path)
        boot_comfy(require_pack=False).folder_paths.filename_list_cache.clear()
    return path


def sd15_model_config():
    """ComfyUI's SD15 model config for the tiny UNet (adds SD15's num_heads=8 like the loader does)."""
    boot_comfy(require_pack=False)
    import comfy.supported_models
    return comfy.supported_models.SD15(dict(SD15_UNET))


def _fp16(sd: dict, prefix: str = "") -> dict:
    return {prefix + k: v.to(torch.float16) if v.is_floating_point() else v for k, v in sd.items()}


def _build_sd15() -> dict:
    import comfy.model_detection
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = sd15_model_config()
    unet = randomize_(UNetModel(**config.unet_config, operations=comfy.ops.disable_weight_init), seed=0)
    sd = _fp16(unet.state_dict(), "model.diffusion_model.")
    del unet
    clip = randomize_(comfy.sd1_clip.SD1ClipModel(), seed=1)
    sd.update(_fp16(config.process_clip_state_dict_for_saving(clip.state_dict())))  # -> cond_stage_model.
    del clip
    vae = randomize_(AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4), seed=2)
    sd.update(_fp16(config.process_vae_state_dict_for_saving(vae.state_dict())))  # -> first_stage_model.
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected) is not comfy.supported_models.SD15:
        raise RuntimeError(f"tiny SD1.5 layout detected as {type(detected).__name__}, not SD15")
    return sd


def sd15_checkpoint_path() -> Path:
    """Random SD1.5-layout checkpoint (UNet + full CLIP-L + VAE, fp16) in models/checkpoints."""
    return _cached("checkpoints", SD15_CHECKPOINT, _build_sd15)


def _build_sd15_controlnet() -> dict:
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in sd15_model_config().unet_config.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, operations=comfy.ops.disable_weight_init)
    return _fp16(randomize_(net, seed=3).state_dict(), "control_model.")  # original lllyasviel layout


def sd15_controlnet_path() -> Path:
    """Random SD1.5 ControlNet (control_model.* layout, hint 3 channels) in models/controlnet."""
    return _cached("controlnet", SD15_CONTROLNET, _build_sd15_controlnet)


def _build_sd15_lora(rank: int = 4) -> dict:
    import comfy.utils
    from safetensors import safe_open

    with safe_open(str(sd15_checkpoint_path()), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    gen = torch.Generator().manual_seed(4)
    sd = {}
    for diffusers_key, ldm_key in sorted(comfy.utils.unet_to_diffusers(SD15_UNET).items()):
        if not diffusers_key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight")):
            continue
        out_dim, in_dim = shapes["model.diffusion_model." + ldm_key]
        name = "lora_unet_" + diffusers_key[:-len(".weight")].replace(".", "_")  # kohya naming
        sd[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return _fp16(sd)


def sd15_lora_path() -> Path:
    """Random rank-4 kohya LoRA on every attn1/attn2 to_q/to_k/to_v of the tiny UNet, in models/loras."""
    return _cached("loras", SD15_LORA, _build_sd15_lora)


@model_cache
def model_patcher(family: str = "sdxl", in_channels: int = 4):
    """ModelPatcher around ComfyUI's own model class of ``family`` ("sdxl": comfy.model_base.SDXL, "sd2":
    the BaseModel of comfy.supported_models.SD20) with its reduced U-Net and random weights (built in memory,
    once per process: clone() it before patching). ``in_channels=9`` is the inpainting layout (noisy latent
    4 + mask 1 + masked-image latent 4, like SD2-inpainting and diffusers' SDXL inpainting 0.1), which
    ComfyUI's config turns into an inpainting model (``set_inpaint``) exactly as its checkpoint loader does."""
    boot_comfy(require_pack=False)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config_class, unet_config = IN_MEMORY_FAMILIES[family]
    config = getattr(comfy.supported_models, config_class)(dict(unet_config, in_channels=in_channels))
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(supported_dtypes=config.supported_inference_dtypes)  # as load_state_dict_guess_config
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model({})
    randomize_(model.diffusion_model, seed=5)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=mm.unet_offload_device())


def conditioning(family: str = "sdxl", batch: int = 1, seed: int = 0, width: int = 64, height: int = 64,
                 tokens: int = 77) -> list:
    """CONDITIONING of the real shapes of ``family``'s text encoders, random from ``seed``: "sd2" context
    [B,tokens,1024] (OpenCLIP ViT-H); "sdxl" context [B,tokens,2048] and pooled_output [B,1280] (CLIP-L +
    CLIP-G) plus the size keys SDXL's ADM reads."""
    gen = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, IN_MEMORY_FAMILIES[family][1]["context_dim"], generator=gen)
    if family == "sd2":
        return [[context, {}]]
    pooled = torch.randn(batch, 1280, generator=gen)
    return [[context, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0,
                       "crop_h": 0, "target_width": width, "target_height": height}]]


def sdxl_conditioning(batch: int = 1, seed: int = 0, width: int = 64, height: int = 64, tokens: int = 77) -> list:
    """``conditioning("sdxl", ...)``: standing in for CLIP-L + CLIP-G output."""
    return conditioning("sdxl", batch, seed, width, height, tokens)


def empty_latent(batch: int = 1, width: int = 64, height: int = 64) -> dict:
    """LATENT from stock EmptyLatentImage (4 channels, 1/8 size)."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.EmptyLatentImage().generate(width, height, batch)[0]


def sample(model, positive, negative, latent, seed: int = 0, steps: int = 4, cfg: float = 7.0,
           sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0) -> torch.Tensor:
    """Run stock KSampler (nodes.common_ksampler) and return the output latent tensor.
    `latent` is a LATENT dict or a bare [B,4,h,w] tensor."""
    nodes = boot_comfy(require_pack=False).nodes
    if isinstance(latent, torch.Tensor):
        latent = {"samples": latent}
    out = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                latent, denoise=denoise)
    return out[0]["samples"]


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING from stock CLIPTextEncode."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def load_sd15():
    """(model, clip, vae) from stock CheckpointLoaderSimple on the tiny SD1.5 checkpoint."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint_path().name)[:3]
