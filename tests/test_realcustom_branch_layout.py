"""RealCustom image-branch layouts (issue 24: real scale): the shared + low-rank branch against explicit sums, the
zero start of a fresh branch, the layout recorded in and read from the adapter file, files of
the per-block layout written before the layouts existed loading as they did, through the nodes on the tiny Flux dev."""
import pytest
import torch
from personalization_nodes.attention.blocks import FLUX, UNET
from personalization_nodes.attention.realcustom import (
    PER_BLOCK,
    SHARED_LOW_RANK,
    ImageBranchWeights,
    SharedLowRankBranch,
)
from personalization_nodes.attention.realcustom_weights import (
    CLIP_VISION_FORMAT,
    adapter_from_state_dict,
    branch_metadata,
    default_layout,
    new_clip_vision_adapter,
)

TOKEN_DIM, RANK = 6, 2
SHAPES = {("double", 0, 0): (8, TOKEN_DIM), ("double", 1, 0): (8, TOKEN_DIM), ("single", 0, 0): (8, TOKEN_DIM),
          ("single", 1, 0): (8, TOKEN_DIM), ("single", 2, 0): (8, TOKEN_DIM), ("single", 3, 0): (8, TOKEN_DIM),
          ("single", 4, 0): (8, TOKEN_DIM)}


def randomized(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def test_shared_low_rank_keys_and_values_are_the_shared_projection_plus_the_blocks_change():
    """K_b[t, o] = Σ_i W_K[o, i] x[t, i] + Σ_r B_b[o, r] Σ_i A_b[r, i] x[t, i], written as loops; V alike."""
    branch = randomized(SharedLowRankBranch(SHAPES, RANK).double())
    tokens = torch.randn(1, 3, TOKEN_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for block in (("double", 1, 0), ("single", 3, 0)):
        keys, values = branch.project(block, tokens, torch.float64)
        name = "_".join(map(str, block))
        for got, shared, change in ((keys, branch.shared_k["8"].weight, branch.k_change[name]),
                                    (values, branch.shared_v["8"].weight, branch.v_change[name])):
            expected = torch.zeros(1, 3, 8, dtype=torch.float64)
            for t in range(3):
                for o in range(8):
                    total = sum(shared[o, i] * tokens[0, t, i] for i in range(TOKEN_DIM))
                    for r in range(RANK):
                        total += change.up[o, r] * sum(change.down[r, i] * tokens[0, t, i] for i in range(TOKEN_DIM))
                    expected[0, t, o] = total
            torch.testing.assert_close(got, expected)


def test_blocks_of_one_width_share_one_projection_and_each_holds_rank_numbers():
    branch = SharedLowRankBranch({**SHAPES, ("single", 5, 0): (4, TOKEN_DIM)}, RANK)
    assert sorted(branch.shared_k) == ["4", "8"] and sorted(branch.shared_v) == ["4", "8"]
    assert branch.rank == RANK and branch.widths()[("single", 5, 0)] == 4
    change = branch.k_change["double_0_0"]
    assert change.down.shape == (RANK, TOKEN_DIM) and change.up.shape == (8, RANK)


@pytest.mark.parametrize("layout", [PER_BLOCK, SHARED_LOW_RANK])
def test_a_fresh_branch_adds_exactly_nothing_and_its_keys_are_not_degenerate(layout):
    """The values start at zero in both layouts (the shared one's projection and every block's change), so the
    untrained branch's output softmax(Q Kᵀ) V is exactly zero whatever the tokens; the keys are not zero, so the
    values get a gradient that depends on the query."""
    adapter = new_clip_vision_adapter(5, SHAPES, seed=3, family=FLUX, layout=layout, rank=RANK)
    tokens = torch.randn(1, 4, TOKEN_DIM)
    for block in SHAPES:
        keys, values = adapter.branch.project(block, tokens, torch.float32)
        assert torch.equal(values, torch.zeros_like(values)) and keys.abs().sum() > 0
    again = new_clip_vision_adapter(5, SHAPES, seed=3, family=FLUX, layout=layout, rank=RANK)
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key]), f"{key}: a resumed run starts from the same weights"


def test_defaults_per_family_and_metadata_record_layout_rank_and_selection():
    sd15_sized = {("input", i, 0): (1280, 768) for i in range(16)}  # 31 M numbers per-block
    sdxl_sized = {("input", i, 0): (1280, 2048) for i in range(70)}  # 367 M
    assert default_layout(UNET, sd15_sized) == PER_BLOCK and default_layout(UNET, sdxl_sized) == SHARED_LOW_RANK
    assert default_layout(FLUX, SHAPES) == SHARED_LOW_RANK, "a DiT's branch is shared + low-rank at any size"
    assert branch_metadata(SharedLowRankBranch(SHAPES, RANK), "every_2") == {
        "branch_layout": "shared + low-rank", "branch_rank": "2", "branch_blocks": "every_2"}
    assert branch_metadata(ImageBranchWeights(SHAPES), "all") == {"branch_layout": "per-block", "branch_blocks": "all"}


