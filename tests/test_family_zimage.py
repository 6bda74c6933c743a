"""Z-Image, added through its adapter (attention/families/zimage.py) and its tiny model (tests/harness/zimage.py), in
the real ComfyUI: ComfyUI's detection makes it a Z-Image (config ZImage on Lumina 2's model class), every inference
technique runs on its main blocks (unpatched at strength 0 bit for bit, every image changed otherwise; CFG 1 and 3;
batches; a LoRA in the same graph), the layout is read from what the first main block receives (the prompt's
refined tokens first, the text padding to a multiple of 32, then the latent's tokens and the image padding), a word
is found in the prompt and never in the text encoder's chat template, StyleAligned's first joint call equals the
written-out formulation, RealCustomTrainer, PVAIdentityTune and PVATrainer train on it and record the family in
their files, and files of Flux.1 and of Z-Image are each refused on the other."""
from __future__ import annotations

import pytest
import torch

from harness import dit
from harness.comfy_env import pack_module
from harness.family_techniques import (PROMPT, check_each_technique, check_files_refused_across, family_blocks,
                                       trained_files)
from harness.pack_nodes import shared_attention
from harness.tensors import relative_change
from harness.zimage import TinyZImage, zimage_lora_path
from test_joint_attention import slow_style_aligned_joint
from test_joint_layout import SeenCalls

#: ComfyUI's NextDiT pads the text and the image tokens each to a multiple of this
PADDING = 32


@pytest.fixture(scope="module")
def zimage(comfy):
    family = TinyZImage()
    family.prompt = PROMPT
    return family


def test_comfys_config_makes_it_a_zimage_and_the_pack_patches_its_main_blocks(zimage):
    import comfy.model_base
    import comfy.supported_models
    assert type(zimage.model.model.model_config) is comfy.supported_models.ZImage
    assert type(zimage.model.model) is comfy.model_base.Lumina2
    blocks = family_blocks(zimage)
    assert blocks[0].family is pack_module("attention.families").ZIMAGE
    assert [b.label for b in blocks] == ["layer:0", "layer:1"]


def test_a_word_is_found_in_the_prompt_and_never_in_the_chat_template(zimage):
    """The template's words ("user", "assistant") are found only where the prompt holds them; the prompt's tokens
    follow the template's opening, so a word's position is the same counted from the prompt's first token."""
    find = pack_module("nodes.prompt_tokens").find_phrase_tokens
    assert len(find(zimage.clip, "the user of a toy", "user").occurrences) == 1
    assert find(zimage.clip, "the user of a toy", "user").positions[0] == find(zimage.clip, "the user of a toy",
                                                                               "toy").positions[0] - 3
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        find(zimage.clip, PROMPT, "assistant")


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_each_technique_is_unpatched_at_strength_zero_and_changes_every_image(zimage, cfg):
    check_each_technique(zimage, "zimage", cfg=cfg)


def test_the_layout_is_read_and_style_aligned_first_call_is_the_written_out_formulation(zimage, monkeypatch):
    """Batch 3 at CFG 1: the reference stays as unpatched, the targets change; every joint call is a main block's,
    on the layout read from the model (text = the prompt's tokens padded to 32, the prompt's first), and the first
    one equals the slow StyleAligned with that text count."""
    base = zimage.sample(zimage.model, batch=3)
    seen = SeenCalls(monkeypatch)
    patched = zimage.sample(shared_attention(zimage.model), batch=3)
    assert relative_change(patched[0], base[0]) < 1e-5
    assert all(relative_change(patched[i], base[i]) > 1e-3 for i in (1, 2))
    prompt_tokens = zimage.encode(PROMPT)[0][0].shape[1]
    text = -(-prompt_tokens // PADDING) * PADDING
    layout = pack_module("attention.joint").JointLayout(text, (4, 4), slice(0, prompt_tokens))
    assert seen.layouts() == [layout]
    joint = [call for call in seen.calls if call["block"][0] == "layer"]
    assert [call["block"][1] for call in joint[:2]] == [0, 1], "every main block named, the refiners not"
    q, k, v = (t.double() for t in joint[0]["qkv"])
    assert q.shape[2] == text + PADDING  # the 16 latent tokens, then 16 image pad tokens
    expected = slow_style_aligned_joint(q, k, v, 1, pack_module("attention.style_aligned").StyleAlignedSettings(),
                                        text=text)
    out = joint[0]["out"].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-5


def test_a_lora_in_the_same_graph(zimage):
    """A LoRA in the diffusers names ComfyUI maps onto Z-Image: each technique at strength 0 on the LoRA model
    samples as the LoRA model alone, and changes it otherwise."""
    import nodes
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(zimage.model, zimage_lora_path().name, 1.0)[0]
    assert relative_change(zimage.sample(lora), zimage.sample(zimage.model)) > 1e-3, "the LoRA applies"
    check_each_technique(zimage, "zimage", model=lora)


def test_trainers_train_it_and_its_files_are_refused_on_flux_and_flux_files_on_it(zimage):
    """RealCustomTrainer, PVAIdentityTune and PVATrainer: steps of Z-Image's flow loss (ComfyUI's model takes
    t = 1 - sigma and negates its output inside), the family recorded in the files; a Z-Image file on Flux.1, and a
    Flux.1 file on Z-Image, are refused naming both families."""
    adapter, tuned = trained_files(zimage, "zimage", dit.vae())
    check_files_refused_across(zimage, adapter, tuned, "Z-Image")


def test_a_prompt_batch_holds_prompts_of_one_length_and_refuses_others_saying_why(zimage):
    """SharedAttentionPromptBatch on Z-Image's text encoder: prompts of one token count batch as they are (their
    attention masks too); prompts of different counts are refused, since Z-Image pads each with its own tokens."""
    from harness.pack_nodes import run_node
    batched, count = run_node("SharedAttentionPromptBatch", clip=zimage.clip, prompts="a small toy\na small cat",
                              style="")
    assert count == 2 and batched[0][0].shape[0] == 2 and batched[0][1]["attention_mask"].shape[0] == 2
    assert torch.equal(batched[0][0][1:], zimage.encode("a small cat")[0][0])
    with pytest.raises(ValueError, match=r"these prompts encode to \[\d+, \d+\] tokens"):
        run_node("SharedAttentionPromptBatch", clip=zimage.clip, prompts="a toy\na small toy on the beach", style="")
