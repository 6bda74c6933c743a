"""Chroma, the family added through its adapter (attention/families/chroma.py) and its tiny model
(tests/harness/chroma.py), in the real ComfyUI: ComfyUI's detection makes it a Chroma, every inference technique
runs on it (unpatched at strength 0 bit for bit, every image changed otherwise; CFG 1 and 4; batches; a LoRA in
the same graph), StyleAligned's first joint call equals the written-out formulation, RealCustomTrainer,
PVAIdentityTune and PVATrainer train on it with its flow loss and guidance input and record the family in their
files, and files of Flux.1 and of Chroma are each refused on the other."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from harness import dit
from harness.chroma import TinyChroma, chroma_lora_path
from harness.comfy_env import models_dir, pack_module
from harness.pack_nodes import run_node, shared_attention
from harness.tensors import relative_change
from test_joint_layout import SeenCalls
from test_joint_attention import slow_style_aligned_joint
from test_realcustom_dit import encoded_reference

PROMPT = "photo of a small toy on the beach"
GUIDANCE = dict(prompt=PROMPT, word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                update_fraction=1.0, map_source="text-only pass", uncond_image="black image")


@pytest.fixture(scope="module")
def chroma(comfy):
    family = TinyChroma()
    family.prompt = PROMPT
    return family


def chroma_pva(model):
    """PVA weights for the tiny Chroma (the identity word in T5, its one text encoder), initialised from its blocks
    as the paper does and perturbed a little (harness.pva_assets.dit_pva_weights)."""
    from harness.pva_assets import dit_pva_weights, loaded_pva
    return loaded_pva(dit_pva_weights("chroma", model), "tiny chroma pva")


def techniques(chroma):
    """Each inference technique as ``patch(model, strength)``: strength 0 must leave sampling as it is
    (StyleAligned has no strength: it shares in no block at a skip fraction of 1)."""
    from harness.pva_assets import PVA_DEFAULTS, faces, tiny_clip_vision
    reference = encoded_reference(chroma.model, "test_realcustom_chroma_v1.safetensors", "chroma")
    pva = chroma_pva(chroma.model)
    return {
        "SharedAttentionBatch": lambda model, strength: shared_attention(model, skip_fraction=1.0 - strength),
        "AdaptiveMaskGuidance": lambda model, strength: run_node(
            "AdaptiveMaskGuidance", model=model, clip=chroma.clip, reference=reference, strength=strength,
            **GUIDANCE)[0],
        "ParallelVisualAttention": lambda model, strength: run_node(
            "ParallelVisualAttention", model=model, pva=pva, references=faces(2, seed=4, size=32),
            clip_vision=tiny_clip_vision(), **{**PVA_DEFAULTS, "strength": strength})[0],
        "CalibratedCrossAttn": lambda model, strength: run_node(
            "CalibratedCrossAttn", model=model, clip=chroma.clip, prompt=PROMPT, modifiers="small, beach",
            class_words="toy, photo", strength=strength, start_percent=0.0, end_percent=1.0)[0],
    }


def test_comfys_detection_makes_it_a_chroma_with_flux_blocks(chroma):
    import comfy.model_base
    assert type(chroma.model.model) is comfy.model_base.Chroma
    blocks = pack_module("nodes.patching").transformer_blocks(chroma.model,
                                                              families=pack_module("attention.blocks").ALL_FAMILIES)
    assert blocks[0].family is pack_module("attention.families").CHROMA
    assert [b.label for b in blocks] == ["double:0", "double:1", "single:0", "single:1"]


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_each_technique_is_unpatched_at_strength_zero_and_changes_every_image(chroma, cfg):
    base = chroma.sample(chroma.model, cfg=cfg)
    for name, patch in techniques(chroma).items():
        assert torch.equal(chroma.sample(patch(chroma.model, 0.0), cfg=cfg), base), name
        patched = chroma.sample(patch(chroma.model, 1.0), cfg=cfg)
        for image in range(1, 2) if name == "SharedAttentionBatch" else range(2):
            assert relative_change(patched[image], base[image]) > 1e-3, (name, image)
    assert torch.equal(chroma.sample(chroma.model, cfg=cfg), base), "the input model must stay unpatched"


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
    with_lora = chroma.sample(lora)
    assert relative_change(with_lora, chroma.sample(chroma.model)) > 1e-3, "the LoRA applies"
    for name, patch in techniques(chroma).items():
        assert torch.equal(chroma.sample(patch(lora, 0.0)), with_lora), name
        assert relative_change(chroma.sample(patch(lora, 1.0))[1], with_lora[1]) > 1e-3, name


def test_trainers_train_it_and_its_files_are_refused_on_flux_and_flux_files_on_it(chroma):
    """RealCustomTrainer, PVAIdentityTune and PVATrainer: steps of Chroma's flow loss (with its guidance input and no pooled
    vector), the family recorded in the files; a Chroma file on Flux.1, and a Flux.1 file on Chroma, are refused
    naming both families."""
    from harness.pva_assets import faces, tiny_clip_vision
    from test_realcustom_trainer_dit import CAPTIONS, dataset
    vae = dit.vae()
    _, name, *_ = run_node("RealCustomTrainer", model=chroma.model, clip=chroma.clip, vae=vae,
                           clip_vision=tiny_clip_vision(), images=dataset(), captions=CAPTIONS, name="test_rc_chroma",
                           steps=2, learning_rate=1e-3, batch_size=2, grad_accumulation=1, resolution=64, seed=0,
                           checkpoint_every=0, crop=False)
    with safe_open(str(models_dir() / "realcustom" / name), "pt") as handle:
        assert handle.metadata()["family"] == "chroma"
    _, tuned, pva_name = run_node("PVAIdentityTune", model=chroma.model, clip=chroma.clip, vae=vae,
                                  pva=chroma_pva(chroma.model), photos=faces(2, seed=6, size=64),
                                  name="test_tune_chroma", steps=2, learning_rate=1e-3, word_learning_rate=1e-2,
                                  timestep_bins=1, seed=3, checkpoint_every=0, clip_vision=tiny_clip_vision(),
                                  resolution=64)
    with safe_open(str(models_dir() / "pva" / pva_name), "pt") as handle:
        assert handle.metadata()["family"] == "chroma"
    stage1_name = run_node("PVATrainer", model=chroma.model, clip=chroma.clip, vae=vae, pva=chroma_pva(chroma.model),
                           images=faces(2, seed=7, size=64), images_per_identity=2, name="test_stage1_chroma",
                           encoder="clip_vision", steps=1, learning_rate=1e-4, transformer_learning_rate=1e-4,
                           word_learning_rate=1e-3, timestep_bins=1, init_word="person", seed=0, checkpoint_every=0,
                           resolution=64, clip_vision=tiny_clip_vision())[-1]
    with safe_open(str(models_dir() / "pva" / stage1_name), "pt") as handle:
        assert handle.metadata()["family"] == "chroma"

    flux = dit.TinyFamily("flux")
    chroma_adapter = run_node("RealCustomLoader", adapter_name=name)[0]
    with pytest.raises(ValueError, match=r"Chroma.*Flux|Flux.*Chroma"):
        run_node("AdaptiveMaskGuidance", model=flux.model, clip=flux.clip, strength=1.0, **GUIDANCE,
                 reference=run_node("RealCustomEncodeReference", adapter=chroma_adapter,
                                    clip_vision=tiny_clip_vision(), image=faces(1, size=32), crop=False)[0])
    with pytest.raises(ValueError, match=r"Flux.*Chroma|Chroma.*Flux"):
        run_node("AdaptiveMaskGuidance", model=chroma.model, clip=chroma.clip, strength=1.0, **GUIDANCE,
                 reference=encoded_reference(flux.model, "test_realcustom_flux_for_chroma.safetensors", "flux"))
    from harness.pva_assets import PVA_DEFAULTS
    chroma_file = run_node("PVALoader", pva_name=pva_name)[0]
    with pytest.raises(ValueError, match=r"trained for Chroma models, but this MODEL .* is a Flux model"):
        run_node("ParallelVisualAttention", model=flux.model, pva=chroma_file, references=faces(1, size=32),
                 clip_vision=tiny_clip_vision(), **PVA_DEFAULTS)
    dit.release("flux")
