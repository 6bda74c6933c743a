"""A tiny random-weight Flux.2 [dev] (``comfy.ldm.flux.model.Flux`` with Flux.2's options inside
``comfy.model_base.Flux2``, config ``comfy.supported_models.Flux2``) and its Mistral 3 text encoder, built with
ComfyUI's own classes and key names and recognised as Flux.2 by ComfyUI's own detection, as harness.dit builds
Flux and harness.chroma Chroma.

Reduced config ``FLUX2_DIT``, and why each number:
  hidden_size 256, num_heads 2: the head dim must stay 128 = sum(axes_dim [32, 32, 32, 32]), Flux.2's RoPE
    split over its four position axes (time/reference index, row, column, text index); 2 heads so that per-head
    code paths run (real: 6144 wide, 48 heads).
  depth 2 double + 2 single blocks (real: 8 + 48): two of each kind, as harness.dit's Flux.
  in/out channels 128, patch_size 1: the real values. Flux.2's VAE has 32 channels at 1/8 of the image, and
    ComfyUI samples them packed 2 x 2 into 128 channels at 1/16 (EmptyFlux2LatentImage: [B, 128, H/16, W/16],
    latent_formats.Flux2), so the model patchifies no further: one token per latent pixel.
  context_in_dim 192 = 3 x 64: Flux2TEModel stacks three hidden states of the text encoder per token (real:
    3 x 5120), and the tiny encoder is 64 wide.
  mlp_ratio 3 (SwiGLU: mlp_silu_act), theta 2000, global_modulation (one shared modulation per stream instead of
    one per block), no qkv or other biases (ops_bias False), index-placed references at scale 10, no pooled
    vector (vec_in_dim None): the real values, exactly what ComfyUI's detection sets for a Flux.2 file.
  guidance_embed: Flux.2 [dev] is guidance-distilled: it has ``guidance_in``, which FluxGuidance feeds.
  Why the detection is completed: ComfyUI's detection pins num_heads 48 for Flux.2 (model_detection.py) and
    reads the width from ``img_in``, so only a 6144-wide file builds through UNETLoader, and one 6144-wide double
    block alone has 981M parameters. So the file has the real key names, ComfyUI's detection reads it back
    (class Flux2, depths, widths, guidance) and the harness supplies only the heads (width / 128).
Text encoder: what ``CLIPLoader`` type "flux2" builds for a Mistral 3 Small file pruned to the layers Flux.2
  reads (``flux2_te(pruned=True)``: 30 layers, no final norm), with ComfyUI's Flux2Tokenizer (its system-prompt
  template) and Flux2TEModel (the hidden states entering layers 10, 20 and 30 stacked per token), reduced through
  ComfyUI's own ``mistral3_24b_model_config`` option by ``MISTRAL3_REDUCED``: width 64 (real 5120), MLP 128,
  2 query heads sharing 1 key/value head (grouped-query attention, as the real 32 over 8), the tiny tokenizer's
  vocabulary. The 30 layers stay: ComfyUI's fixed layer choice [10, 20, 30] needs them, and at width 64 the whole
  encoder has 2.2M parameters. The head dim stays 128: ComfyUI's Mistral3Small24BConfig fixes it (a class
  attribute, not a field its options can set).
  Weights: normal(0, 0.02), norms at identity (harness.dit.randomize_, as harness.dit's text encoders), built in
  memory from a fixed seed.
Tokenizer: Mistral's "tekken" vocabulary as ComfyUI reads it from ``tokenizer_data["tekken_model"]`` (a uint8
  tensor of the JSON, as a text-encoder file stores it), built by :func:`tekken_json` (no download is possible):
  Mistral's 20 control tokens at their real ranks (``<unk>`` 0, ``<s>`` 1, ``[INST]`` 3, ``<pad>`` 11,
  ``[SYSTEM_PROMPT]`` 17, ...; the real file pads them to 1000 with ``<SPECIAL_n>``), then the 256 single bytes,
  then every prefix of the words of ``TEST_WORDS`` (with and without a leading space) and of Flux2Tokenizer's
  system prompt, each prefix one byte longer than one ranked before it. Tekken is a byte-level BPE whose merges are
  derived from the ranks (a token merges from any two ranked halves), so a prefix-closed vocabulary makes each of
  those words one token and spells any other text in smaller pieces, down to bytes. Token ids are the 20 control
  tokens, then 20 + rank.
  Why the harness converts it: ComfyUI 0.3.75's ``load_mistral_tokenizer`` calls transformers'
  ``MistralConverter(vocab=...)``, which transformers 5.15 replaced by ``MistralConverter(vocab_file)`` (later
  ComfyUI versions convert tekken themselves), and on transformers 5 its ``LlamaTokenizerFast`` wrapper puts no
  ``<s>`` first, where ComfyUI reads its start token (SDTokenizer: ``tokenizer('')[0]``). So the harness builds
  the tokenizer ComfyUI's code builds on transformers 4 (MistralConverter's split pattern, byte-level BPE, control
  tokens matched whole, ``<s>`` first) and hands it to a Mistral3Tokenizer with ComfyUI's own arguments through
  ComfyUI's tokenizer-class option (``tokenizer_data["mistral3_24b_tokenizer_class"]``); the template, the padding
  and the encoder are ComfyUI's.
Weights of the DiT: harness.dit.randomize_ with the fan-in scale, as the Flux harness (its docstring says why).
Text reaching the DiT: model_base.Flux2 left-pads every prompt with zero rows to 512 tokens; txt_in has no bias, so
  they enter the first block as zeros (its LayerNorm keeps them 0, its modulation makes each the same shift), and
  the encoder's attention mask is dropped (Flux's extra_conds keeps a mask only with attention_mask_img_shape), so
  the image attends to the padding. A whole different prompt moves a 2-step sample by ~0.3%, one word by ~0.02%.
VAE (``flux2_vae``): the file stock VAELoader recognises as Flux.2's autoencoder, not reduced. ComfyUI's comfy.sd.VAE
  fixes the widths of this autoencoder (the Flux.1 ae's ch 128, ch_mult 1 2 4 4, 2 res blocks per level:
  harness.dit.FLUX_SD3_VAE_DDCONFIG) and reads only the latent width from the file (``decoder.conv_in``): z 32, the
  real Flux.2 value (Flux.1: 16). What makes it Flux.2's is ``bn.running_mean``: ComfyUI then builds its
  AutoencoderKL with ``batch_norm_latent``, which packs the 32 channels at 1/8 of the image 2 x 2 into 128 at 1/16
  and normalises them with the file's BatchNorm running statistics (no affine part), the latent Flux.2 samples
  (latent_formats.Flux2: 128 channels). Flux.2's ae also has the 1 x 1 quant convs the Flux.1 ae dropped: ComfyUI
  takes that path (AutoencoderKL, not AutoencodingEngine, which has no BatchNorm) only when the file has
  ``post_quant_conv``, so the file holds them in the real layout (``encoder.quant_conv``,
  ``decoder.post_quant_conv``, which ComfyUI renames). 84M parameters (as the Flux one; the wider latent adds
  0.2M), 168 MB in fp16, 336 MB in fp32 on CPU. Weights normal(0, 0.02), norms at identity (harness.dit.randomize_,
  as dit's VAE), running means normal(0, 0.1) and variances uniform in [0.5, 1.5] from a fixed seed, so that the
  decoder's un-normalisation reads values a missing key would not give.
LoRA (``flux2_lora_path``): rank 4 on every attention projection, in the diffusers/PEFT names
  (``transformer.transformer_blocks.N.attn.to_q`` ..., ``transformer.single_transformer_blocks.N.attn.to_q`` ...,
  ``lora_A``/``lora_B``) that ComfyUI's LoRA key map gives a Flux.2 model: model_base.Flux2 is a model_base.Flux, so
  comfy.lora.model_lora_keys_unet maps them through comfy.utils.flux_to_diffusers onto slices of the fused weights
  (q, k, v of ``img_attn.qkv`` / ``txt_attn.qkv`` of the double blocks, the first 3 x 256 rows of the single
  blocks' ``linear1``), the same names and builder as harness.dit's Flux LoRA. The q/k/v slices hold for Flux.2
  (linear1 starts with q, k, v whatever the MLP width); flux_to_diffusers' ``proj_mlp`` slice (4 x hidden, Flux.1's
  MLP) does not, and the LoRA leaves the MLP alone. Diffusers' own Flux.2 transformer fuses a single block's input
  projection as ``attn.to_qkv_mlp_proj``, a name ComfyUI 0.3.75's map lacks ("lora key not loaded"); the
  single-block names here are Flux.1's diffusers names, which that map slices onto Flux.2's ``linear1``.
"""
from __future__ import annotations

