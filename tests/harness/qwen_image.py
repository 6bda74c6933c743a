"""A tiny random-weight Qwen-Image (``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel`` inside
``comfy.model_base.QwenImage``, config ``comfy.supported_models.QwenImage``), its Qwen2.5-VL 7B text encoder and its
Wan 2.1 VAE, built with ComfyUI's own classes and key names and read back by ComfyUI's own detection, as
harness.zimage builds Z-Image.

Reduced config ``QWEN_IMAGE_DIT``, and why each number:
  num_attention_heads 2, attention_head_dim 128: the head dim must stay 128 = sum(axes_dims_rope [16, 56, 56]),
    Qwen-Image's RoPE split over its three position axes (frame/reference index, row, column; text tokens get the
    same index on all three); 2 heads so that per-head code paths run (real: 24 heads, 3072 wide).
  num_layers 2 ``transformer_blocks`` (real 60): two, so a block selection that names the first or the last differs
    from "all".
  joint_attention_dim 64: the width of the tiny text encoder's hidden states (real: Qwen2.5-VL 7B's 3584).
  in_channels 64, patch_size 2, out_channels 16: the real values (the Wan 2.1 VAE's 16-channel latent at 1/8, its
    2 x 2 patches packed into 64 channels: one token per 16 x 16 pixels).
  What stays smaller than the real model without a field of its own: the timestep embedder and the modulations
    follow the width (256).
  Why the detection is completed: ComfyUI's detection (model_detection.py, ``txt_norm.weight``) reads only the input
    channels and the block count from a Qwen-Image file; the heads (24), their dim (128) and the text width (3584)
    are the model class's defaults, so only a 3072-wide file with a 3584-wide text input builds through UNETLoader
    (one real block alone has 340M parameters). So the file has the real key names, ComfyUI's detection reads it
    back (class QwenImage, input channels, block count) and the harness supplies the heads (``img_in``'s rows / 128)
    and the text width (``txt_in``'s columns), as harness.zimage does for Z-Image's width.
Text encoder: what ``CLIPLoader`` type "qwen_image" builds for a Qwen2.5-VL 7B file: ComfyUI's QwenImageTokenizer (the
  Qwen2.5 tokenizer files ComfyUI ships and its system-prompt template
  ``<|im_start|>system\\nDescribe the image ...<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>
  assistant\\n``) and QwenImageTEModel (the last layer's hidden states, final norm included), reduced through ComfyUI's
  own ``qwen25_7b_model_config`` option by ``QWEN25_7B_REDUCED``: width 64 (real 3584), MLP 128, 2 query heads sharing
  1 key/value head (grouped-query attention, as the real 28 over 4), 2 layers (real 28). The head dim stays 128:
  ComfyUI's Qwen25_7BVLI_Config fixes it (a class attribute). The real vocabulary stays (152064 x 64), so every id
  of the real tokenizer exists. QwenImageTEModel drops the template's system prompt and ``<|im_start|>user\\n``
  from the conditioning (everything before the prompt), and keeps the prompt's tokens and the template's closing
  ``<|im_end|>\\n<|im_start|>assistant\\n`` (the tests' 8-word prompt: 34 tokens dropped, 8 + 5 kept).
  The vision tower: ComfyUI's Qwen25_7BVLI builds Qwen2.5-VL's vision transformer at its fixed real size (1280
  wide, 32 blocks, 658M parameters: ``qwen_vl.Qwen2VLVisionTransformer(hidden_size=1280, ...)`` takes no option;
  only its merger's output follows the reduced width) and runs it only for prompts with images (Qwen-Image Edit's
  TextEncodeQwenImageEdit). The harness leaves those weights as ComfyUI creates them, ``torch.empty`` (its
  manual_cast layers skip initialisation) and never written: the allocator maps them lazily, so the 1.3 GB of fp16
  are address space, not memory, and building the encoder takes a fraction of a second (measured: 0.3 s, +80 MB
  resident). Only a copy writes them: the trainers' TrainableTextEncoder deep-copies the encoder (+1.3 GB resident
  and ~2 s per copy; the test process peaks at ~2.5 GiB). No ComfyUI option reduces the tower (its sizes are
  constructor defaults Qwen25_7BVLI does not pass on), and moving it to the meta device breaks ComfyUI's model
  manager, which moves the whole encoder when it unloads it. No test here encodes an image.
  Weights of the language model: normal(0, 0.02), norms at identity (harness.dit.randomize_), from a fixed seed.
Weights of the DiT: harness.dit.randomize_ with the fan-in scale, as the Flux harness (its docstring says why).
Sequence the blocks get: the text stream (the kept conditioning through ``txt_norm`` and ``txt_in``) and the image
  stream (the latent's 2 x 2 patches through ``img_in``) side by side; the joint attention runs over
  ``[text | image]`` (text first), both with rotary positions: text token i at (s + i, s + i, s + i), s = half the
  larger side of the patch grid, image patches at (0, row - h/2, column - w/2) (Flux's rotation matrices,
  ``pe_embedder``). No attention mask (the encoder's mask is all ones and ComfyUI drops it).
VAE (``qwen_image_vae_path``): the file stock VAELoader recognises as the Wan 2.1 VAE (``decoder.middle.0.residual.0.
  gamma`` without Wan 2.2's keys), which Qwen-Image uses; ComfyUI reads its base width from ``decoder.head.0.gamma``,
  so the file is 8 wide (real 96): the 16-channel latent at 1/8 of the image, one frame for a picture (causal 3D
  convolutions). Weights normal(0, 0.02), norms at identity, from a fixed seed.
LoRA (``qwen_image_lora_path``): rank 4 on the q/k/v projections of both streams of every block, in the names
  ComfyUI's LoRA key map gives Qwen-Image (``transformer.transformer_blocks.N.attn.to_q`` ...: the module paths under
  ``transformer.``), ``lora_A``/``lora_B``.
Sampling: the Wan 2.1 latent (latent_formats.Wan21, 16 channels, 3 latent dimensions: ComfyUI's sampler makes stock
  EmptySD3LatentImage's [B, 16, H/8, W/8] a one-frame video [B, 16, 1, H/8, W/8], as it does in ComfyUI's Qwen-Image
  template), FLOW model sampling with ComfyUI's Qwen-Image shift 1.15, CFG 2.5 with the empty prompt as the
  negative, as ComfyUI's Qwen-Image template samples.
"""
from __future__ import annotations

