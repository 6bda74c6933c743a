"""The model files the harness writes hold what their builders put there: finite values, the same on every
machine. ComfyUI allocates some tensors uninitialised for a checkpoint to fill (SD3's MMDiT registers its
fixed sin-cos ``pos_embed`` with torch.empty); a builder that forgets one writes whatever memory held: the
cached SD3.5 files of harness version dit1 held inf/NaN there, and SD3.5 Medium sampled NaN on one machine."""
from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from harness import checkpoints, dit, flux2, pva_assets, realcustom

#: every model file the harness builds, by a name for the test id: the function returning its path
#: (built only when the cache lacks it)
HARNESS_FILES = {
    "sd15": checkpoints.sd15_checkpoint_path,
    "sd15_controlnet": checkpoints.sd15_controlnet_path,
    "sd15_lora": checkpoints.sd15_lora_path,
    "sd15_inpainting": pva_assets.sd15_inpaint_checkpoint_path,
    "arcface": pva_assets.arcface_path,
    "dinov2": realcustom.tiny_dinov2_path,
    "vitl_clip_vision": realcustom.vitl_clip_vision_path,
    **{f"flux_{variant}": (lambda variant=variant: dit.flux_path(variant)) for variant in dit.FLUX_VARIANTS},
    "flux_controlnet": dit.flux_controlnet_path,
    **{f"sd35_{variant}": (lambda variant=variant: dit.sd35_path(variant)) for variant in dit.SD35_VARIANTS},
    **{f"sd35_{variant}_checkpoint": (lambda variant=variant: dit.sd35_checkpoint_path(variant))
       for variant in dit.SD35_VARIANTS},
    "sd35_controlnet": dit.sd35_controlnet_path,
    **{f"text_encoder_{name}": (lambda name=name: dit.text_encoder_path(name))
       for name in ("clip_l", "clip_g", "t5xxl")},
    "flux_sd3_vae": dit.vae_path,
    **{f"{family}_lora": (lambda family=family: dit.lora_path(family)) for family in ("flux", "sd35")},
    "flux2": flux2.flux2_path,
    "flux2_vae": flux2.flux2_vae_path,
    "flux2_lora": flux2.flux2_lora_path,
}
#: the DiT builders (ComfyUI's classes with operations that allocate every weight uninitialised), built in
#: seconds
DIT_BUILDS = ("flux_dev", "flux_controlnet", "sd35_large", "sd35_medium", "sd35_controlnet", "flux2", "flux2_vae")


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block, every tensor torch allocates without initialising it (torch.empty and the like) holds
    NaN (integers their largest value): torch's fill_uninitialized_memory, which works under deterministic
    algorithms. What a builder forgets to initialise then shows in its file on every machine."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def test_poisoned_allocations_fill_empty_tensors_with_nan_and_end_with_the_block():
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with poisoned_allocations():
        assert torch.empty(3).isnan().all()
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.utils.deterministic.fill_uninitialized_memory == fill


@pytest.mark.parametrize("name", DIT_BUILDS)
def test_a_build_in_poisoned_memory_is_finite_and_the_cached_file(stock_comfy, name, tmp_path, monkeypatch):
    """Built again in poisoned memory into a fresh cache (the shared one untouched): every value finite, and
    bit for bit the cached file, so no value of it depends on what memory held (nor did a builder change
    without a new version in the file names)."""
    cached = load_file(str(HARNESS_FILES[name]()))
    monkeypatch.setenv("PERSONALIZATION_TEST_CACHE", str(tmp_path))
    with poisoned_allocations():
        poisoned = load_file(str(HARNESS_FILES[name]()))
    assert checkpoints.non_finite(poisoned.items()) == []
    assert poisoned.keys() == cached.keys()
    assert [key for key in cached if not torch.equal(poisoned[key], cached[key])] == []


@pytest.mark.parametrize("name", HARNESS_FILES)
def test_cached_model_file_is_finite(comfy, name):
    """The file the tests load from the cache, whichever machine built it (read tensor by tensor)."""
    with safe_open(str(HARNESS_FILES[name]()), "pt") as f:
        assert checkpoints.non_finite((key, f.get_tensor(key)) for key in f.keys()) == []