import base64
import functools
import json
import re
from pathlib import Path

import torch

from .checkpoints import _cached, encode_prompt
from .comfy_env import boot_comfy
from .dit import (FLUX_SD3_VAE_DDCONFIG, NODE_SAMPLING, TinyFamily, _flux_heads, _fp16, _load, _model_patcher,
                  _name, built_and_read_back, comfy_detection, peft_lora, randomize_)
from .memory import model_cache

#: ComfyUI's Mistral3Small24BConfig fields the tiny text encoder changes (the vocabulary size is the tekken file's)
MISTRAL3_REDUCED = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)

FLUX2_DIT = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None,
                 context_in_dim=3 * MISTRAL3_REDUCED["hidden_size"], hidden_size=256, mlp_ratio=3.0, num_heads=2,
                 depth=2, depth_single_blocks=2, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1,
                 qkv_bias=False, guidance_embed=True, global_modulation=True, mlp_silu_act=True, ops_bias=False,
                 default_ref_method="index", ref_index_scale=10.0)
#: what FluxGuidance sets on every prompt of the tiny Flux.2 [dev] (the model's default when none is set)
FLUX2_GUIDANCE = 3.5
#: the autoencoder ComfyUI builds for a Flux.2 ae file (module docstring): the Flux.1 ae with a 32-channel latent
#: normalised by BatchNorm, packed 2 x 2 into 128 channels at 1/16
FLUX2_VAE_DDCONFIG = dict(FLUX_SD3_VAE_DDCONFIG, z_channels=32, batch_norm_latent=True)
#: LoRA rank of flux2_lora_path
FLUX2_LORA_RANK = 4

