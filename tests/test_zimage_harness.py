"""The tiny Z-Image of tests/harness/zimage.py in the real ComfyUI: ComfyUI's detection, completed with the width,
makes the file a supported_models.ZImage (a plain Lumina 2 without it), ComfyUI's ZImageTokenizer templates a prompt
with the real Qwen tokenizer and the reduced Qwen3 4B encodes every templated token 64 wide, ComfyUI's sampler runs
it at CFG 1 on the 16-channel latent, and the main layers get the text padded to 32 tokens, then the image padded to
32 tokens, in one joint sequence (recorded by forward hooks on the real modules)."""
from __future__ import annotations

import pytest
import torch

from harness import zimage
from harness.tensors import relative_change

PROMPT = "photo of a small toy"


@pytest.fixture(scope="module")
def family(stock_comfy):
    tiny = zimage.TinyZImage()
    tiny.prompt = PROMPT
    return tiny


def test_comfys_detection_makes_it_a_zimage_with_the_tiny_layer_counts(family):
    import comfy.model_base
    import comfy.model_detection
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(zimage.zimage_path()))
    plain = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(plain) is comfy.supported_models.Lumina2 and "z_image_modulation" not in plain.unet_config, \
        "ComfyUI tells Z-Image by its 3840 width alone: why the harness completes the detection"
    assert {k: plain.unet_config[k] for k in ("dim", "cap_feat_dim", "n_layers")} == dict(dim=256, cap_feat_dim=64,
                                                                                       n_layers=2)

    model = family.model.model
    assert type(model) is comfy.model_base.Lumina2 and type(model.model_config) is comfy.supported_models.ZImage
    assert model.model_sampling.shift == 3.0
    net = model.diffusion_model
    assert (len(net.layers), len(net.noise_refiner), len(net.context_refiner)) == (2, 2, 2)
    assert (net.dim, net.n_heads, net.layers[0].attention.n_kv_heads, net.pad_tokens_multiple) == (256, 2, 2, 32)
    for pad in (net.cap_pad_token, net.x_pad_token):
        assert pad.shape == (1, 256) and torch.isfinite(pad).all() and pad.abs().sum() > 0


def test_the_tokenizer_templates_the_prompt_and_the_encoder_keeps_every_token(family):
    import comfy.text_encoders.z_image

    clip = family.clip
    assert isinstance(clip.tokenizer, comfy.text_encoders.z_image.ZImageTokenizer)
    assert isinstance(clip.cond_stage_model, comfy.text_encoders.z_image.ZImageTEModel)
    ids = [token for token, _weight in clip.tokenize(PROMPT)["qwen3_4b"][0]]
    tokenizer = clip.tokenizer.qwen3_4b.tokenizer
    assert tokenizer.decode(ids) == clip.tokenizer.llama_template.format(PROMPT)
    vocab = tokenizer.get_vocab()
    assert ids[0] == vocab["<|im_start|>"] and ids.count(vocab["<|im_end|>"]) == 1
    toy = vocab["Ġtoy"]  # " toy" as byte-level BPE spells it
    assert ids.count(toy) == 1 and tokenizer.decode([toy]) == " toy"

    context, extra = family.encode(PROMPT)[0]
    assert context.shape == (1, len(ids), zimage.QWEN3_4B_REDUCED["hidden_size"]), "template tokens are kept"
    assert torch.isfinite(context).all() and extra["attention_mask"].shape == (1, len(ids))
    assert torch.equal(family.encode(PROMPT)[0][0], context)
    assert not torch.equal(family.encode("photo of a small dog")[0][0], context)


def test_ksampler_samples_zimage_latents_that_follow_noise_and_prompt(family):
    out = family.sample(family.model, batch=2)
    assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()
    assert relative_change(out[1], out[0]) > 1e-2, "each image has its own noise"
    assert torch.equal(family.sample(family.model, batch=2), out), "sampling must be deterministic"
    other = family.sample(family.model, batch=2, positive=family.encode("portrait painting of a cat"))
    # measured 10%: the templated prompt is 32 of the 64 tokens every image token attends to (Flux.2's: 0.3%)
    assert relative_change(other, out) > 1e-2, "the prompt must reach the model"


