"""Flux.2, added through its adapter (attention/families/flux2.py) and its tiny model (tests/harness/flux2.py), in
the real ComfyUI: ComfyUI's detection makes it a Flux.2, every inference technique runs on it (unpatched at
strength 0 bit for bit, every image changed otherwise; CFG 1 and 3; batches; a LoRA and Flux.2's reference images
in the same graph), the prompt's words are found where the 512-token padding puts them (not in the text
encoder's system prompt), StyleAligned's first joint call equals the written-out formulation, with and without
another pack's tokens around the prompt's, RealCustomTrainer, PVAIdentityTune and PVATrainer train on it and record the family in
their files, and files of Flux.1 and of Flux.2 are each refused on the other."""
from __future__ import annotations

import pytest
import torch

from harness.comfy_env import pack_module
from harness.family_techniques import (PROMPT, check_each_technique, check_files_refused_across, family_blocks,
                                       trained_files)
from harness.flux2 import TinyFlux2
from harness.pack_nodes import shared_attention
from harness.tensors import relative_change
from test_joint_attention import slow_style_aligned_joint
from test_joint_layout import Bracketing, SeenCalls, with_post_input

#: what model_base.Flux2.extra_conds pads every shorter prompt to
PADDED = 512
#: the least relative change of a patched image: the calibration edits only the prompt's columns, and on the tiny
#: Flux.2 the prompt moves a sample little (a whole other prompt ~0.3%: the image also attends to the 512-token
#: padding and the system prompt, harness.flux2); the others change the image tokens themselves
CHANGED = {"CalibratedCrossAttn": 1e-4}


@pytest.fixture(scope="module")
def flux2(comfy):
    family = TinyFlux2()
    family.prompt = PROMPT
    yield family


def test_comfys_detection_makes_it_a_flux2_with_flux_blocks(flux2):
    import comfy.model_base
    assert type(flux2.model.model) is comfy.model_base.Flux2
    blocks = family_blocks(flux2)
    assert blocks[0].family is pack_module("attention.families").FLUX2
    assert [b.label for b in blocks] == ["double:0", "double:1", "single:0", "single:1"]


def test_a_word_is_where_the_padded_prompt_reaches_the_first_block_and_never_in_the_system_prompt(flux2):
    """ComfyUI pads the prompt's tokens in front to 512: the word's placed position holds, in the text stream the
    first double block receives, the text embedder's row of the word's own token. A word of Flux2Tokenizer's system
    prompt ("image") is found only where the prompt holds it."""
    prompt_tokens = pack_module("nodes.prompt_tokens")
    family = pack_module("attention.families").FLUX2
    found = prompt_tokens.find_phrase_tokens(flux2.clip, PROMPT, "toy")
    placed = found.placed(family)
    assert placed.context_length == PADDED and placed.positions == (PADDED - found.context_length + found.positions[0],)
    diffusion_model = flux2.model.model.diffusion_model
    streams = []
    hook = diffusion_model.double_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: streams.append(kwargs["txt"].detach().clone()), with_kwargs=True)
    try:
        flux2.sample(flux2.model, batch=1)
    finally:
        hook.remove()
    encoded = flux2.encode(PROMPT)[0][0]
    with torch.no_grad():
        word_row = diffusion_model.txt_in(encoded[:, found.positions[0]].to(streams[0]))
    assert streams[0].shape[1] == PADDED
    torch.testing.assert_close(streams[0][0, placed.positions[0]], word_row[0], rtol=1e-3, atol=1e-4)

    words = prompt_tokens.find_phrase_tokens(flux2.clip, "an image of a toy", "image")
    toy = prompt_tokens.find_phrase_tokens(flux2.clip, "an image of a toy", "toy")
    assert len(words.occurrences) == 1 and words.positions[0] == toy.positions[0] - 3


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_each_technique_is_unpatched_at_strength_zero_and_changes_every_image(flux2, cfg):
    check_each_technique(flux2, "flux2", changed=CHANGED, cfg=cfg)