#: Mistral's control tokens, rank = token id, in the real tekken file's order
MISTRAL_CONTROL_TOKENS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                          "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                          "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[TOOL_CONTENT]")
#: words of the tests' prompts, each one token with and without a leading space
TEST_WORDS = ("photo", "of", "a", "small", "toy", "on", "the", "beach", "dog", "cat", "portrait", "style",
              "painting", "person", "face")
#: the split pattern of transformers' MistralConverter (the one ComfyUI 0.3.75 tokenizes with; tekken's own
#: ``config.pattern`` splits English words the same way)
SPLIT_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# ---------------------------------------------------------------- Flux.2


def _detected_flux2_config(sd: dict):
    """ComfyUI's own detection of a Flux.2 state dict, completed with the head count (see the docstring)."""
    config = comfy_detection(sd, "Flux2", "Flux.2")
    config.unet_config["num_heads"] = _flux_heads(config.unet_config)
    return config


def _build_flux2() -> dict:
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    return built_and_read_back(Flux(**FLUX2_DIT, operations=comfy.ops.disable_weight_init), FLUX2_DIT, 80,
                               _detected_flux2_config, "Flux.2")


def flux2_path() -> Path:
    """The tiny Flux.2 [dev] with the real key names (a diffusion-model file, fp16)."""
    return _cached("tiny_dit", _name("flux2"), _build_flux2)


@model_cache
def flux2_model():
    """ModelPatcher of the tiny Flux.2 [dev] (comfy.model_base.Flux2: FLUX model sampling with shift 2.02, text
    left-padded to 512 tokens). Once per process until released: clone() before patching."""
    boot_comfy(require_pack=False)
    sd = _load(flux2_path())
    return _model_patcher(_detected_flux2_config(sd), sd)


def flux2_latent(batch: int = 1, width: int = 64, height: int = 64) -> dict:
    """LATENT of stock EmptyFlux2LatentImage: [batch, 128, height / 16, width / 16] zeros."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.NODE_CLASS_MAPPINGS["EmptyFlux2LatentImage"].execute(width=width, height=height,
                                                                       batch_size=batch).result[0]


# ---------------------------------------------------------------- VAE, LoRA


def _build_flux2_vae() -> dict:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    vae = randomize_(AutoencoderKL(ddconfig=FLUX2_VAE_DDCONFIG, embed_dim=FLUX2_VAE_DDCONFIG["z_channels"]), seed=82)
    gen = torch.Generator().manual_seed(83)
    channels = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(channels, generator=gen) * 0.1)
    vae.bn.running_var.copy_(torch.rand(channels, generator=gen) + 0.5)
    # the real layout: the quant convs inside encoder and decoder (ComfyUI moves them out when it loads the file)
    renamed = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    sd = {}
    for key, value in vae.state_dict().items():
        prefix = next((p for p in renamed if key.startswith(p)), None)
        sd[renamed[prefix] + key[len(prefix):] if prefix else key] = value
    return _fp16(sd)


def flux2_vae_path() -> Path:
    """Flux.2's autoencoder (32 latent channels, BatchNorm statistics ``bn.*``, quant convs; fp16) in models/vae."""
    boot_comfy(require_pack=False)
    return _cached("vae", _name("flux2_vae"), _build_flux2_vae)


