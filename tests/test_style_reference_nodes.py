"""Real reference image: DDIM inversion and re-insertion of image 0, in the real ComfyUI."""
import pytest
import torch

from harness.checkpoints import empty_latent, encode_prompt, sample
from harness.comfy_env import pack_module
from harness.official_inversion import official_ddim_inversion
from harness.pack_nodes import run_node, shared_attention

STEPS = 4


@pytest.fixture(scope="module")
def setup(comfy, sd15):
    model, clip, vae = sd15
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    latent = comfy.nodes.VAEEncode().encode(vae, pixels)[0]
    positive, negative = encode_prompt(clip, "a toy train, origami"), encode_prompt(clip, "")
    reference = run_node("SharedAttentionInvertReference", model=model, positive=positive, negative=negative,
                         latent=latent, steps=STEPS, scheduler="ddim_uniform", cfg=2.0)[0]
    return model, positive, negative, latent, reference


def test_inversion_covers_the_sampling_schedule(comfy, setup):
    from comfy import samplers

    model, _pos, _neg, latent, reference = setup
    expected_sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", STEPS)
    assert torch.allclose(reference.sigmas, expected_sigmas.float().cpu())
    assert reference.latents.shape == (STEPS + 1, 4, 8, 8)
    clean = model.get_model_object("latent_format").process_in(latent["samples"])[0]
    assert torch.equal(reference.latents[-1], clean)
    assert torch.isfinite(reference.latents).all()
    # noisier along the inverted trajectory
    assert reference.latents[0].std() > reference.latents[-1].std()


def test_inversion_equals_the_official_loop_run_on_the_unet(comfy, setup):
    """The official inversion (inversion.py) driving the tiny SD1.5's U-Net directly: it sees the VP latent z
    and the integer timestep, CFG 2 on ε, the clean latent taken at ᾱ_0. The node's trajectory is that z at
    each sampling level times √(1 + σ²) (ComfyUI's sampler space)."""
    import comfy.model_management

    model, positive, negative, _latent, reference = setup
    sampling = model.get_model_object("model_sampling")
    alphas_cumprod = 1 / (1 + sampling.sigmas.double() ** 2)
    timesteps = list(range(1, 1000, 1000 // STEPS))  # ddim_uniform: every (1000/steps)-th timestep from 1
    assert torch.equal(reference.sigmas[:-1].flip(0), sampling.sigmas[timesteps].float())
    comfy.model_management.load_models_gpu([model])
    unet, dtype = model.model.diffusion_model, model.model.get_dtype()
    context = torch.cat([negative[0][0], positive[0][0]]).to(dtype)

    def guided_eps(z, t):
        with torch.no_grad():
            uncond, cond = unet(z.repeat(2, 1, 1, 1).to(dtype), torch.full((2,), float(t)), context=context).double().chunk(2)
        return uncond + 2.0 * (cond - uncond)

    z0 = reference.latents[-1:].double()
    official = official_ddim_inversion(guided_eps, z0, timesteps, alphas_cumprod)
    sigmas = reference.sigmas.double().view(-1, 1, 1, 1)
    expected = (official * (1 + sigmas ** 2) ** 0.5).float()
    assert (reference.latents - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_image_zero_follows_the_trajectory_in_every_pass(comfy, setup):
    from comfy import patcher_extension

    model, positive, negative, _latent, reference = setup
    offset = 1
    patched = run_node("SharedAttentionApplyReference", model=model, reference=reference, offset=offset)[0]
    seen = []

    def record_inputs(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        chunks = len(transformer_options["cond_or_uncond"])
        seen.append((float(t.max()), x.view(chunks, -1, *x.shape[1:])[:, 0].clone()))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    patched.add_wrapper_with_key(patcher_extension.WrappersMP.APPLY_MODEL, "test.record", record_inputs)
    out = sample(patched, positive, negative, empty_latent(3), seed=1, steps=STEPS, sampler_name="ddim",
                 scheduler="ddim_uniform")
    assert out.shape == (3, 4, 8, 8)
    style_reference = pack_module("attention.style_reference")
    assert len(seen) == STEPS
    for step, (_sigma, rows) in enumerate(seen):
        expected = reference.latents[style_reference.reinsertion_index(step, offset, STEPS)]
        assert rows.shape[0] == 2  # cond and uncond pass
        for row in rows:
            assert torch.equal(row, expected)


def test_mismatched_size_and_schedule_are_clear_errors(comfy, setup):
    model, positive, negative, latent, reference = setup
    patched = run_node("SharedAttentionApplyReference", model=model, reference=reference, offset=1)[0]
    with pytest.raises(ValueError, match="encode the reference at the size you generate"):
        sample(patched, positive, negative, empty_latent(2, 96, 96), steps=STEPS, scheduler="ddim_uniform")
    with pytest.raises(ValueError, match="same steps and scheduler"):
        sample(patched, positive, negative, empty_latent(2), steps=STEPS + 2, scheduler="ddim_uniform")
    with pytest.raises(ValueError, match="exceeds the 4 inverted steps"):
        run_node("SharedAttentionApplyReference", model=model, reference=reference, offset=9)
    two = {"samples": latent["samples"].repeat(2, 1, 1, 1)}
    with pytest.raises(ValueError, match="must hold one image"):
        run_node("SharedAttentionInvertReference", model=model, positive=positive, negative=negative,
                 latent=two, steps=STEPS, scheduler="ddim_uniform", cfg=2.0)
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM
    edm = ModelSamplingContinuousEDM().patch(model, "edm", 80.0, 0.002)[0]  # σ_data 0.5: neither VP nor flow
    with pytest.raises(ValueError, match="variance-preserving schedule.*or rectified flow.*ModelSamplingAdvanced"):
        run_node("SharedAttentionInvertReference", model=edm, positive=positive, negative=negative,
                 latent=latent, steps=STEPS, scheduler="ddim_uniform", cfg=2.0)


def test_styled_batch_with_reference_runs_with_shared_attention(comfy, setup):
    model, positive, negative, _latent, reference = setup
    shared = shared_attention(model, shared_score_shift=0.693, share_group_norm=True)
    with_reference = run_node("SharedAttentionApplyReference", model=shared, reference=reference, offset=2)[0]
    out = sample(with_reference, positive, negative, empty_latent(3), seed=3, steps=STEPS, scheduler="ddim_uniform")
    text_only = sample(shared, positive, negative, empty_latent(3), seed=3, steps=STEPS, scheduler="ddim_uniform")
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[1:], text_only[1:], atol=1e-3)
