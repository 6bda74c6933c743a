"""The tiny Flux.2 [dev] of tests/harness/flux2.py in the real ComfyUI: ComfyUI's detection makes the file a Flux.2
with two blocks of each kind, ComfyUI's Flux2Tokenizer templates a prompt over the tiny tekken vocabulary (test
words one token each) and Flux2TEModel stacks three layers per token, ComfyUI's sampler runs it on Flux.2's latent
with FluxGuidance, and the text reaching the diffusion model is left-padded with zeros to 512 tokens."""
from __future__ import annotations

import pytest
import torch

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