def test_the_main_layers_get_the_padded_text_then_the_padded_image_in_one_sequence(family):
    """64 x 64 px: 8 x 8 latent, 16 patches of 2 x 2 padded with x_pad_token to 32; the templated prompt padded
    with cap_pad_token to 32; the main layers get [text 32 | image 32], no mask. Every attention goes through
    ComfyUI's attention override with the transformer options, which name no block."""
    net = family.model.model.diffusion_model
    seen = {}
    attention_calls = []

    def record_input(name):
        def hook(_module, args, _kwargs):
            seen.setdefault(name, []).append(dict(x=args[0].clone(), mask=args[1], freqs_cis=args[2]))
        return hook

    def record_output(name):
        def hook(_module, _args, _kwargs, out):
            seen.setdefault(name, []).append(out.clone())
        return hook

    def record_attention(func, q, k, v, heads, mask=None, **kwargs):
        attention_calls.append(dict(shape=tuple(q.shape), mask=mask, options=set(kwargs["transformer_options"])))
        return func(q, k, v, heads, mask, **kwargs)

    modules = {"cap_embedder": net.cap_embedder, "context_refiner": net.context_refiner[-1],
               "noise_refiner": net.noise_refiner[-1]}
    hooks = [net.context_refiner[0].register_forward_pre_hook(record_input("context_in"), with_kwargs=True),
             net.noise_refiner[0].register_forward_pre_hook(record_input("image_in"), with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(record_input(f"layer{i}"), with_kwargs=True)
              for i, layer in enumerate(net.layers)]
    hooks += [module.register_forward_hook(record_output(name), with_kwargs=True) for name, module in modules.items()]
    model = family.model.clone()
    model.model_options["transformer_options"]["optimized_attention_override"] = record_attention
    try:
        family.sample(model, batch=1)
    finally:
        for hook in hooks:
            hook.remove()

    text_tokens, image_tokens = seen["cap_embedder"][0].shape[1], 16
    assert text_tokens == len(family.clip.tokenize(PROMPT)["qwen3_4b"][0]) == 13, "the template's tokens and 5 words"
    padded = 32  # each part filled up to a multiple of pad_tokens_multiple
    assert len(seen["layer0"]) == 2, "two steps at CFG 1: the positive pass only"
    for layer in ("layer0", "layer1"):
        joint = seen[layer][0]
        assert joint["x"].shape == (1, 2 * padded, 256) and joint["mask"] is None
        assert joint["freqs_cis"].shape == (1, 2 * padded, 1, 64, 2, 2)
    joint = seen["layer0"][0]["x"]
    assert torch.equal(joint[:, :padded], seen["context_refiner"][0]), "the text comes first"
    assert torch.equal(joint[:, padded:], seen["noise_refiner"][0])

    context_in, image_in = seen["context_in"][0]["x"], seen["image_in"][0]["x"]
    assert context_in.shape[1] == image_in.shape[1] == padded
    assert torch.equal(context_in[:, :text_tokens], seen["cap_embedder"][0])
    assert torch.equal(context_in[0, text_tokens:], net.cap_pad_token.to(context_in).expand(padded - text_tokens, -1))
    assert torch.equal(image_in[0, image_tokens:], net.x_pad_token.to(image_in).expand(padded - image_tokens, -1))

    per_step = [(1, 2, padded, 128)] * 4 + [(1, 2, 2 * padded, 128)] * 2  # 2 context, 2 noise refiners, 2 layers
    assert [call["shape"] for call in attention_calls] == per_step * 2
    assert all(call["mask"] is None for call in attention_calls), "a prompt alone has an all-ones mask: dropped"
    assert not {"block_index", "block_type"} & set.union(*(call["options"] for call in attention_calls))