from pathlib import Path

from .checkpoints import _cached, encode_prompt
from .comfy_env import boot_comfy
from .dit import (TinyFamily, _fp16, _load, _model_patcher, _name, built_and_read_back, comfy_detection, peft_lora,
                  randomize_)
from .memory import model_cache

#: ComfyUI's Qwen25_7BVLI_Config fields the tiny text encoder changes (the vocabulary is the real tokenizer's)
QWEN25_7B_REDUCED = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1)
#: the head dim of Qwen-Image's blocks: sum(axes_dims_rope), the model class's default
QWEN_IMAGE_HEAD_DIM = 128

QWEN_IMAGE_DIT = dict(image_model="qwen_image", in_channels=64, num_layers=2, num_attention_heads=2,
                      joint_attention_dim=QWEN25_7B_REDUCED["hidden_size"])
#: the base width of the tiny Wan 2.1 VAE (real 96)
WAN21_VAE_DIM = 8
#: LoRA rank of qwen_image_lora_path
QWEN_IMAGE_LORA_RANK = 4
#: ComfyUI's Qwen-Image template's CFG
QWEN_IMAGE_CFG = 2.5


def _detected_qwen_image_config(sd: dict):
    """ComfyUI's own detection of a Qwen-Image state dict, completed with the heads and the text width (see the
    docstring)."""
    config = comfy_detection(sd, "QwenImage", "Qwen-Image")
    unet = config.unet_config
    unet["num_attention_heads"] = sd["img_in.weight"].shape[0] // QWEN_IMAGE_HEAD_DIM
    unet["joint_attention_dim"] = sd["txt_in.weight"].shape[1]
    return config


def _build_qwen_image() -> dict:
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return built_and_read_back(QwenImageTransformer2DModel(**QWEN_IMAGE_DIT, operations=comfy.ops.disable_weight_init),
                               QWEN_IMAGE_DIT, 100, _detected_qwen_image_config, "Qwen-Image")


def qwen_image_path() -> Path:
    """The tiny Qwen-Image with the real key names (a diffusion-model file, fp16)."""
    return _cached("tiny_dit", _name("qwen_image"), _build_qwen_image)


@model_cache
def qwen_image_model():
    """ModelPatcher of the tiny Qwen-Image (comfy.model_base.QwenImage with supported_models.QwenImage's config: FLOW
    model sampling with shift 1.15). Once per process until released: clone() before patching."""
    boot_comfy(require_pack=False)
    sd = _load(qwen_image_path())
    return _model_patcher(_detected_qwen_image_config(sd), sd)


