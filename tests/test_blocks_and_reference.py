"""Block discovery/selection and the reference-image trajectory helpers."""
import pytest
import torch
from harness.official_inversion import official_ddim_inversion

from personalization_nodes.attention.blocks import (
    FLUX, MMDIT, UnsupportedModelError, discover_transformer_blocks, evenly_skipped, parse_block_selection)
from personalization_nodes.attention.style_reference import (StyleReference, invert_eps, invert_flow, reinsertion_index,
                                                             schedule_step)


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.heads, self.dim_head = 2, 4


class Block(torch.nn.Module):
    def __init__(self, cross=True):
        super().__init__()
        self.attn1 = Attn()
        self.attn2 = Attn() if cross else None


class Spatial(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(Block() for _ in range(depth))


class ToyUNet(torch.nn.Module):
    """Module paths shaped like ComfyUI's openaimodel.UNetModel."""

    def __init__(self):
        super().__init__()
        res = torch.nn.Identity
        self.input_blocks = torch.nn.ModuleList([torch.nn.Sequential(res()), torch.nn.Sequential(res(), Spatial(2))])
        self.middle_block = torch.nn.Sequential(res(), Spatial(1), res())
        self.output_blocks = torch.nn.ModuleList([torch.nn.Sequential(res(), Spatial(1)), torch.nn.Sequential(res())])


def test_discovery_finds_every_block_in_diffusers_order():
    keys = [b.key for b in discover_transformer_blocks(ToyUNet().named_modules())]
    assert keys == [("input", 1, 0), ("input", 1, 1), ("output", 0, 0), ("middle", 0, 0)]


class ToyFlux(torch.nn.Module):
    """Module paths shaped like ComfyUI's flux.model.Flux (2 double, 3 single blocks of 2 heads x 4)."""

    def __init__(self):
        super().__init__()

        def block():
            module = torch.nn.Module()
            module.num_heads, module.hidden_size = 2, 8
            return module
        self.double_blocks = torch.nn.ModuleList(block() for _ in range(2))
        self.single_blocks = torch.nn.ModuleList(block() for _ in range(3))


class ToyMMDiT(torch.nn.Module):
    """Module paths shaped like ComfyUI's mmdit.MMDiT: joint_blocks.i.x_block.attn (3 heads, qkv of width 12)."""

    def __init__(self):
        super().__init__()

        def joint_block():
            block = torch.nn.Module()
            block.x_block = torch.nn.Module()
            block.x_block.attn = torch.nn.Module()
            block.x_block.attn.num_heads = 3
            block.x_block.attn.qkv = torch.nn.Linear(12, 36)
            return block
        self.joint_blocks = torch.nn.ModuleList(joint_block() for _ in range(2))


def test_dit_blocks_are_found_in_forward_order_with_their_family():
    flux = discover_transformer_blocks(ToyFlux().named_modules())
    assert [b.key for b in flux] == [("double", 0, 0), ("double", 1, 0), ("single", 0, 0), ("single", 1, 0),
                                     ("single", 2, 0)]
    assert {(b.family, b.heads, b.dim_head, b.has_cross_attention) for b in flux} == {(FLUX, 2, 4, True)}
    assert [b.label for b in flux][:3] == ["double:0", "double:1", "single:0"]
    mmdit = discover_transformer_blocks(ToyMMDiT().named_modules())
    assert [(b.key, b.family, b.heads, b.dim_head) for b in mmdit] == [(("joint", 0, 0), MMDIT, 3, 4),
                                                                     (("joint", 1, 0), MMDIT, 3, 4)]


def test_other_architectures_are_rejected_naming_the_supported_families():
    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UnsupportedModelError, match=r"Unknown.*U-Net \(SD1.5/SD2/SDXL\), Flux, Flux.2, Chroma, SD3/SD3.5"):
        discover_transformer_blocks(Unknown().named_modules())


def test_dit_block_selection():
    blocks = discover_transformer_blocks(ToyFlux().named_modules())
    assert parse_block_selection("double, single:2", blocks) == {("double", 0, 0), ("double", 1, 0), ("single", 2, 0)}
    with pytest.raises(ValueError, match="name is double, single for this model"):
        parse_block_selection("input", blocks)
    with pytest.raises(ValueError, match="this model has: double:0, double:1, single:0"):
        parse_block_selection("single:9", blocks)


def test_block_selection():
    blocks = discover_transformer_blocks(ToyUNet().named_modules())
    assert parse_block_selection("", blocks) == {b.key for b in blocks}
    assert parse_block_selection("middle, input:1.1", blocks) == {("middle", 0, 0), ("input", 1, 1)}
    assert parse_block_selection("output:0", blocks) == {("output", 0, 0)}
    with pytest.raises(ValueError, match="matches no transformer block"):
        parse_block_selection("output:7", blocks)
    with pytest.raises(ValueError, match="not of the form"):
        parse_block_selection("down_blocks", blocks)


def official_switch_vector(total, level):
    """StyleAligned's `_get_switch_vec`: True = layer does NOT share."""
    if level == 0:
        return [False] * total
    if level == 1:
        return [True] * total
    flip = level > 0.5
    level = 1 - level if flip else level
    period = total // int(level * total)
    vec = [i % period == 0 for i in range(total)]
    return [not x for x in vec] if flip else vec


@pytest.mark.parametrize("total", [16, 70])
@pytest.mark.parametrize("level", [0.0, 0.1, 0.25, 0.5, 0.6, 0.9, 1.0])
def test_skip_fraction_mirrors_official_switch_vector(total, level):
    keys = [("input", i, 0) for i in range(total)]
    kept = evenly_skipped(keys, level)
    switched_off = official_switch_vector(total, level)
    assert kept == {k for k, off in zip(keys, switched_off, strict=True) if not off}


