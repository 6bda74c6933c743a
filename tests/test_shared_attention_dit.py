"""SharedAttentionBatch on the DiT families, in the real ComfyUI: the tiny Flux dev and SD3.5 Large and Medium
of harness.dit, sampled by stock KSampler. Image 0 of each cond/uncond pass (the reference) stays bit-identical
to unpatched sampling; the other images change; guidance-distilled Flux (FluxGuidance, CFG 1) and CFG > 1;
batches 2..5; a LoRA and a ControlNet in the same graph; SD3.5 Medium's image-only attention shared too."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from harness import dit
from harness.checkpoints import sample
from harness.comfy_env import pack_module
from harness.pack_nodes import shared_attention
from harness.tensors import relative_change

SAMPLING = dict(steps=3, sampler_name="euler", scheduler="simple")


@dataclass
class Family:
    name: str
    variant: str
    model: object
    cfg: float

    def prompts(self, batch: int, seed: int = 0):
        """``batch`` prompts and one negative, of the family's real conditioning shapes (Flux: FluxGuidance's
        guidance 3.5 on both, as a user wires it)."""
        guidance = 3.5 if self.name == "flux" else None
        return (dit.conditioning(self.name, batch=batch, seed=seed, tokens=24, guidance=guidance),
                dit.conditioning(self.name, batch=1, seed=seed + 100, tokens=24, guidance=guidance))

    def sample(self, model, batch: int, seed: int = 0, cfg: float | None = None, prompts=None):
        positive, negative = prompts or self.prompts(batch)
        return sample(model, positive, negative, dit.empty_latent(batch), seed=seed,
                      cfg=self.cfg if cfg is None else cfg, **SAMPLING)


FAMILIES = [("flux", "dev", 1.0), ("sd35", "large", 4.0), ("sd35", "medium", 4.0)]


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda p: f"{p[0]}-{p[1]}")
def family(request, comfy):
    name, variant, cfg = request.param
    model = dit.flux_model(variant) if name == "flux" else dit.sd35_model(variant)
    yield Family(name, variant, model, cfg)
    dit.release(name)


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_reference_is_bit_identical_and_every_target_changes(family, batch):
    base = family.sample(family.model, batch)
    patched = family.sample(shared_attention(family.model), batch)
    assert torch.equal(patched[0], base[0])
    for target in range(1, batch):
        assert relative_change(patched[target], base[target]) > 1e-3, f"target {target} unchanged"
    assert torch.equal(family.sample(family.model, batch), base), "the input model must stay unpatched"


def test_guidance_passes_cond_and_uncond_each_with_its_reference(family):
    """CFG 1 runs the cond pass only (Flux dev's distilled guidance), CFG > 1 both passes: in each pass the
    reference is image 0 of that pass."""
    for cfg in (1.0, 3.0):
        base = family.sample(family.model, 3, cfg=cfg)
        patched = family.sample(shared_attention(family.model, shared_score_shift=0.693), 3, cfg=cfg)
        assert torch.equal(patched[0], base[0]) and relative_change(patched[1:], base[1:]) > 1e-3


def test_block_selection_by_dit_block_names(family):
    blocks = pack_module("nodes.patching").transformer_blocks(family.model, "test", pack_module("attention.blocks").ALL_FAMILIES)
    first = blocks[0].label
    assert first == ("double:0" if family.name == "flux" else "joint:0")
    everywhere = family.sample(shared_attention(family.model), 2)
    one_block = family.sample(shared_attention(family.model, blocks=first), 2)
    nowhere = family.sample(shared_attention(family.model, skip_fraction=1.0), 2)
    assert relative_change(one_block[1], everywhere[1]) > 1e-4
    assert torch.equal(nowhere, family.sample(family.model, 2))
    with pytest.raises(ValueError, match="block selector 'input'"):
        shared_attention(family.model, blocks="input")


def test_a_lora_on_the_dit_still_applies(comfy, family):
    lora = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(family.model, dit.lora_path(family.name).name, 1.0)[0]
    with_lora = family.sample(shared_attention(lora), 2)
    without_lora = family.sample(shared_attention(family.model), 2)
    assert torch.equal(with_lora[0], family.sample(lora, 2)[0])
    assert relative_change(with_lora[1], without_lora[1]) > 1e-3


def test_sd35_medium_shares_its_image_only_attention_too(family, monkeypatch):
    if family.variant != "medium":
        pytest.skip("only SD3.5 Medium has the second, image-only attention")
    processor_class = pack_module("attention.style_aligned").SharedAttentionProcessor
    seen = []
    original = processor_class.self_attention

    def recording(self, q, k, v, call):
        seen.append((call.block, call.context is None))
        return original(self, q, k, v, call)
    monkeypatch.setattr(processor_class, "self_attention", recording)
    family.sample(shared_attention(family.model), 2)
    image_only = {block for block, alone in seen if alone}
    joint = {block for block, alone in seen if not alone}
    assert image_only == {("joint", i, 0) for i in dit.SD35_VARIANTS["medium"]}
    assert joint == {("joint", i, 0) for i in range(dit.SD35_DIT["depth"])}


def test_flux_controlnet_gives_the_reference_zero_residuals(comfy, family):
    if family.name != "flux":
        pytest.skip("the Flux ControlNet")
    positive, negative = family.prompts(2)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    controlled = comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, dit.flux_controlnet(),
                                                                       hint, 1.0, 0.0, 1.0)
    with_control = family.sample(shared_attention(family.model), 2, prompts=controlled)
    without_control = family.sample(shared_attention(family.model), 2, prompts=(positive, negative))
    controlled_reference = family.sample(shared_attention(family.model, controlnet_on_reference=True), 2,
                                         prompts=controlled)
    assert torch.equal(with_control[0], without_control[0])
    assert relative_change(with_control[1], without_control[1]) > 1e-3
    assert relative_change(controlled_reference[0], with_control[0]) > 1e-3


def test_another_packs_attention_override_applied_after_ours_is_refused(family):
    def foreign_override(func, *args, **kwargs):
        return func(*args, **kwargs)

    patched = shared_attention(family.model)
    overridden = patched.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = foreign_override
    with pytest.raises(Exception, match="replaced the DiT attention override after SharedAttentionBatch"):
        family.sample(overridden, 2)
