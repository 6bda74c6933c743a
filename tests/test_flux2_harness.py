"""The tiny Flux.2 [dev] of tests/harness/flux2.py in the real ComfyUI: ComfyUI's detection makes the file a Flux.2
with two blocks of each kind, ComfyUI's Flux2Tokenizer templates a prompt over the tiny tekken vocabulary (test
words one token each) and Flux2TEModel stacks three layers per token, ComfyUI's sampler runs it on Flux.2's latent
with FluxGuidance, and the text reaching the diffusion model is left-padded with zeros to 512 tokens. Stock VAELoader
loads the Flux.2 autoencoder file as Flux.2's (128 channels at 1/16) and stock LoraLoaderModelOnly every key of the
Flux.2 LoRA (tests/test_harness_files.py builds the DiT and VAE files again in NaN-poisoned memory)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from harness import flux2
from harness.checkpoints import encode_prompt
from harness.tensors import relative_change

PROMPT = "photo of a small toy on the beach"


@pytest.fixture(scope="module")
def family(stock_comfy):
    tiny = flux2.TinyFlux2()
    tiny.prompt = PROMPT
    return tiny


def test_comfys_detection_makes_it_a_flux2_with_two_blocks_of_each_kind(family):
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(flux2.flux2_path()))
    detected = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(detected) is comfy.supported_models.Flux2
    assert detected.unet_config["num_heads"] == 48, "ComfyUI pins Flux.2's heads: why the harness completes it"
    assert {k: detected.unet_config[k] for k in ("depth", "depth_single_blocks", "hidden_size", "context_in_dim",
                                                 "in_channels", "guidance_embed")} == \
        dict(depth=2, depth_single_blocks=2, hidden_size=256, context_in_dim=192, in_channels=128, guidance_embed=True)
    assert "txt_in.bias" not in sd and "img_in.bias" not in sd, "Flux.2 has no biases (ops_bias False)"

    model = family.model.model
    assert type(model) is comfy.model_base.Flux2 and type(model.model_config) is comfy.supported_models.Flux2
    net = model.diffusion_model
    assert (len(net.double_blocks), len(net.single_blocks), net.num_heads) == (2, 2, 2)


def test_the_tokenizer_templates_the_prompt_and_the_encoder_stacks_three_layers(family):
    import comfy.text_encoders.flux

    clip = family.clip
    assert isinstance(clip.tokenizer, comfy.text_encoders.flux.Flux2Tokenizer)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.flux.Flux2TEModel)
    ids = [token for token, _weight in clip.tokenize(PROMPT)["mistral3_24b"][0]]
    tokenizer = clip.tokenizer.mistral3_24b.tokenizer
    assert tokenizer.decode(ids) == "<s>" + clip.tokenizer.llama_template.format(PROMPT)
    vocab = tokenizer.get_vocab()
    assert ids[:2] == [vocab["<s>"], vocab["[SYSTEM_PROMPT]"]] == [1, 17] and ids[-1] == vocab["[/INST]"] == 4
    toy = vocab["Ġtoy"]  # " toy" as byte-level BPE spells it
    assert ids.count(toy) == 1 and tokenizer.decode([toy]) == " toy"
    prompt_ids = ids[ids.index(vocab["[INST]"]) + 1:-1]
    assert len(prompt_ids) == len(PROMPT.split()), "each test word is one token"
    assert len(tokenizer("zebra")["input_ids"]) > 2, "other words are spelled in pieces"

    context, extra = encode_prompt(clip, PROMPT)[0]
    assert context.shape == (1, len(ids), 3 * flux2.MISTRAL3_REDUCED["hidden_size"])
    assert torch.isfinite(context).all() and extra["attention_mask"].shape == (1, len(ids))
    assert torch.equal(encode_prompt(clip, PROMPT)[0][0], context)
    assert not torch.equal(encode_prompt(clip, "photo of a small dog on the beach")[0][0], context)


def test_ksampler_samples_flux2_latents_that_follow_noise_prompt_and_guidance(stock_comfy, family):
    out = family.sample(family.model, batch=2)
    assert out.shape == (2, 128, 4, 4) and torch.isfinite(out).all()
    assert relative_change(out[1], out[0]) > 1e-2, "each image has its own noise"
    assert torch.equal(family.sample(family.model, batch=2), out), "sampling must be deterministic"
    other = family.sample(family.model, batch=2, positive=family.encode("portrait painting of a cat"))
    # measured 0.3%: the prompts differ in a few of the 512 text tokens every image token attends to
    assert relative_change(other, out) > 1e-3, "the prompt must reach the model"
    stronger = stock_comfy.nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(encode_prompt(family.clip, PROMPT),
                                                                             6.0).result[0]
    assert relative_change(family.sample(family.model, batch=2, positive=stronger), out) > 1e-3, \
        "FluxGuidance must feed guidance_in"


def test_the_diffusion_model_gets_the_text_left_padded_with_zeros_to_512_tokens(family):
    from comfy import patcher_extension

    positive = family.encode(PROMPT)
    text = positive[0][0]
    seen = []

    def record(executor, x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs):
        seen.append((context.clone(), guidance.clone(), set(kwargs)))
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)

    projected = []
    model = family.model.clone()
    model.add_wrapper_with_key(patcher_extension.WrappersMP.DIFFUSION_MODEL, "test.record", record)
    hook = family.model.model.diffusion_model.txt_in.register_forward_hook(
        lambda _module, _args, out: projected.append(out.clone()))
    try:
        family.sample(model, batch=1, positive=positive)
    finally:
        hook.remove()

    assert len(seen) == 2  # two steps at CFG 1: the positive pass only
    context, guidance, other_inputs = seen[0]
    padding = 512 - text.shape[1]
    assert context.shape == (1, 512, text.shape[2])
    assert torch.equal(context[:, :padding], torch.zeros_like(context[:, :padding]))
    assert torch.equal(context[:, padding:], text.to(context.dtype))
    assert guidance.tolist() == [flux2.FLUX2_GUIDANCE]
    assert "attention_mask" not in other_inputs, "Flux.2 drops the text encoder's mask: padding is attended"
    # txt_in has no bias, so the padded rows enter the first block as zeros
    assert torch.equal(projected[0][:, :padding], torch.zeros_like(projected[0][:, :padding]))


def test_vaeloader_loads_the_flux2_autoencoder_with_every_key_and_its_batchnorm_statistics(stock_comfy, caplog):
    from comfy.ldm.models.autoencoder import AutoencoderKL

    path = flux2.flux2_vae_path()
    assert path.parent.name == "vae"
    stored = load_file(str(path))
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "encoder.quant_conv.weight",
            "decoder.post_quant_conv.weight"} <= set(stored)
    assert stored["decoder.conv_in.weight"].shape[1] == 32 and stored["bn.running_mean"].shape == (128,)
    with caplog.at_level(logging.DEBUG):
        vae = flux2.flux2_vae()
    assert not [r.getMessage() for r in caplog.records if "VAE keys" in r.getMessage()], "no missing or leftover keys"
    assert (vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio) == (128, 16, 16)
    model = vae.first_stage_model
    assert type(model) is AutoencoderKL and model.bn is not None
    loaded = model.state_dict()
    renamed = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
               for k, v in stored.items()}
    assert set(loaded) == set(renamed)
    assert [k for k in renamed if not torch.equal(loaded[k].to(renamed[k].dtype), renamed[k])] == []
    assert 83e6 < sum(p.numel() for p in model.parameters()) < 85e6, "the Flux ae's widths: ComfyUI fixes them"


def test_the_flux2_vae_encodes_images_into_flux2_latents_and_decodes_them(stock_comfy):
    vae = flux2.flux2_vae()
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(images)
    assert latent.shape == (1, 128, 4, 4) and torch.isfinite(latent).all()
    assert latent.shape[1:] == flux2.flux2_latent()["samples"].shape[1:], "EmptyFlux2LatentImage's shape"
    decoded = vae.decode(flux2.flux2_latent()["samples"])
    assert decoded.shape == (1, 64, 64, 3) and torch.isfinite(decoded).all()
    again = vae.decode(latent)
    assert again.shape == (1, 64, 64, 3) and torch.isfinite(again).all()
    assert relative_change(again, decoded) > 1e-3, "the latent reaches the decoder"


def test_loraloader_loads_every_key_of_the_flux2_lora_and_it_changes_the_sample(stock_comfy, family, caplog):
    import comfy.lora

    path = flux2.flux2_lora_path()
    assert path.parent.name == "loras"
    stored = load_file(str(path))
    layers = {k[:-len(".lora_A.weight")] for k in stored if k.endswith(".lora_A.weight")}
    assert len(stored) == 2 * len(layers) == 2 * (2 * 6 + 2 * 3), "q, k, v of both streams and of the single blocks"
    key_map = comfy.lora.model_lora_keys_unet(family.model.model, {})
    assert layers <= set(key_map), "ComfyUI's LoRA key map knows every layer name"
    targets = {key_map[name][0] for name in layers}
    assert targets == {f"diffusion_model.double_blocks.{i}.{s}_attn.qkv.weight" for i in (0, 1) for s in ("img", "txt")} \
        | {f"diffusion_model.single_blocks.{i}.linear1.weight" for i in (0, 1)}
    assert {key_map[name][1] for name in layers} == {(0, i * 256, 256) for i in range(3)}, "slices of q, k and v"

    with caplog.at_level(logging.WARNING):
        patched = stock_comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(family.model, path.name, 1.0)[0]
    assert [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()] == []
    # the check sees ComfyUI's warning: a key the map lacks (Flux.2 diffusers' fused single-block name) is logged
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        comfy.lora.load_lora({"transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight":
                              torch.zeros(4, 256)}, key_map)
    assert [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert set(patched.patches) == targets and not family.model.patches, "every layer patched, on a clone"
    with_lora = family.sample(patched, batch=1)
    assert torch.isfinite(with_lora).all()
    assert relative_change(with_lora, family.sample(family.model, batch=1)) > 1e-3