def test_reinsertion_schedule_follows_official_offset():
    # spec 5.2: step 0 -> zts[5]; steps 1..6 -> zts[6]; from step 6 on -> zts[step]
    assert [reinsertion_index(step, 5, 50) for step in range(9)] == [5, 6, 6, 6, 6, 6, 6, 7, 8]
    assert reinsertion_index(49, 5, 50) == 49
    assert reinsertion_index(3, 0, 50) == 3


def test_schedule_step_maps_intermediate_sigmas_to_their_step():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [schedule_step(sigmas, s) for s in (10.0, 5.0, 2.0, 1.0)] == [0, 1, 2, 3]
    assert schedule_step(sigmas, 7.0) == 0 and schedule_step(sigmas, 1.5) == 2


def scaled_linear_alphas_cumprod(steps=1000, start=0.00085, end=0.012):
    betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class ToyEpsUNet:
    """A non-linear ε-model of (VP latent, integer timestep): it reacts to the scale of its input."""

    def __init__(self, channels=4):
        gen = torch.Generator().manual_seed(3)
        self.mix = torch.randn(channels, channels, generator=gen, dtype=torch.float64) / channels ** 0.5

    def __call__(self, z, t):
        mixed = torch.einsum("dc,bchw->bdhw", self.mix, z)
        return torch.tanh(1.5 * mixed) * (1 + t / 1000) + 0.3 * z ** 2 - 0.2 * z


def comfy_eps_denoiser(eps_model, alphas_cumprod):
    """What ComfyUI's discrete ε-model call does with (x, σ): nearest timestep, input x/√(1+σ²), x − σ·ε."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()

    def denoise(x, sigma):
        t = int((sigma[0].log() - log_sigmas).abs().argmin())
        return x - sigma.view(-1, 1, 1, 1) * eps_model(x / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5, t)
    return denoise


def test_inversion_equals_the_official_vp_ddim_loop_on_a_nonlinear_model():
    alphas_cumprod = scaled_linear_alphas_cumprod()
    sigma_table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    timesteps = list(range(1, 1000, 100))  # ComfyUI's ddim_uniform at 10 steps: 1, 101, ..., 901
    sigmas = torch.cat([sigma_table[timesteps].flip(0), torch.zeros(1, dtype=torch.float64)])
    eps_model = ToyEpsUNet()
    clean = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    ref = invert_eps(comfy_eps_denoiser(eps_model, alphas_cumprod), clean, sigmas, sigma_table[0])
    official = official_ddim_inversion(eps_model, clean, timesteps, alphas_cumprod)
    assert ref.latents.shape == official.shape == (11, 4, 3, 3)
    assert torch.equal(ref.latents[-1], clean[0])
    # ComfyUI's sampler latent at σ is the VP latent times √(1 + σ²)
    official_sigma_space = official * (1 + sigmas.view(-1, 1, 1, 1) ** 2) ** 0.5
    assert (ref.latents - official_sigma_space).abs().max() <= 1e-10 * official_sigma_space.abs().max()


def test_reference_rejects_another_schedule():
    ref = StyleReference(latents=torch.zeros(4, 4, 2, 2), sigmas=torch.tensor([4.0, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="3-step schedule"):
        ref.latent_for(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]), 4.0, 1)
    assert ref.latent_for(torch.tensor([4.0, 2.0, 1.0, 0.0]), 2.0, 0) is not None


class ToyVelocityModel:
    """A non-linear rectified-flow velocity model v(x, σ): the x0 prediction of ComfyUI's CONST call is x − σ·v."""

    def __init__(self, channels=4):
        gen = torch.Generator().manual_seed(5)
        self.mix = torch.randn(channels, channels, generator=gen, dtype=torch.float64) / channels ** 0.5

    def __call__(self, x, sigma):
        mixed = torch.einsum("dc,bchw->bdhw", self.mix, x)
        return 0.3 * torch.tanh(mixed) * (1 + sigma) + 0.1 * x ** 2 - 0.2 * x

    def denoise(self, x, sigma_batch):
        return x - sigma_batch.view(-1, 1, 1, 1) * self(x, sigma_batch.view(-1, 1, 1, 1))


def euler_sampling(velocity, x, sigmas):
    """ComfyUI's sample_euler on a CONST model, written out: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i)."""
    for i in range(len(sigmas) - 1):
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
    return x


@pytest.mark.parametrize("steps", [10, 40])
def test_flow_inversion_runs_the_euler_ode_backwards_and_regenerates_the_latent(steps):
    """Each inverted step undoes one Euler sampling step up to the velocity being taken at the less noisy
    latent; sampling the inverted noise with Euler gives the clean latent back, closer with more steps."""
    model = ToyVelocityModel()
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    clean = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = invert_flow(model.denoise, clean, sigmas)
    assert reference.latents.shape == (steps + 1, 4, 3, 3) and torch.equal(reference.latents[-1], clean[0])
    for k in range(steps):  # latents[k] is at sigmas[k]; one sampling step from it, with the velocity where the
        step = sigmas[k + 1] - sigmas[k]  # inversion took it, lands exactly on latents[k + 1]
        x_next = reference.latents[k:k + 1] + step * model(reference.latents[k + 1:k + 2], sigmas[k])
        torch.testing.assert_close(x_next, reference.latents[k + 1:k + 2], rtol=1e-12, atol=1e-12)
    regenerated = euler_sampling(model, reference.latents[:1], sigmas)
    error = ((regenerated - clean).norm() / clean.norm()).item()
    assert error < 0.2 / steps  # first order in the step: measured 0.98 % at 10 steps, 0.25 % at 40
