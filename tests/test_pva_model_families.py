"""ParallelVisualAttention on the inpainting families beyond SD1.5, inside the real ComfyUI.

- SD2 inpainting (the paper's base, 512-inpainting-ema): ComfyUI's SD20 model class, context 1024, linear
  transformer projections, heads of 64 channels, fp32 attention, 9 input channels;
- SDXL inpainting (diffusers' stable-diffusion-xl-1.0-inpainting-0.1): ComfyUI's SDXL model class with 9 input
  channels, context 2048 and the pooled/size ADM.

Both are reduced random-weight U-Nets built with ComfyUI's own classes (harness.checkpoints.model_patcher),
with conditioning tensors of the text encoders' real widths, PVA files of their own cross-attention layout
(ArcFace encoder, as the paper), stock InpaintModelConditioning (SD VAE: its raw latent is what ComfyUI feeds
both families, each scaling it by its own latent format) and stock KSampler. The identity word and the
trainers run on text encoders of the families' real classes and widths, 3 layers deep
(harness.text_encoders.reduced_clip).
"""
from dataclasses import dataclass, field

import pytest
import torch

from harness.checkpoints import IN_MEMORY_FAMILIES, conditioning, encode_prompt, model_patcher, sample
from harness.comfy_env import pack_module
from harness.memory import collect_dropped_models
from harness.pack_nodes import run_node
from harness.pva_assets import IDENTITY_WORD_WIDTHS, arcface_path, faces, pva_model, pva_path
from harness.tensors import changed_keys, close, same_bits
from harness.text_encoders import reduced_clip

FAMILIES = ("sd2", "sdxl")
STEPS = 2
BATCH = 2
ALICE, BOB = faces(2, seed=10), faces(2, seed=11)
REDUCED_TRANSFORMER = dict(layers=1, feedforward=64)  # as the harness's PVA files (harness.pva_assets)


@dataclass
class Inpainting:
    """One family's 9-channel model, its PVA file and an InpaintModelConditioning of BATCH masked images."""

    family: str
    model: object
    pva: object
    positive: list
    negative: list
    latent: dict
    hole: torch.Tensor  # (BATCH, 4, h, w) bool: the latent noise mask as the sampler applies it
    layers: list  # the U-Net's cross-attention layers
    runs: dict = field(default_factory=dict)

    def run(self, model, cfg: float) -> torch.Tensor:
        return sample(model, self.positive, self.negative, self.latent, seed=3, steps=STEPS, cfg=cfg)

    def plain(self, cfg: float) -> torch.Tensor:
        """The run without PVA (sampled once per cfg)."""
        return self._once("plain", cfg, lambda: self.model)

    def alice(self, cfg: float) -> torch.Tensor:
        """The run with Alice's identity for every image (sampled once per cfg)."""
        return self._once("alice", cfg, lambda: pva_model(self.model, self.pva, ALICE))

    def _once(self, name, cfg, model):
        if (name, cfg) not in self.runs:
            self.runs[name, cfg] = self.run(model(), cfg)
        return self.runs[name, cfg]