@model_cache
def flux2_vae():
    """VAE of Flux.2 from stock VAELoader: images [B, H, W, 3] <-> latents [B, 128, H / 16, W / 16]. Once per process
    until released."""
    nodes = boot_comfy(require_pack=False).nodes
    return nodes.VAELoader().load_vae(flux2_vae_path().name)[0]


def flux2_lora_targets() -> list[str]:
    """Diffusers names of every attention q/k/v projection of the tiny Flux.2, from ComfyUI's own map
    (comfy.utils.flux_to_diffusers, which comfy.lora uses for Flux.2 models)."""
    import comfy.utils

    keys = comfy.utils.flux_to_diffusers(FLUX2_DIT)
    ends = (".attn.to_q.weight", ".attn.to_k.weight", ".attn.to_v.weight",
            ".attn.add_q_proj.weight", ".attn.add_k_proj.weight", ".attn.add_v_proj.weight")
    return sorted(k[:-len(".weight")] for k in keys if k.endswith(ends))


def _build_flux2_lora() -> dict:
    return peft_lora([f"transformer.{target}" for target in flux2_lora_targets()], FLUX2_DIT["hidden_size"],
                     FLUX2_LORA_RANK, seed=84)


def flux2_lora_path() -> Path:
    """Rank-4 diffusers/PEFT LoRA on every attention q/k/v projection of the tiny Flux.2 (module docstring), in
    models/loras: stock LoraLoaderModelOnly loads every key of it."""
    boot_comfy(require_pack=False)
    return _cached("loras", _name("flux2_lora"), _build_flux2_lora)


# ---------------------------------------------------------------- tokenizer


def _words(text: str) -> list[str]:
    """The pieces ``text`` is tokenized in: the split pattern's, between the control tokens."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    plain = re.split("|".join(map(re.escape, MISTRAL_CONTROL_TOKENS)), text)
    return [piece for part in plain for piece, _ in split.pre_tokenize_str(part)]


def _tekken(words: list[str]) -> dict:
    """A tekken vocabulary: the control tokens, the 256 bytes, then every prefix of ``words`` (module docstring)."""
    ranked = [bytes([b]) for b in range(256)]
    known = set(ranked)
    for word in words:
        spelled = word.encode()
        for end in range(2, len(spelled) + 1):
            if spelled[:end] not in known:
                known.add(spelled[:end])
                ranked.append(spelled[:end])
    return {"config": {"default_vocab_size": len(MISTRAL_CONTROL_TOKENS) + len(ranked)},
            "vocab": [{"rank": rank, "token_bytes": base64.b64encode(token).decode()}
                      for rank, token in enumerate(ranked)],
            "special_tokens": [{"rank": rank, "token_str": token, "is_control": True}
                               for rank, token in enumerate(MISTRAL_CONTROL_TOKENS)]}


def _tokenizer_data(tekken: dict) -> dict:
    """``tokenizer_data`` for comfy.sd.CLIP: the tekken JSON as a text-encoder file holds it, and the harness's
    Mistral3Tokenizer (module docstring)."""
    data = torch.frombuffer(bytearray(json.dumps(tekken).encode()), dtype=torch.uint8)
    return {"tekken_model": data, "mistral3_24b_tokenizer_class": _mistral3_tokenizer_class()}


@functools.cache
def tekken_json() -> dict:
    """The tiny tekken vocabulary: ``TEST_WORDS`` and the words of Flux2Tokenizer's system prompt, read from a
    Flux2Tokenizer over the bytes alone, are single tokens."""
    boot_comfy(require_pack=False)
    import comfy.text_encoders.flux

    template = comfy.text_encoders.flux.Flux2Tokenizer(tokenizer_data=_tokenizer_data(_tekken([]))).llama_template
    return _tekken([spaced for word in TEST_WORDS for spaced in (word, " " + word)] + _words(template.format("")))


def _tokenizer_object(tekken_data: torch.Tensor):
    """The ``tokenizers.Tokenizer`` ComfyUI's load_mistral_tokenizer makes of ``tekken_data`` through transformers
    4's MistralConverter and LlamaTokenizerFast: byte-level BPE with the merges the ranks imply, ids after the
    control tokens, control tokens matched whole, ``<s>`` put first."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tekken = json.loads(tekken_data.numpy().tobytes())
    controls = [token["token_str"] for token in sorted(tekken["special_tokens"], key=lambda t: t["rank"])]
    inner_size = tekken["config"]["default_vocab_size"] - len(controls)
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in tekken["vocab"] if t["rank"] < inner_size}
    to_unicode = bytes_to_unicode()

    def spelled(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    ids = {token: rank for rank, token in enumerate(controls)}
    ids.update({spelled(token): len(controls) + rank for token, rank in ranks.items()})
    merges = sorted((ranks[token], ranks[token[:cut]], ranks[token[cut:]], spelled(token[:cut]), spelled(token[cut:]))
                    for token in ranks for cut in range(1, len(token))
                    if token[:cut] in ranks and token[cut:] in ranks)
    tokenizer = Tokenizer(BPE(ids, [merge[3:] for merge in merges], fuse_unk=False))
    tokenizer.model.ignore_merges = True
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in controls])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", ids["<s>"])])
    return tokenizer


