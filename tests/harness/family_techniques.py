"""The four inference techniques as the per-family tests (tests/test_family_*.py) apply them to a tiny DiT family:
the same nodes, settings and prompt on every family, so a family's checks differ only in its model."""
from __future__ import annotations

import re

from .comfy_env import pack_module
from .pack_nodes import run_node, shared_attention

PROMPT = "photo of a small toy on the beach"
GUIDANCE = dict(prompt=PROMPT, word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                update_fraction=1.0, map_source="text-only pass", uncond_image="black image")


def family_pva(family):
    """PVA weights for the tiny ``family`` (harness.dit.TinyFamily; the identity word in each of its text encoders),
    initialised from its blocks as the paper does and perturbed a little (harness.pva_assets.dit_pva_weights)."""
    from .pva_assets import dit_pva_weights, loaded_pva
    return loaded_pva(dit_pva_weights(family.name, family.model), f"tiny {family.name} pva")


def techniques(family, file_tag: str) -> dict:
    """Each inference technique as ``patch(model, strength)`` on ``family`` (its RealCustom adapter recording
    ``file_tag``): strength 0 must leave sampling as it is (StyleAligned has no strength: it shares in no block at
    a skip fraction of 1)."""
    from test_realcustom_dit import encoded_reference

    from .pva_assets import PVA_DEFAULTS, faces, tiny_clip_vision
    reference = encoded_reference(family.model, f"test_realcustom_{family.name}_v1.safetensors", file_tag)
    pva = family_pva(family)
    return {
        "SharedAttentionBatch": lambda model, strength: shared_attention(model, skip_fraction=1.0 - strength),
        "AdaptiveMaskGuidance": lambda model, strength: run_node(
            "AdaptiveMaskGuidance", model=model, clip=family.clip, reference=reference, strength=strength,
            **GUIDANCE)[0],
        "ParallelVisualAttention": lambda model, strength: run_node(
            "ParallelVisualAttention", model=model, pva=pva, references=faces(2, seed=4, size=32),
            clip_vision=tiny_clip_vision(), **{**PVA_DEFAULTS, "strength": strength})[0],
        "CalibratedCrossAttn": lambda model, strength: run_node(
            "CalibratedCrossAttn", model=model, clip=family.clip, prompt=PROMPT, modifiers="small, beach",
            class_words="toy, photo", strength=strength, start_percent=0.0, end_percent=1.0)[0],
    }


def family_blocks(family):
    """The pack's blocks of ``family``'s model."""
    return pack_module("nodes.patching").transformer_blocks(family.model,
                                                            families=pack_module("attention.blocks").ALL_FAMILIES)


def trained_files(family, file_tag: str, vae) -> tuple[str, str]:
    """RealCustomTrainer, PVAIdentityTune and PVATrainer run a few steps on ``family`` (its flow loss, with whatever
    guidance input, pooled vector and conditioning placement its adapter gives), each file recording ``file_tag``;
    the names of the RealCustom adapter and of the tuned PVA file."""
    from safetensors import safe_open

    from .comfy_env import models_dir
    from .pva_assets import faces, tiny_clip_vision
    from test_realcustom_trainer_dit import CAPTIONS, dataset

    def recorded_family(folder: str, name: str) -> str:
        with safe_open(str(models_dir() / folder / name), "pt") as handle:
            return handle.metadata()["family"]
    tag = family.name
    _, adapter, *_ = run_node("RealCustomTrainer", model=family.model, clip=family.clip, vae=vae,
                              clip_vision=tiny_clip_vision(), images=dataset(), captions=CAPTIONS,
                              name=f"test_rc_{tag}", steps=2, learning_rate=1e-3, batch_size=2, grad_accumulation=1,
                              resolution=64, seed=0, checkpoint_every=0, crop=False)
    _, _, tuned = run_node("PVAIdentityTune", model=family.model, clip=family.clip, vae=vae, pva=family_pva(family),
                           photos=faces(2, seed=6, size=64), name=f"test_tune_{tag}", steps=2, learning_rate=1e-3,
                           word_learning_rate=1e-2, timestep_bins=1, seed=3, checkpoint_every=0,
                           clip_vision=tiny_clip_vision(), resolution=64)
    stage1 = run_node("PVATrainer", model=family.model, clip=family.clip, vae=vae, pva=family_pva(family),
                      images=faces(2, seed=7, size=64), images_per_identity=2, name=f"test_stage1_{tag}",
                      encoder="clip_vision", steps=1, learning_rate=1e-4, transformer_learning_rate=1e-4,
                      word_learning_rate=1e-3, timestep_bins=1, init_word="person", seed=0, checkpoint_every=0,
                      resolution=64, clip_vision=tiny_clip_vision())[-1]
    recorded = [recorded_family("realcustom", adapter), recorded_family("pva", tuned), recorded_family("pva", stage1)]
    assert recorded == [file_tag] * 3, recorded
    return adapter, tuned


def check_files_refused_across(family, adapter: str, tuned: str, family_name: str) -> None:
    """``family``'s RealCustom adapter and PVA file (their names) are refused on the tiny Flux.1, and a Flux.1
    adapter on ``family``, each error naming both families (``family_name`` as the pack names it)."""
    import pytest

    from test_realcustom_dit import encoded_reference

    from . import dit
    from .pva_assets import PVA_DEFAULTS, faces, tiny_clip_vision
    flux = dit.TinyFamily("flux")
    named = re.escape(family_name)
    with pytest.raises(ValueError, match=rf"{named}.*Flux\b|Flux\b.*{named}"):
        loaded = run_node("RealCustomLoader", adapter_name=adapter)[0]
        run_node("AdaptiveMaskGuidance", model=flux.model, clip=flux.clip, strength=1.0, **GUIDANCE,
                 reference=run_node("RealCustomEncodeReference", adapter=loaded, clip_vision=tiny_clip_vision(),
                                    image=faces(1, size=32), crop=False)[0])
    with pytest.raises(ValueError, match=rf"Flux\b.*{named}|{named}.*Flux\b"):
        run_node("AdaptiveMaskGuidance", model=family.model, clip=family.clip, strength=1.0, **GUIDANCE,
                 reference=encoded_reference(flux.model, f"test_realcustom_flux_for_{family.name}.safetensors", "flux"))
    with pytest.raises(ValueError, match=rf"trained for {named} models, but this MODEL .* is a Flux model"):
        run_node("ParallelVisualAttention", model=flux.model, pva=run_node("PVALoader", pva_name=tuned)[0],
                 references=faces(1, size=32), clip_vision=tiny_clip_vision(), **PVA_DEFAULTS)
    dit.release("flux")


def check_each_technique(family, file_tag: str, model=None, changed: dict | None = None, **sampling) -> None:
    """Each technique (:func:`techniques`) on ``model`` (default: the family's own), sampled with ``sampling``
    (family.sample's arguments): at strength 0 bit for bit what ``model`` samples alone, at strength 1 every image
    (StyleAligned: every target) changed by more than ``changed[name]`` relative (default 1e-3), and ``model``
    itself left unpatched."""
    import torch

    from .tensors import relative_change
    model = family.model if model is None else model
    base = family.sample(model, **sampling)
    for name, patch in techniques(family, file_tag).items():
        assert torch.equal(family.sample(patch(model, 0.0), **sampling), base), name
        patched = family.sample(patch(model, 1.0), **sampling)
        for image in range(1, 2) if name == "SharedAttentionBatch" else range(2):
            assert relative_change(patched[image], base[image]) > (changed or {}).get(name, 1e-3), (name, image)
    assert torch.equal(family.sample(model, **sampling), base), "the input model must stay unpatched"