@pytest.fixture(scope="module", params=FAMILIES)
def inpainting(request, comfy, sd15):
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.sampler_helpers import prepare_mask

    family = request.param
    model = model_patcher(family, in_channels=9)
    assert model.model.concat_keys == ("mask", "masked_image"), "built as an inpainting model"
    unet = model.get_model_object("diffusion_model")
    layers = [m.attn2 for m in unet.modules() if getattr(m, "attn2", None) is not None]
    assert {(a.dim_head, a.to_k.in_features) for a in layers} == {(64, IN_MEMORY_FAMILIES[family][1]["context_dim"])}
    assert all(m.use_linear for m in unet.modules() if isinstance(m, SpatialTransformer)), "linear projections"
    arcface_path()
    pva = run_node("PVALoader", pva_name=pva_path("arcface", family).name)[0]
    pixels = torch.rand(BATCH, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(BATCH, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    positive, negative, latent = comfy.nodes.InpaintModelConditioning().encode(
        conditioning(family, seed=1), conditioning(family, seed=2), pixels, sd15[2], mask)
    hole = prepare_mask(latent["noise_mask"], latent["samples"].shape, "cpu") > 0
    yield Inpainting(family, model, pva, positive, negative, latent, hole, layers)
    # one family in memory at a time (both together peaked at 7.2 GiB)
    del model, layers
    model_patcher.cache_clear()
    reduced_clip.cache_clear()
    collect_dropped_models(limit=0)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_identity_fills_the_hole_and_nothing_else(inpainting, cfg):
    out, plain = inpainting.alice(cfg), inpainting.plain(cfg)
    assert out.shape == plain.shape == (BATCH, 4, 8, 8) and torch.isfinite(out).all()
    hole = inpainting.hole
    assert hole.any() and not hole.all()
    assert not torch.allclose(out[hole], plain[hole], atol=1e-4), "the identity changes the masked region"
    assert same_bits(out[~hole], plain[~hole]), "outside the mask the image is kept"
    assert "personalization" not in inpainting.model.model_options["transformer_options"], "input model unchanged"


def test_every_cross_attention_layer_attends_to_the_identity(inpainting, monkeypatch):
    projection_class = pack_module("attention.pva").ParallelProjection
    names = {id(projection): name for name, projection in inpainting.pva.weights.parallel.items()}
    queried = set()
    queries = projection_class.queries

    def spy(self, call, own=None):
        queried.add(names[id(self)])
        return queries(self, call, own)

    monkeypatch.setattr(projection_class, "queries", spy)
    inpainting.run(pva_model(inpainting.model, inpainting.pva, ALICE), 1.0)
    assert queried == set(names.values()) and len(queried) == len(inpainting.layers)


def test_strength_zero_is_plain_sampling(inpainting):
    off = pva_model(inpainting.model, inpainting.pva, ALICE, strength=0.0)
    assert same_bits(inpainting.run(off, 5.0), inpainting.plain(5.0))


def test_one_identity_per_image(inpainting):
    per_image = pva_model(inpainting.model, inpainting.pva, torch.cat([ALICE, BOB]), images_per_identity=2)
    mixed, alice = inpainting.run(per_image, 5.0), inpainting.alice(5.0)
    assert close(mixed[0], alice[0]), "image 0 gets identity 0"
    assert not torch.allclose(mixed[1], alice[1], atol=1e-4), "image 1 gets identity 1"


def test_vae_encode_for_inpaint_flow(comfy, inpainting, sd15):
    mask = torch.zeros(1, 64, 64)
    mask[:, 8:40, 8:40] = 1.0
    latent = comfy.nodes.VAEEncodeForInpaint().encode(sd15[2], faces(1, seed=3), mask, grow_mask_by=6)[0]
    positive, negative = conditioning(inpainting.family, seed=1), conditioning(inpainting.family, seed=2)
    plain = sample(inpainting.model, positive, negative, latent, seed=4, steps=STEPS, cfg=1.0)
    out = sample(pva_model(inpainting.model, inpainting.pva, ALICE), positive, negative, latent, seed=4, steps=STEPS,
                 cfg=1.0)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    assert not torch.allclose(out, plain, atol=1e-4)


def test_pva_files_of_other_families_are_refused(inpainting):
    for other in ("sd15", *FAMILIES):
        if other != inpainting.family:
            pva = run_node("PVALoader", pva_name=pva_path("arcface", other).name)[0]
            with pytest.raises(ValueError, match="another model family|PVA file trained on this model family"):
                pva_model(inpainting.model, pva, ALICE)


def test_identity_word_for_the_family_text_encoders(inpainting):
    clip = reduced_clip(inpainting.family)
    text = "photo of a <new1> person"
    with_word = run_node("PVATextEncode", clip=clip, pva=inpainting.pva, text=text, identity_word="<new1>")[0]
    plain = encode_prompt(clip, text)
    width = IN_MEMORY_FAMILIES[inpainting.family][1]["context_dim"]
    assert with_word[0][0].shape == plain[0][0].shape == (1, 77, width)
    assert not torch.allclose(with_word[0][0], plain[0][0], atol=1e-4)
    assert with_word[0][1]["pooled_output"].shape == plain[0][1]["pooled_output"].shape


def test_identity_tune_trains_the_family_pathway(inpainting, sd15):
    before = {k: v.detach().clone() for k, v in inpainting.pva.weights.state_dict().items()}
    patched, tuned, name = run_node(
        "PVAIdentityTune", model=inpainting.model, clip=reduced_clip(inpainting.family), vae=sd15[2], pva=inpainting.pva,
        photos=faces(2, size=32), name=f"tune_{inpainting.family}", steps=1, learning_rate=1e-3, word_learning_rate=1e-2,
        timestep_bins=1, seed=0, checkpoint_every=0, resolution=32)
    assert not changed_keys(before, inpainting.pva.weights.state_dict()), "the input PVA is left unchanged"
    changed = {k.split(".")[0] for k in changed_keys(before, {k: v.cpu() for k, v in tuned.weights.state_dict().items()})}
    assert changed == {"parallel", "identity_word"}
    assert torch.isfinite(inpainting.run(patched, 1.0)).all()


def test_stage1_trainer_builds_the_family_pathway(inpainting, sd15, monkeypatch):
    """A fresh stage-1 start builds the family's pathway (context width, identity words of its text encoders,
    projections of its layers). Its token transformer is built at the harness's reduced depth and width: at
    SDXL's 2048-wide context the paper's transformer with its gradients and Adam state adds 3.4 GiB, above the
    suite's memory budget, and its architecture is tested on its own (test_pva_math)."""
    training = pack_module("nodes.pva_training")
    initial = training.PVAWeights.initial
    monkeypatch.setattr(training.PVAWeights, "initial", classmethod(
        lambda cls, *args, **kwargs: initial(*args, **{**kwargs, **REDUCED_TRANSFORMER})))
    trained, _name = run_node(
        "PVATrainer", model=inpainting.model, clip=reduced_clip(inpainting.family), vae=sd15[2],
        images=faces(4, seed=5, size=32), images_per_identity=2, name=f"stage1_{inpainting.family}", encoder="arcface",
        steps=1, learning_rate=1e-4, transformer_learning_rate=1e-4, word_learning_rate=1e-3, timestep_bins=1,
        init_word="person", seed=0, checkpoint_every=0, resolution=32)
    assert trained.weights.context_dim == IN_MEMORY_FAMILIES[inpainting.family][1]["context_dim"]
    assert {k: v.shape[-1] for k, v in trained.weights.identity_word.items()} == IDENTITY_WORD_WIDTHS[inpainting.family]
    assert set(trained.weights.parallel) == set(inpainting.pva.weights.parallel)