@model_cache
def qwen_image_clip():
    """CLIP of Qwen-Image: ComfyUI's QwenImageTokenizer and QwenImageTEModel (Qwen2.5-VL 7B), reduced (module
    docstring); encodes a prompt into [1, tokens, 64], the template's system prompt dropped. Once per process until
    released: clone() before changing it."""
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image as qwen_image

    target = comfy.supported_models_base.ClipTarget(qwen_image.QwenImageTokenizer, qwen_image.te())
    clip = comfy.sd.CLIP(target, model_options={"qwen25_7b_model_config": QWEN25_7B_REDUCED})
    randomize_(clip.cond_stage_model.qwen25_7b.transformer.model, seed=101)  # the language model, not the vision tower
    return clip


def _build_wan21_vae() -> dict:
    from comfy.ldm.wan.vae import WanVAE

    # ComfyUI's comfy.sd.VAE builds a Wan 2.1 file with these options and the file's base width
    vae = WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    return _fp16(randomize_(vae, seed=102).state_dict())


def qwen_image_vae_path() -> Path:
    """The tiny Wan 2.1 VAE (module docstring) in models/vae."""
    boot_comfy(require_pack=False)
    return _cached("vae", _name("wan21_vae"), _build_wan21_vae)


@model_cache
def qwen_image_vae():
    """VAE from stock VAELoader on the tiny Wan 2.1 VAE. Once per process until released."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.VAELoader().load_vae(qwen_image_vae_path().name)[0]


def _build_qwen_image_lora(rank: int = QWEN_IMAGE_LORA_RANK) -> dict:
    """Rank-4 LoRA on the q/k/v of both streams of every block (module docstring)."""
    return peft_lora([f"transformer.transformer_blocks.{block}.attn.{projection}"
                      for block in range(QWEN_IMAGE_DIT["num_layers"])
                      for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")],
                     QWEN_IMAGE_DIT["num_attention_heads"] * QWEN_IMAGE_HEAD_DIM, rank, seed=103)


def qwen_image_lora_path() -> Path:
    """The tiny Qwen-Image's LoRA (_build_qwen_image_lora) in models/loras."""
    boot_comfy(require_pack=False)
    return _cached("loras", _name("qwen_image_lora"), _build_qwen_image_lora)


def _build_qwen_image_controlnet() -> dict:
    import comfy.ops
    from comfy.ldm.qwen_image.controlnet import QwenImageControlNetModel

    net = QwenImageControlNetModel(**QWEN_IMAGE_DIT, operations=comfy.ops.disable_weight_init)
    return _fp16(randomize_(net, seed=104, std=None).state_dict())


def qwen_image_controlnet_path() -> Path:
    """A tiny InstantX-layout Qwen-Image ControlNet (the model's blocks, ``controlnet_blocks``,
    ``controlnet_x_embedder``, fp16); kept out of models/controlnet: ControlNetLoader's detection pins the real
    heads and text width as UNETLoader's does."""
    return _cached("tiny_dit", _name("qwen_image_controlnet"), _build_qwen_image_controlnet)


@model_cache
def qwen_image_controlnet():
    """CONTROL_NET of the tiny Qwen-Image ControlNet: comfy.controlnet.load_controlnet_qwen_instantx's body (ComfyUI's
    controlnet_config, QwenImageControlNetModel, ControlNet on the Wan 2.1 latent), the heads and text width supplied
    as for the model. Apply with stock ControlNetApplyAdvanced and the VAE (the hint is encoded to a latent)."""
    boot_comfy(require_pack=False)
    import comfy.controlnet
    import comfy.latent_formats
    from comfy.ldm.qwen_image.controlnet import QwenImageControlNetModel

    sd = _load(qwen_image_controlnet_path())
    model_config, operations, load_device, unet_dtype, manual_cast_dtype, offload_device = \
        comfy.controlnet.controlnet_config(sd)
    completed = _detected_qwen_image_config(sd).unet_config
    net = QwenImageControlNetModel(operations=operations, device=offload_device, dtype=unet_dtype,
                                   **{**model_config.unet_config, **completed})
    net = comfy.controlnet.controlnet_load_state_dict(net, sd)
    return comfy.controlnet.ControlNet(net, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(),
                                      load_device=load_device, manual_cast_dtype=manual_cast_dtype, extra_conds=[])


class TinyQwenImage(TinyFamily):
    """The tiny Qwen-Image as the family tests use it (harness.dit.TinyFamily's sample: stock EmptySD3LatentImage,
    16 channels at 1/8), sampled at ComfyUI's template CFG 2.5, prompts through stock CLIPTextEncode."""

    def __init__(self):
        self.name = "qwen_image"
        self.model = qwen_image_model()
        self.clip = qwen_image_clip()
        self.cfg = QWEN_IMAGE_CFG

    def encode(self, text: str) -> list:
        """``text`` through stock CLIPTextEncode."""
        return encode_prompt(self.clip, text)
