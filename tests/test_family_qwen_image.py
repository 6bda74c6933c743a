"""Qwen-Image, added through its adapter (attention/families/qwen_image.py) and its tiny model
(tests/harness/qwen_image.py), in the real ComfyUI: ComfyUI's detection makes it a Qwen-Image, every inference
technique runs on its blocks (unpatched at strength 0 bit for bit, every image changed otherwise; CFG 1 and 2.5;
batches; a LoRA in the same graph), the layout is read from what the first block receives (the prompt's tokens as
the text stream, then the latent's tokens), a word is found in the prompt at its position in the conditioning,
which ComfyUI's text encoder starts after the template's system prompt, StyleAligned's first joint call equals the
written-out formulation, RealCustomTrainer, PVAIdentityTune and PVATrainer train on it and record the family in
their files, and files of Flux.1 and of Qwen-Image are each refused on the other."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_env import pack_module
from harness.family_techniques import (PROMPT, check_each_technique, check_files_refused_across, family_blocks,
                                       techniques, trained_files)
from harness.pack_nodes import shared_attention
from harness.qwen_image import TinyQwenImage, qwen_image_controlnet, qwen_image_lora_path, qwen_image_vae
from harness.tensors import relative_change
from test_joint_attention import slow_style_aligned_joint
from test_joint_layout import SeenCalls


@pytest.fixture(scope="module")
def qwen_image(comfy):
    family = TinyQwenImage()
    family.prompt = PROMPT
    return family


def test_comfys_config_makes_it_a_qwen_image_and_the_pack_patches_its_blocks(qwen_image):
    import comfy.model_base
    import comfy.supported_models
    assert type(qwen_image.model.model.model_config) is comfy.supported_models.QwenImage
    assert type(qwen_image.model.model) is comfy.model_base.QwenImage
    blocks = family_blocks(qwen_image)
    assert blocks[0].family is pack_module("attention.families").QWEN_IMAGE
    assert [b.label for b in blocks] == ["double:0", "double:1"]
    assert [(b.heads, b.dim_head) for b in blocks] == [(2, 128)] * 2


def test_a_word_sits_where_the_conditioning_holds_it_after_the_dropped_system_prompt(qwen_image):
    """ComfyUI's text encoder drops the template's system prompt and ``<|im_start|>user\\n`` from the conditioning:
    the prompt's first token is the conditioning's first, and a word's position counts from there; the template's
    words ("user", "assistant") are found only where the prompt holds them."""
    find = pack_module("nodes.prompt_tokens").find_phrase_tokens
    conditioning = qwen_image.encode(PROMPT)[0][0]
    found = find(qwen_image.clip, PROMPT, "toy")
    assert found.context_length == conditioning.shape[1]
    tokenizer = qwen_image.clip.tokenizer.qwen25_7b.tokenizer
    kept = [token for token, _weight in qwen_image.clip.tokenize(PROMPT)["qwen25_7b"][0]][-conditioning.shape[1]:]
    assert tokenizer.decode(kept[:8]) == PROMPT and found.positions == (kept.index(tokenizer.get_vocab()["Ġtoy"]),)
    assert found.positions == (4,)  # photo of a small toy: the word's place in the prompt
    assert len(find(qwen_image.clip, "the user of a toy", "user").occurrences) == 1
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        find(qwen_image.clip, PROMPT, "assistant")


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_each_technique_is_unpatched_at_strength_zero_and_changes_every_image(qwen_image, cfg):
    check_each_technique(qwen_image, "qwen_image", cfg=cfg)


def test_the_layout_is_read_and_style_aligned_first_call_is_the_written_out_formulation(qwen_image, monkeypatch):
    """Batch 3 at CFG 1: the reference stays as unpatched, the targets change; every joint call is a block's, on the
    layout read from the model (text = the conditioning's tokens, then the 4 x 4 latent tokens), and the first one
    equals the slow StyleAligned with that text count (queries and keys as the attention function gets them, rotary
    positions applied)."""
    base = qwen_image.sample(qwen_image.model, batch=3, cfg=1.0)
    seen = SeenCalls(monkeypatch)
    patched = qwen_image.sample(shared_attention(qwen_image.model), batch=3, cfg=1.0)
    assert relative_change(patched[0], base[0]) < 1e-5
    assert all(relative_change(patched[i], base[i]) > 1e-3 for i in (1, 2))
    text = qwen_image.encode(PROMPT)[0][0].shape[1]
    assert seen.layouts() == [pack_module("attention.joint").JointLayout(text, (4, 4))]
    assert [call["block"] for call in seen.calls[:2]] == [("double", 0), ("double", 1)]
    q, k, v = (t.double() for t in seen.calls[0]["qkv"])
    assert seen.calls[0]["skip_reshape"] and q.shape[2] == text + 16
    expected = slow_style_aligned_joint(q, k, v, 1, pack_module("attention.style_aligned").StyleAlignedSettings(),
                                        text=text)
    out = seen.calls[0]["out"].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-5


def test_a_lora_in_the_same_graph(qwen_image):
    """A LoRA in the names ComfyUI's key map gives Qwen-Image: each technique at strength 0 on the LoRA model samples
    as the LoRA model alone, and changes it otherwise (CFG 1: the uncond pass is tested above)."""
    import nodes
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(qwen_image.model, qwen_image_lora_path().name, 1.0)[0]
    assert relative_change(qwen_image.sample(lora, cfg=1.0), qwen_image.sample(qwen_image.model, cfg=1.0)) > 1e-3, \
        "the LoRA applies"
    check_each_technique(qwen_image, "qwen_image", model=lora, cfg=1.0)


def test_an_instantx_controlnet_in_the_same_graph(qwen_image):
    """InstantX's Qwen-Image ControlNet (a VAE-encoded hint, residuals added to the image stream after each block), at
    CFG 1: StyleAligned sharing nothing gives the reference zero residuals, as the paper's ControlNet pipeline does
    (the reference samples as without the ControlNet, the target as with it); each other technique at strength 0
    samples as the controlled model alone, and changes it otherwise."""
    import nodes
    positive, negative = qwen_image.encode(PROMPT), qwen_image.encode("")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    controlled = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, qwen_image_controlnet(), hint,
                                                                   1.0, 0.0, 1.0, vae=qwen_image_vae())

    def sample(model):
        return qwen_image.sample(model, cfg=1.0, positive=controlled[0], negative=controlled[1])
    base, uncontrolled = sample(qwen_image.model), qwen_image.sample(qwen_image.model, cfg=1.0)
    assert relative_change(base[1], uncontrolled[1]) > 1e-3, "the ControlNet applies"
    unshared = sample(shared_attention(qwen_image.model, skip_fraction=1.0))
    assert torch.equal(unshared[0], uncontrolled[0]) and torch.equal(unshared[1], base[1])
    for name, patch in techniques(qwen_image, "qwen_image").items():
        if name != "SharedAttentionBatch":
            assert torch.equal(sample(patch(qwen_image.model, 0.0)), base), name
            patched = sample(patch(qwen_image.model, 1.0))
            assert all(relative_change(patched[i], base[i]) > 1e-3 for i in range(2)), name


def test_trainers_train_it_and_its_files_are_refused_on_flux_and_flux_files_on_it(qwen_image):
    """RealCustomTrainer, PVAIdentityTune and PVATrainer: steps of Qwen-Image's flow loss on the Wan 2.1 VAE's
    one-frame latents, the family recorded in the files; a Qwen-Image file on Flux.1, and a Flux.1 file on
    Qwen-Image, are refused naming both families."""
    adapter, tuned = trained_files(qwen_image, "qwen_image", qwen_image_vae())
    check_files_refused_across(qwen_image, adapter, tuned, "Qwen-Image")


def test_a_prompt_batch_holds_prompts_of_one_length_and_refuses_others_saying_why(qwen_image):
    """SharedAttentionPromptBatch on Qwen-Image's text encoder: prompts of one token count batch as they are; prompts
    of different counts are refused, since Qwen-Image attends to every text token at its own rotary position (a
    repeated or padded prompt is another prompt to it)."""
    from harness.pack_nodes import run_node
    batched, count = run_node("SharedAttentionPromptBatch", clip=qwen_image.clip, prompts="a small toy\na small cat",
                              style="")
    assert count == 2 and batched[0][0].shape[0] == 2
    assert torch.equal(batched[0][0][1:], qwen_image.encode("a small cat")[0][0])
    with pytest.raises(ValueError, match=r"these prompts encode to \[\d+, \d+\] tokens"):
        run_node("SharedAttentionPromptBatch", clip=qwen_image.clip, prompts="a toy\na small toy on the beach",
                 style="")