def test_style_aligned_first_call_is_the_written_out_formulation_with_and_without_tokens_of_another_pack(
        flux2, monkeypatch):
    """Batch 3 at CFG 1: the reference stays as unpatched, the targets change; the first joint call equals the slow
    StyleAligned on the layout read from the model: text = the 512 padded tokens, and with another pack's
    ``post_input`` patch the tokens it puts on both sides of them. (ComfyUI's own USO style node is for Flux.1: its
    patch gives its tokens Flux.1's three position axes, and ComfyUI 0.3.75 fails on Flux.2's four before any
    attention runs.)"""
    base = flux2.sample(flux2.model, batch=3)
    seen = SeenCalls(monkeypatch)
    settings = pack_module("attention.style_aligned").StyleAlignedSettings()
    hidden = flux2.model.model.diffusion_model.hidden_size
    runs = {"plain": (shared_attention(flux2.model), 0, 0),
            "another pack's tokens": (with_post_input(shared_attention(flux2.model), Bracketing(5, 3, hidden)), 5, 3)}
    for name, (model, before, after) in runs.items():
        seen.calls.clear()
        patched = flux2.sample(model, batch=3)
        if name == "plain":
            assert relative_change(patched[0], base[0]) < 1e-5
            assert all(relative_change(patched[i], base[i]) > 1e-3 for i in (1, 2))
        text = before + PADDED + after
        layout = pack_module("attention.joint").JointLayout(text, (4, 4),
                                                            slice(before, before + PADDED) if before else None)
        assert seen.layouts() == [layout], name
        first = next(call for call in seen.calls if call["block"] == ("double", 0))
        q, k, v = (t.double() for t in first["qkv"])
        # every image row, and text rows at both ends and around the prompt's (the text rows are the plain
        # attention's: the 500-odd padding rows between them hold nothing else to check, at ~30 ms a row)
        rows = [*range(0, before + 4), *range(text - 12 - after, text), *range(text, q.shape[2])]
        expected = slow_style_aligned_joint(q, k, v, 1, settings, text=text, rows=rows)
        out = first["out"].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)[:, :, rows]
        expected = expected[:, :, rows]
        assert (out - expected).abs().max() / expected.abs().max() < 1e-5, name


def test_a_lora_and_reference_images_in_the_same_graph(flux2):
    """A LoRA (diffusers names, which ComfyUI maps onto Flux.2 as onto Flux.1) and Flux.2's reference images (stock
    ReferenceLatent: image tokens after the latent's): each technique at strength 0 samples as the graph without it,
    and changes it otherwise."""
    import nodes
    from harness.flux2 import flux2_lora_path
    lora = nodes.LoraLoaderModelOnly().load_lora_model_only(flux2.model, flux2_lora_path().name, 1.0)[0]
    reference = {"samples": torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(9))}
    referenced = nodes.NODE_CLASS_MAPPINGS["ReferenceLatent"]().execute(flux2.encode(PROMPT), reference)
    positive = referenced.result[0] if hasattr(referenced, "result") else referenced[0]
    graphs = {"LoRA": (lora, {}), "reference image": (flux2.model, {"positive": positive})}
    for graph, (model, sampling) in graphs.items():
        assert relative_change(flux2.sample(model, **sampling), flux2.sample(flux2.model)) > 1e-3, f"the {graph} applies"
        check_each_technique(flux2, "flux2", model=model, changed=CHANGED, **sampling)


def test_trainers_train_it_and_its_files_are_refused_on_flux_and_flux_files_on_it(flux2):
    """RealCustomTrainer, PVAIdentityTune and PVATrainer: steps of Flux.2's flow loss (its guidance input, no pooled
    vector, the prompt padded as sampling pads it), the family recorded in the files; a Flux.2 file on Flux.1, and
    a Flux.1 file on Flux.2, are refused naming both families."""
    from harness.flux2 import flux2_vae
    adapter, tuned = trained_files(flux2, "flux2", flux2_vae())
    check_files_refused_across(flux2, adapter, tuned, "Flux.2")


def test_a_prompt_batch_of_different_lengths_gives_each_prompt_what_it_gets_alone(flux2):
    """SharedAttentionPromptBatch on Flux.2's text encoder: prompts of different token counts (and their attention
    masks) are batched with zeros in front, where the model pads each alone, and the extras Flux.2's model reads
    (pooled_output None) are kept: each image of the batch samples as its prompt alone."""
    from harness.pack_nodes import run_node
    lines = ["photo of a small toy", "photo of a small toy on the beach at dusk"]
    batched, count = run_node("SharedAttentionPromptBatch", clip=flux2.clip, prompts="\n".join(lines), style="")
    assert count == 2 and "pooled_output" in batched[0][1]
    alone = [flux2.encode(line) for line in lines]
    import nodes
    batched = nodes.NODE_CLASS_MAPPINGS["FluxGuidance"].execute(batched, 3.5).result[0]
    together = flux2.sample(flux2.model, batch=2, positive=batched)
    for image, positive in enumerate(alone):
        own = flux2.sample(flux2.model, batch=2, positive=[[positive[0][0].repeat(2, 1, 1), positive[0][1]]])
        assert relative_change(together[image], own[image]) < 1e-5, image