@functools.cache
def _mistral3_tokenizer_class():
    """ComfyUI's Mistral3Tokenizer, its arguments unchanged but the tokenizer object (module docstring)."""
    import comfy.sd1_clip
    import comfy.text_encoders.flux as flux

    class HarnessMistral3Tokenizer(flux.Mistral3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.tekken_data = tokenizer_data["tekken_model"]
            comfy.sd1_clip.SDTokenizer.__init__(
                self, "", pad_with_end=False, embedding_size=5120, embedding_key='mistral3_24b',
                tokenizer_class=flux.MistralTokenizerClass, has_end_token=False, pad_to_max_length=False,
                pad_token=11, max_length=99999999, min_length=1, pad_left=True,
                tokenizer_args={"tokenizer_object": _tokenizer_object(self.tekken_data), "legacy": False},
                tokenizer_data=tokenizer_data)

    return HarnessMistral3Tokenizer


# ---------------------------------------------------------------- text encoder


def text_encoder_options() -> dict:
    """ComfyUI's ``mistral3_24b_model_config`` option reducing the Mistral 3 that Flux2TEModel builds."""
    tekken = tekken_json()
    return {"mistral3_24b_model_config": dict(MISTRAL3_REDUCED, vocab_size=tekken["config"]["default_vocab_size"])}


@model_cache
def flux2_clip():
    """CLIP of Flux.2: ComfyUI's Flux2Tokenizer over the tiny tekken vocabulary and its pruned-layout Flux2TEModel,
    reduced (module docstring); encodes a prompt into [1, tokens, 192]. Once per process until released: clone()
    before changing it."""
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux

    target = comfy.supported_models_base.ClipTarget(flux.Flux2Tokenizer, flux.flux2_te(pruned=True))
    clip = comfy.sd.CLIP(target, tokenizer_data=_tokenizer_data(tekken_json()), model_options=text_encoder_options())
    randomize_(clip.cond_stage_model.mistral3_24b.transformer, seed=81)
    return clip


# ---------------------------------------------------------------- family


class TinyFlux2(TinyFamily):
    """The tiny Flux.2 [dev] as the family tests use it: sampled at CFG 1 (guidance-distilled) with every prompt
    through FluxGuidance 3.5, as Flux.2 [dev] workflows wire it, on Flux.2's 128-channel latent."""

    def __init__(self):
        self.name = "flux2"
        self.model = flux2_model()
        self.clip = flux2_clip()
        self.cfg = 1.0

    def encode(self, text: str) -> list:
        """``text`` through stock CLIPTextEncode and FluxGuidance."""
        nodes = boot_comfy(require_pack=False).nodes
        return nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(encode_prompt(self.clip, text),
                                                                 FLUX2_GUIDANCE).result[0]

    def sample(self, model, batch: int = 2, cfg: float | None = None, positive=None, negative=None) -> torch.Tensor:
        """``batch`` latents of ``model`` (64 x 64 px, seed 3, harness.dit.NODE_SAMPLING) at CFG 1 unless ``cfg``."""
        from .checkpoints import sample
        return sample(model, positive or self.encode(self.prompt), negative or self.encode(""), flux2_latent(batch),
                      seed=3, cfg=self.cfg if cfg is None else cfg, **NODE_SAMPLING)
