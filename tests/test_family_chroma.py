"""Chroma, the family added through its adapter (attention/families/chroma.py) and its tiny model
(tests/harness/chroma.py), in the real ComfyUI: ComfyUI's detection makes it a Chroma, every inference technique
runs on it (unpatched at strength 0 bit for bit, every image changed otherwise; CFG 1 and 4; batches; a LoRA in
the same graph), StyleAligned's first joint call equals the written-out formulation, RealCustomTrainer,
PVAIdentityTune and PVATrainer train on it with its flow loss and guidance input and record the family in their
files, and files of Flux.1 and of Chroma are each refused on the other."""
from __future__ import annotations

import pytest

from harness import dit
from harness.chroma import TinyChroma, chroma_lora_path
from harness.comfy_env import pack_module
from harness.family_techniques import (PROMPT, check_each_technique, check_files_refused_across, family_blocks,
                                       trained_files)
from harness.pack_nodes import shared_attention
from harness.tensors import relative_change
from test_joint_attention import slow_style_aligned_joint
from test_joint_layout import SeenCalls


@pytest.fixture(scope="module")
def chroma(comfy):
    family = TinyChroma()
    family.prompt = PROMPT
    return family


def test_comfys_detection_makes_it_a_chroma_with_flux_blocks(chroma):
    import comfy.model_base
    assert type(chroma.model.model) is comfy.model_base.Chroma
    blocks = family_blocks(chroma)
    assert blocks[0].family is pack_module("attention.families").CHROMA
    assert [b.label for b in blocks] == ["double:0", "double:1", "single:0", "single:1"]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_each_technique_is_unpatched_at_strength_zero_and_changes_every_image(chroma, cfg):
    check_each_technique(chroma, "chroma", cfg=cfg)


def test_style_aligned_shares_batches_and_its_first_call_is_the_written_out_formulation(chroma, monkeypatch):
    """Batch 3 at CFG 4: the reference stays as unpatched (to float rounding: the empty negative prompt is one T5
    token, and the reference's image rows, computed apart from its text row, round differently there), the
    targets change; the first joint call equals the slow StyleAligned on the layout read from the model."""
    base = chroma.sample(chroma.model, batch=3)
    seen = SeenCalls(monkeypatch)
    patched = chroma.sample(shared_attention(chroma.model), batch=3)
    assert relative_change(patched[0], base[0]) < 1e-5
    assert all(relative_change(patched[i], base[i]) > 1e-3 for i in (1, 2))
    first = next(call for call in seen.calls if call["block"] == ("double", 0))
    q, k, v = (t.double() for t in first["qkv"])
    text = first["layout"].text_tokens
    assert first["layout"].conditioning_columns == slice(0, text) and text == chroma.encode(PROMPT)[0][0].shape[1]
    settings = pack_module("attention.style_aligned").StyleAlignedSettings()
    expected = slow_style_aligned_joint(q, k, v, 1, settings, text=text)
    out = first["out"].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
    assert (out - expected).abs().max() / expected.abs().max() < 1e-5


def test_a_lora_in_the_same_graph(chroma):
    """Flux's diffusers-named LoRA, which ComfyUI maps onto Chroma's blocks: each technique at strength 0 on the LoRA
    model samples as the LoRA model alone, and changes it otherwise."""
    import nodes
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(chroma.model, chroma_lora_path().name, 1.0)[0]
    assert relative_change(chroma.sample(lora), chroma.sample(chroma.model)) > 1e-3, "the LoRA applies"
    check_each_technique(chroma, "chroma", model=lora)


def test_trainers_train_it_and_its_files_are_refused_on_flux_and_flux_files_on_it(chroma):
    """RealCustomTrainer, PVAIdentityTune and PVATrainer: steps of Chroma's flow loss (with its guidance input and no pooled
    vector), the family recorded in the files; a Chroma file on Flux.1, and a Flux.1 file on Chroma, are refused
    naming both families."""
    adapter, tuned = trained_files(chroma, "chroma", dit.vae())
    check_files_refused_across(chroma, adapter, tuned, "Chroma")