@pytest.mark.parametrize("layout", [PER_BLOCK, SHARED_LOW_RANK])
def test_a_saved_branch_reloads_to_the_same_projections(layout):
    adapter = randomized(new_clip_vision_adapter(5, SHAPES, seed=3, family=FLUX, layout=layout, rank=RANK))
    loaded = adapter_from_state_dict(adapter.state_dict(), CLIP_VISION_FORMAT, FLUX, layout)
    assert type(loaded.branch) is type(adapter.branch) and loaded.branch.widths() == adapter.branch.widths()
    tokens = torch.randn(1, 4, TOKEN_DIM)
    for block in SHAPES:
        for got, expected in zip(loaded.branch.project(block, tokens, torch.float32),
                                 adapter.branch.project(block, tokens, torch.float32)):
            assert torch.equal(got, expected)


def test_a_file_whose_layout_does_not_match_its_tensors_is_refused():
    per_block = new_clip_vision_adapter(5, SHAPES, seed=3, family=FLUX, layout=PER_BLOCK).state_dict()
    with pytest.raises(ValueError, match="records a 'shared \\+ low-rank' image branch but holds none"):
        adapter_from_state_dict(per_block, CLIP_VISION_FORMAT, FLUX, SHARED_LOW_RANK)
    with pytest.raises(ValueError, match="unknown RealCustom branch layout 'diagonal'"):
        adapter_from_state_dict(per_block, CLIP_VISION_FORMAT, FLUX, "diagonal")


# --- through the nodes, on the tiny Flux dev --------------------------------------------------------------

@pytest.fixture(scope="module")
def flux(comfy):
    from harness import dit
    family = dit.TinyFamily("flux")
    yield family
    dit.release("flux")


def guided(flux, adapter):
    from harness.pack_nodes import run_node
    from harness.realcustom import tiny_clip_vision
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    reference = run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(), image=image,
                         crop=False)[0]
    return run_node("AdaptiveMaskGuidance", model=flux.model, reference=reference, clip=flux.clip,
                    prompt="a photo of a toy", word="toy", mask_strategy="max_norm", mask_scope=0.25,
                    binary_mask=False, update_fraction=1.0, map_source="text-only pass", uncond_image="black image",
                    strength=1.0)[0]


def flux_shapes(flux, token_dim):
    from harness.comfy_env import pack_module
    blocks = pack_module("nodes.patching").transformer_blocks(flux.model,
                                                              families=pack_module("attention.blocks").ALL_FAMILIES)
    return {b.key: (b.channels, token_dim) for b in blocks if b.has_cross_attention}


def loaded_adapter(adapter, name):
    """RealCustomLoader's output for an adapter made in the test."""
    import comfy.model_management
    import comfy.model_patcher
    from harness.comfy_env import pack_module
    patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    return pack_module("nodes.realcustom").LoadedAdapter(adapter, patcher, name)


@pytest.mark.slow
def test_a_fresh_shared_low_rank_adapter_samples_as_the_plain_model(flux):
    """The zero start through the whole graph: the untrained branch (the DiTs' default layout) changes no bit."""
    from harness.comfy_env import pack_module
    from harness.realcustom import TINY_CLIP_VISION
    weights = pack_module("attention.realcustom_weights")  # the pack as ComfyUI loaded it: its FLUX is the model's
    adapter = weights.new_clip_vision_adapter(TINY_CLIP_VISION["hidden_size"], flux_shapes(flux, 64), seed=0,
                                              family=pack_module("attention.blocks").FLUX, layout=SHARED_LOW_RANK)
    assert torch.equal(flux.sample(guided(flux, loaded_adapter(adapter, "fresh")), batch=1),
                       flux.sample(flux.model, batch=1))


@pytest.mark.slow
def test_a_per_block_file_written_before_the_layouts_loads_and_guides_as_before(flux):
    """A Flux file of the old writer (no branch_layout entry, per-block keys) loads as the per-block branch it is
    and guides exactly as the adapter it was written from."""
    from harness.comfy_env import models_dir, pack_module
    from harness.pack_nodes import run_node
    from harness.realcustom import TINY_CLIP_VISION, adapter_state_dict, write_adapter
    blocks = pack_module("nodes.patching").transformer_blocks(flux.model,
                                                              families=pack_module("attention.blocks").ALL_FAMILIES)
    state_dict = adapter_state_dict(blocks, TINY_CLIP_VISION["hidden_size"], 64, seed=5)
    path = models_dir() / "realcustom" / "test_realcustom_layout_old_flux.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_adapter(path, state_dict, "realcustom.clip_vision", "flux")  # the writer of before: format and family only
    loaded = run_node("RealCustomLoader", adapter_name=path.name)[0]
    assert loaded.adapter.branch.layout == PER_BLOCK
    for key, tensor in state_dict.items():
        assert torch.equal(loaded.adapter.state_dict()[key], tensor)
    direct = loaded_adapter(pack_module("attention.realcustom_weights").adapter_from_state_dict(
        state_dict, CLIP_VISION_FORMAT, pack_module("attention.blocks").FLUX), "direct")
    assert torch.equal(flux.sample(guided(flux, loaded), batch=1), flux.sample(guided(flux, direct), batch=1))
    path.unlink()
