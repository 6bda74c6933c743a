"""RealCustomTrainer on the tiny Flux dev and SD3.5 Large (harness.dit): the flow-matching loss of the model's own
CONST sampling, learning on a fixed probe, bit-exact resume after a cancel, and an export that RealCustomLoader
reloads to the same model output, with its family recorded."""
import pytest
import torch
from harness import dit
from harness.comfy_env import models_dir, pack_module
from harness.pack_nodes import run_node, user_cancels_at_step
from safetensors import safe_open
from safetensors.torch import load_file

CAPTIONS = "a photo of a red toy\na photo of a blue toy"


def dataset():
    """Two 64 px images: a red and a blue square on grey."""
    images = torch.full((2, 64, 64, 3), 0.5)
    images[0, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    images[1, 8:40, 24:56] = torch.tensor([0.1, 0.1, 0.9])
    return images


class Family(dit.TinyFamily):
    def __init__(self, name):
        super().__init__(name)
        self.vae = dit.vae()

    def train(self, name, steps=3, **overrides):
        from harness.realcustom import tiny_clip_vision
        inputs = dict(model=self.model, clip=self.clip, vae=self.vae, clip_vision=tiny_clip_vision(), images=dataset(),
                      captions=CAPTIONS, name=name, steps=steps, learning_rate=1e-3, batch_size=2, grad_accumulation=1,
                      resolution=64, seed=0, checkpoint_every=1, crop=False)
        return run_node("RealCustomTrainer", **{**inputs, **overrides})


@pytest.fixture(scope="module", params=["flux", "sd35"])
def family(request, comfy):
    yield Family(request.param)
    dit.release(request.param)


def test_flow_loss_is_the_velocity_mse_of_comfys_const_sampling(comfy):
    """The noisy input is ComfyUI's CONST noise_scaling and the prediction the inverse of its calculate_denoised,
    so the target of the true x0 is the velocity noise - x0 that rectified flow trains."""
    import comfy.model_sampling
    losses = pack_module("training.losses")
    const = comfy.model_sampling.CONST()
    gen = torch.Generator().manual_seed(0)
    x0, noise, velocity = (torch.randn(3, 16, 4, 4, generator=gen) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x_t = losses.add_noise(x0, noise, sigma, losses.FLOW)
    torch.testing.assert_close(x_t, const.noise_scaling(sigma, noise, x0))
    denoised = const.calculate_denoised(sigma, velocity, x_t)
    torch.testing.assert_close(losses.prediction_from_denoised(losses.FLOW, x_t, denoised, sigma), velocity)
    torch.testing.assert_close(losses.prediction_from_denoised(losses.FLOW, x_t, x0, sigma), noise - x0)


@pytest.mark.slow
@pytest.mark.parametrize("adaptive_scoring, word_mask", [(False, False), (True, False)],
                         ids=["released", "paper scoring"])
def test_loss_decreases_on_the_same_noise_and_timesteps(family, adaptive_scoring, word_mask):
    from harness.realcustom import tiny_clip_vision
    from harness.training_probes import probe_loss
    glue = pack_module("nodes.training_glue")
    trainer = pack_module("nodes.realcustom_trainer")
    loop = pack_module("training.loop")
    with glue.training_mode():
        adapter, step = trainer.prepare_training(family.model, family.clip, family.vae, tiny_clip_vision(), dataset(),
                                                 CAPTIONS.split("\n"), 64, False, 2, 0, adaptive_scoring,
                                                 ["toy", "toy"], word_mask)
        assert step.prediction == "flow" and adapter.family.file_tag == ("flux" if family.name == "flux" else "sd3")
        assert (adapter.scoring is not None) == adaptive_scoring

        before = probe_loss(step, 10_000, 3, seed=7)  # fixed micro-steps the training never draws (steps 10_000+)
        loop.train(dict(adapter.named_parameters()), step, lambda p: torch.optim.AdamW(p, lr=3e-3),
                   loop.LoopSettings(steps=16, seed=0))
        after = probe_loss(step, 10_000, 3, seed=7)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_interrupt_then_resume_equals_uninterrupted_and_the_export_reloads_to_the_same_output(family):
    """With the node's defaults (adaptive scoring) and word-mask training: each step's word masks are read in the
    joint softmax of the frozen DiT; the word masks output has the training size."""
    from harness.checkpoints import encode_prompt, sample
    from harness.realcustom import tiny_clip_vision
    adapter, name, word_masks, _ = family.train(f"test_rc_{family.name}_straight", target_words="toy",
                                                word_mask_training=True)
    assert word_masks.shape == (2, 64, 64) and float(word_masks.min()) < 0.5 < float(word_masks.max())
    path = models_dir() / "realcustom" / name
    straight = load_file(str(path))
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["family"] == ("flux" if family.name == "flux" else "sd3")
    assert (metadata["branch_layout"], metadata["branch_rank"], metadata["branch_blocks"]) == \
        ("shared + low-rank", "16", "all"), "the DiTs' default branch, recorded"
    assert set(straight) == set(adapter.adapter.state_dict())
    assert not any(".to_k_vision." in k for k in straight) and any(k.startswith("branch.k_change.") for k in straight)
    assert any(k.startswith("scoring.") for k in straight), "the paper's adaptive scoring is trained by default"

    with user_cancels_at_step(1):
        family.train(f"test_rc_{family.name}_resumed", target_words="toy", word_mask_training=True)
    _, resumed_name, *_ = family.train(f"test_rc_{family.name}_resumed", target_words="toy", word_mask_training=True)
    resumed = load_file(str(models_dir() / "realcustom" / resumed_name))
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key

    loaded = run_node("RealCustomLoader", adapter_name=name)[0]
    assert loaded.adapter.family is adapter.adapter.family and loaded.adapter.branch.layout == "shared + low-rank"
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    positive, negative = encode_prompt(family.clip, "a photo of a toy"), encode_prompt(family.clip, "")
    outputs = []
    for source in (adapter, loaded):
        reference = run_node("RealCustomEncodeReference", adapter=source, clip_vision=tiny_clip_vision(), image=image,
                             crop=False)[0]
        patched, _ = run_node("AdaptiveMaskGuidance", model=family.model, reference=reference, clip=family.clip,
                              prompt="a photo of a toy", word="toy", mask_strategy="max_norm", mask_scope=0.25,
                              binary_mask=False, update_fraction=1.0, map_source="text-only pass",
                              uncond_image="black image", strength=1.0)
        outputs.append(sample(patched, positive, negative, dit.empty_latent(1), seed=3, steps=2, cfg=2.0,
                              sampler_name="euler", scheduler="simple"))
    assert torch.equal(outputs[0], outputs[1])
    plain = sample(family.model, positive, negative, dit.empty_latent(1), seed=3, steps=2, cfg=2.0,
                   sampler_name="euler", scheduler="simple")
    assert not torch.equal(outputs[0], plain), "the trained branch adds something"


def test_the_branch_serves_the_selected_blocks_in_the_chosen_layout(family):
    """branch_blocks (PVA's selection) picks the blocks before the adapter is made: its file holds only theirs."""
    from harness.realcustom import tiny_clip_vision
    glue = pack_module("nodes.training_glue")
    trainer = pack_module("nodes.realcustom_trainer")

    def branch(**settings):
        with glue.training_mode():
            return trainer.prepare_training(family.model, family.clip, family.vae, tiny_clip_vision(), dataset(),
                                            CAPTIONS.split("\n"), 64, False, 2, 0, **settings)[0].branch
    every_2 = branch(branch_layout="per-block", branch_blocks="every_2")
    expected = [("double", 0, 0), ("single", 0, 0)] if family.name == "flux" else [("joint", 0, 0), ("joint", 2, 0)]
    assert every_2.layout == "per-block" and every_2.blocks() == expected
    double = branch(branch_rank=4, branch_blocks="double")
    assert double.layout == "shared + low-rank" and double.rank == 4
    assert double.blocks() == ([("double", 0, 0), ("double", 1, 0)] if family.name == "flux" else
                               [("joint", i, 0) for i in range(3)]), "the two-stream blocks: all of SD3's"
