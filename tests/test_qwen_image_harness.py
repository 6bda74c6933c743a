"""The tiny Qwen-Image of tests/harness/qwen_image.py in the real ComfyUI: ComfyUI's detection reads the file as a
supported_models.QwenImage but with the real heads and text width (why the harness completes it), ComfyUI's
QwenImageTokenizer templates a prompt with the real Qwen tokenizer and QwenImageTEModel drops the system prompt,
(as many tokens as the adapter's dropped_template_tokens says), stock VAELoader reads the VAE file as the Wan 2.1
VAE, and ComfyUI's LoRA key map takes every key of the LoRA."""
from __future__ import annotations

import pytest
import torch

from harness import qwen_image
from harness.comfy_env import pack_module

PROMPT = "photo of a small toy"


@pytest.fixture(scope="module")
def family(stock_comfy):
    tiny = qwen_image.TinyQwenImage()
    tiny.prompt = PROMPT
    return tiny


def test_comfys_detection_needs_the_heads_and_text_width_and_makes_it_a_qwen_image(family):
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(qwen_image.qwen_image_path()))
    plain = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(plain) is comfy.supported_models.QwenImage
    assert plain.unet_config == dict(image_model="qwen_image", in_channels=64, num_layers=2), \
        "ComfyUI reads no heads or text width from the file: why the harness completes the detection"
    model = family.model.model
    assert type(model) is comfy.model_base.QwenImage and model.model_sampling.shift == 1.15
    net = model.diffusion_model
    assert (len(net.transformer_blocks), net.inner_dim, net.transformer_blocks[0].attn.heads) == (2, 256, 2)
    assert net.txt_in.weight.shape == (256, 64)


def test_the_tokenizer_templates_the_prompt_and_the_encoder_drops_the_system_prompt(family):
    import comfy.text_encoders.qwen_image

    clip = family.clip
    assert isinstance(clip.tokenizer, comfy.text_encoders.qwen_image.QwenImageTokenizer)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.qwen_image.QwenImageTEModel)
    ids = [token for token, _weight in clip.tokenize(PROMPT)["qwen25_7b"][0]]
    tokenizer = clip.tokenizer.qwen25_7b.tokenizer
    assert tokenizer.decode(ids) == clip.tokenizer.llama_template.format(PROMPT)
    conditioning = family.encode(PROMPT)[0][0]
    kept = ids[len(ids) - conditioning.shape[1]:]
    assert tokenizer.decode(kept) == PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
    assert conditioning.shape[2] == 64 and torch.isfinite(conditioning).all()
    adapter = pack_module("attention.families").QWEN_IMAGE
    assert adapter.dropped_template_tokens(ids) == len(ids) - conditioning.shape[1], "the pack's rule is ComfyUI's"


def test_the_vae_is_read_as_the_wan21_vae_and_encodes_an_image_as_one_frame(family):
    vae = qwen_image.qwen_image_vae()
    assert (vae.latent_dim, vae.latent_channels) == (3, 16)
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = vae.encode(images)
    assert latent.shape == (1, 16, 1, 8, 8) and torch.isfinite(latent).all()


def test_comfys_lora_key_map_takes_every_key_of_the_lora(family):
    import comfy.lora
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(qwen_image.qwen_image_lora_path()))
    patches = comfy.lora.load_lora(lora, comfy.lora.model_lora_keys_unet(family.model.model, {}))
    blocks, projections = qwen_image.QWEN_IMAGE_DIT["num_layers"], 6
    assert len(patches) == blocks * projections == len(lora) // 2
