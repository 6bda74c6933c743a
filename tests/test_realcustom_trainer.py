"""RealCustomTrainer on the tiny SD1.5: learning, resume, export loadable by RealCustomLoader."""
import pytest
import torch
from harness.comfy_env import models_dir, pack_module
from harness.pack_nodes import run_node, user_cancels_at_step
from safetensors.torch import load_file

CAPTIONS = "a photo of a red toy\na photo of a blue toy"


def dataset():
    """Two 64 px images: a red and a blue square on grey."""
    images = torch.full((2, 64, 64, 3), 0.5)
    images[0, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    images[1, 8:40, 24:56] = torch.tensor([0.1, 0.1, 0.9])
    return images


def train_node(sd15, name, steps=3, **overrides):
    from harness.realcustom import tiny_clip_vision
    model, clip, vae = sd15
    inputs = dict(model=model, clip=clip, vae=vae, clip_vision=tiny_clip_vision(), images=dataset(), captions=CAPTIONS,
                  name=name, steps=steps, learning_rate=1e-3, batch_size=2, grad_accumulation=1, resolution=64, seed=0,
                  checkpoint_every=1, crop=False)
    return run_node("RealCustomTrainer", **{**inputs, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("adaptive_scoring, word_mask", [(False, False), (True, False), (True, True)],
                         ids=["released", "paper scoring", "word-mask training"])
def test_loss_decreases_on_the_same_noise_and_timesteps(comfy, sd15, adaptive_scoring, word_mask):
    from harness.realcustom import tiny_clip_vision
    from harness.training_probes import probe_loss
    glue = pack_module("nodes.training_glue")
    trainer = pack_module("nodes.realcustom_trainer")
    loop = pack_module("training.loop")
    model, clip, vae = sd15
    with glue.training_mode():
        adapter, step = trainer.prepare_training(model, clip, vae, tiny_clip_vision(), dataset(), CAPTIONS.split("\n"),
                                                 32, False, 2, 0, adaptive_scoring, ["toy", "toy"], word_mask)
        assert (adapter.scoring is not None) == adaptive_scoring

        before = probe_loss(step, 10_000, 3, seed=7)  # fixed micro-steps the training never draws (steps 10_000+)
        loop.train(dict(adapter.named_parameters()), step, lambda p: torch.optim.AdamW(p, lr=1e-2),
                   loop.LoopSettings(steps=24, seed=0))
        after = probe_loss(step, 10_000, 3, seed=7)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("words", [{}, {"target_words": "red\nblue", "word_mask_training": True}],
                         ids=["paper", "word-mask training"])
def test_interrupt_then_resume_equals_uninterrupted_and_exports_a_loadable_adapter(comfy, sd15, words):
    suffix = "_words" if words else ""
    adapter, name, *_ = train_node(sd15, f"test_rc_straight{suffix}", **words)
    straight = load_file(str(models_dir() / "realcustom" / name))
    assert set(straight) == set(adapter.adapter.state_dict())
    assert any(k.startswith("scoring.") for k in straight), "the paper's adaptive scoring is trained by default"

    with user_cancels_at_step(1):
        train_node(sd15, f"test_rc_resumed{suffix}", **words)
    _, resumed_name, *_ = train_node(sd15, f"test_rc_resumed{suffix}", **words)
    resumed = load_file(str(models_dir() / "realcustom" / resumed_name))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    loaded = run_node("RealCustomLoader", adapter_name=name)[0]
    assert loaded.adapter.format_name == "realcustom.clip_vision"


def test_word_mask_training_gates_the_branch_with_each_captions_word_mask(comfy, sd15):
    """[R] word_mask_training: the branch (and the scoring latent) see the word's top-25% mask of the step's
    own noisy latent; with a mask that keeps everything it is exactly the paper's ungated step."""
    from harness.realcustom import tiny_clip_vision
    glue = pack_module("nodes.training_glue")
    trainer = pack_module("nodes.realcustom_trainer")
    loop = pack_module("training.loop")
    rc_training = pack_module("training.realcustom")
    MaskSettings = pack_module("attention.realcustom").MaskSettings
    model, clip, vae = sd15
    with glue.training_mode():
        adapter, masked = trainer.prepare_training(model, clip, vae, tiny_clip_vision(), dataset(), CAPTIONS.split("\n"),
                                                   64, False, 2, 0, True, ["red", "toy"], True)
        assert masked.data.word_indicators.sum(1).tolist() == [1.0, 1.0]
        assert masked.data.word_indicators[0].argmax() != masked.data.word_indicators[1].argmax(), "each caption its word"
        with torch.no_grad():  # a branch that adds something (the fresh one starts at zero)
            for projection in adapter.branch.to_v_vision.values():
                projection.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))

        def variant(settings):
            return rc_training.RealCustomStep(masked.data, masked.projector, masked.denoise, masked.sigmas,
                                              masked.prediction, masked.batch_size, masked.scoring, settings)
        gates = []
        denoise = masked.denoise

        def recording_denoise(x_t, sigma, context, pooled, run):
            if isinstance(run, rc_training.TrainingRun):
                gates.append(run.mask)
            return denoise(x_t, sigma, context, pooled, run)
        masked.denoise = recording_denoise
        with torch.no_grad():
            micro = lambda: loop.MicroStep(0, 0, loop.micro_step_generator(3, 0, 0))  # noqa: E731
            gated = float(masked(micro()))
            keep_all = float(variant(MaskSettings(scope=1.0, binary=True))(micro()))
            ungated = float(variant(None)(micro()))
    gate, keep_all_gate, ungated_gate = gates
    # SD1.5's largest cross-attention maps have the latent's size (8×8 at 64 px): the mask grid (paper §3.3)
    assert torch.equal(keep_all_gate, torch.ones(2, 8, 8)) and torch.equal(ungated_gate, torch.ones(2, 1, 1))
    assert gate.shape == (2, 8, 8) and ((gate > 0).flatten(1).sum(1) == 16).all(), "top 25% of the 8×8 mask grid"
    assert keep_all == pytest.approx(ungated, rel=1e-6, abs=1e-9)
    assert gated != pytest.approx(ungated, rel=1e-4)


def slow_attention(q, k, v, heads):
    """softmax(Q Kᵀ/√d) V per head, the softmax written out."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype)
    d = q.shape[2] // heads
    for h in range(heads):
        part = slice(h * d, (h + 1) * d)
        logits = q[..., part] @ k[..., part].transpose(1, 2) / d ** 0.5
        weights = (logits - logits.amax(-1, keepdim=True)).exp()
        out[..., part] = weights / weights.sum(-1, keepdim=True) @ v[..., part]
    return out


def test_a_steps_loss_is_the_eps_mse_of_the_unet_with_the_image_branch(comfy, sd15):
    """Paper eq. 4, the training forward: in every cross-attention layer the frozen text attention plus the
    ungated image attention, softmax(Q K_iᵀ/√d) V_i with K_i, V_i = to_k/v_vision(LayerNorm(Linear(features))),
    before the layer's to_out; the loss is the ε-MSE of that U-Net. The reference U-Net here is the stock
    model with an attn2 replace written in this test (not the pack's dispatcher or processors)."""
    import comfy.model_management
    from harness.realcustom import tiny_clip_vision
    glue = pack_module("nodes.training_glue")
    trainer = pack_module("nodes.realcustom_trainer")
    loop = pack_module("training.loop")
    model, clip, vae = sd15
    with glue.training_mode():
        adapter, step = trainer.prepare_training(model, clip, vae, tiny_clip_vision(), dataset(), CAPTIONS.split("\n"),
                                                 32, False, 2, 0, False)
        with torch.no_grad():  # a branch that adds something (the fresh one's values start at zero)
            for projection in adapter.branch.to_v_vision.values():
                projection.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        seen = {}
        denoise = step.denoise

        def recording_denoise(x_t, sigma, context, pooled, run):
            seen.update(x_t=x_t, sigma=sigma, context=context)
            return denoise(x_t, sigma, context, pooled, run)
        step.denoise = recording_denoise
        with torch.no_grad():
            loss = float(step(loop.MicroStep(0, 0, loop.micro_step_generator(5, 0, 0))))

    data = step.data
    x_t, sigma, context = (seen[k].detach().float().cpu() for k in ("x_t", "sigma", "context"))
    rows = [next(r for r in range(2) if torch.equal(context[i], data.contexts[r].cpu())) for i in range(2)]
    x0, features = data.latents[rows].float().cpu(), data.features[rows].float().cpu()
    noise = (x_t - x0) / sigma.view(-1, 1, 1, 1)
    linear, norm = adapter.projector.proj, adapter.projector.norm
    hidden = features @ linear.weight.detach().cpu().T + linear.bias.detach().cpu()
    mean = hidden.mean(-1, keepdim=True)
    variance = ((hidden - mean) ** 2).mean(-1, keepdim=True)
    tokens = (hidden - mean) / (variance + norm.eps).sqrt() * norm.weight.detach().cpu() + norm.bias.detach().cpu()

    def text_plus_image(q, k, v, extra_options):
        name = "_".join(map(str, (*extra_options["block"], extra_options["block_index"])))
        to_k, to_v = (getattr(adapter.branch, f"to_{p}_vision")[name].weight.detach().float().cpu() for p in "kv")
        heads = extra_options["n_heads"]
        text = slow_attention(q.float(), k.float(), v.float(), heads)
        return (text + slow_attention(q.float(), tokens @ to_k.T, tokens @ to_v.T, heads)).to(q.dtype)

    reference = model.clone()
    for name in adapter.branch.to_k_vision:
        kind, block_id, index = name.split("_")
        reference.set_model_attn2_replace(text_plus_image, kind, int(block_id), int(index))
    comfy.model_management.load_models_gpu([reference])
    with torch.no_grad():
        denoised = reference.model.apply_model(x_t, sigma, c_crossattn=context,
                                               transformer_options=dict(reference.model_options["transformer_options"]))
    eps_hat = (x_t - denoised.float().cpu()) / sigma.view(-1, 1, 1, 1)
    expected = float(((eps_hat - noise) ** 2).mean())
    assert loss == pytest.approx(expected, rel=1e-4)
    branchless = model.clone()
    comfy.model_management.load_models_gpu([branchless])
    with torch.no_grad():
        plain = branchless.model.apply_model(x_t, sigma, c_crossattn=context)
    plain_loss = float(((((x_t - plain.float().cpu()) / sigma.view(-1, 1, 1, 1)) - noise) ** 2).mean())
    assert plain_loss != pytest.approx(expected, rel=1e-3), "the branch changes the prediction"


def test_target_words_are_previewed_on_the_training_images(comfy, sd15):
    trainer = pack_module("nodes.realcustom_trainer")
    *_, masks, preview = train_node(sd15, "test_rc_words", steps=1, target_words="toy")
    assert masks.shape == (2, 64, 64) and preview.shape == (2, 64, 64, 3)
    assert 0.0 <= float(masks.min()) and float(masks.max()) <= 1.0 and float(masks.min()) < 0.5
    square = trainer._square(dataset(), 64)
    assert torch.allclose(preview, square * (trainer.PREVIEW_DIM + (1 - trainer.PREVIEW_DIM) * masks[..., None]))
    *_, other_masks, _ = train_node(sd15, "test_rc_words", steps=1, target_words="photo")
    assert not torch.allclose(masks, other_masks), "another word covers another area"
    *_, no_word_masks, no_word_preview = train_node(sd15, "test_rc_words", steps=1)
    assert torch.equal(no_word_masks, torch.ones(2, 64, 64)) and torch.allclose(no_word_preview, square)


def test_sdxl_with_an_sd15_text_encoder_is_refused_with_a_reason(comfy, sdxl_model, sd15):
    with pytest.raises(ValueError, match="2048-wide text.*CLIP gives 768"):
        train_node((sdxl_model, sd15[1], sd15[2]), "test_rc_sdxl_mismatch")


@pytest.mark.slow
def test_sdxl_branch_trains_and_guides_sdxl_sampling(comfy, sdxl_model, sd15):
    """The SDXL U-Net also reads the pooled caption and the size: the trainer feeds both. The branch is the shared +
    low-rank one that real SDXL gets by default (a per-block one would be 0.34 B numbers): one shared pair per
    attention width of the U-Net."""
    from harness.checkpoints import empty_latent, encode_prompt, sample
    from harness.realcustom import tiny_clip_vision
    from harness.text_encoders import reduced_clip
    clip = reduced_clip("sdxl")
    adapter, name, *_ = train_node((sdxl_model, clip, sd15[2]), "test_rc_sdxl", steps=2, target_words="toy",
                                   word_mask_training=True, branch_layout="shared + low-rank")
    assert adapter.adapter.scoring is not None and adapter.adapter.projector.proj.out_features == 2048
    branch = adapter.adapter.branch
    assert branch.layout == "shared + low-rank" and sorted(branch.shared_k, key=int) == \
        sorted({str(width) for width in branch.widths().values()}, key=int)
    reference = run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(), image=dataset()[:1],
                         crop=False)[0]
    prompt = "a photo of a toy on the beach"
    patched, masks = run_node("AdaptiveMaskGuidance", model=sdxl_model, reference=reference, clip=clip, prompt=prompt,
                              word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                              update_fraction=1.0, map_source="previous step", uncond_image="black image", strength=1.0)
    out = sample(patched, encode_prompt(clip, prompt), encode_prompt(clip, ""), empty_latent(1), steps=2)
    assert torch.isfinite(out).all() and len(masks.steps) == 2
    (models_dir() / "realcustom" / name).unlink()


def test_caption_count_must_match(comfy, sd15):
    with pytest.raises(ValueError, match="2 images but 3 captions"):
        train_node(sd15, "test_rc_captions", captions="a\nb\nc")
