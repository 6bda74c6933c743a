"""The shared ComfyUI training glue (nodes/training_glue.py) in the real ComfyUI on the tiny SD1.5."""
from __future__ import annotations

import os

import pytest
import torch

from harness.checkpoints import encode_prompt
from harness.comfy_env import models_dir, pack_module

KEY = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def glue(comfy):
    return pack_module("nodes.training_glue")


@pytest.fixture(scope="module")
def exporters(comfy):
    return pack_module("training.exporters")


@pytest.fixture(scope="module")
def inference_mode_sd15(comfy):
    """The tiny SD1.5 loaded as the executor loads it: under inference_mode, so its weights are
    inference tensors that autograd cannot save."""
    from harness.checkpoints import load_sd15
    with torch.inference_mode():
        return load_sd15()


@pytest.fixture
def embedding_name():
    name = f"glue_test_{os.getpid()}"
    yield name
    (models_dir() / "embeddings" / f"{name}.safetensors").unlink(missing_ok=True)


def test_placeholder_prompt_encodes_like_stock_embedding_and_passes_gradients(glue, exporters, inference_mode_sd15,
                                                                              embedding_name):
    _, clip, _ = inference_mode_sd15
    vector = torch.randn(2, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    exporters.save_embedding(models_dir() / "embeddings" / f"{embedding_name}.safetensors", vector)
    text = f"photo of a embedding:{embedding_name} dog"
    stock = encode_prompt(clip, text)[0][0]
    with glue.training_mode():
        prompt = glue.PlaceholderPrompt(clip, text, {embedding_name: 2})
        assert prompt.positions("l", embedding_name) == [4, 5]  # SOT photo of a <v0> <v1> dog
        live = vector.clone().requires_grad_(True)
        cond, _ = glue.TrainableTextEncoder(clip).encode(prompt.substitute({embedding_name: {"clip_l": live}}))
        assert torch.allclose(cond, stock, atol=1e-5)
        # "dog" sees the vectors through causal attention (a plain sum would be 0 after the final LayerNorm)
        (cond[0, 6] * torch.linspace(-1, 1, 768)).sum().backward()
    assert live.grad is not None and live.grad.abs().sum() > 0
    in_memory = glue.clip_with_embeddings(clip, {embedding_name: {"clip_l": vector}})
    assert torch.allclose(encode_prompt(in_memory, text)[0][0], stock, atol=1e-6)


def test_missing_placeholder_is_a_clear_error(glue, sd15):
    with pytest.raises(ValueError, match="must contain embedding:absent"):
        glue.PlaceholderPrompt(sd15[1], "photo of a dog", {"absent": 1})


def test_trainable_unet_gradients_and_baked_diff_match_stock_lora_loader(glue, exporters, comfy, inference_mode_sd15,
                                                                        tmp_path):
    model, clip, _ = inference_mode_sd15
    nodes = comfy.nodes
    context = encode_prompt(clip, "a dog")[0][0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([2.0])
    with glue.training_mode():
        delta = glue.WeightDelta(model.get_model_object(KEY[:-len(".weight")]).weight.shape)
        trained = glue.trainable_unet(model, {KEY: delta})
        out = glue.denoise(trained, x.clone(), sigma, glue.clone_tensors(context))
        out.square().mean().backward()
        assert delta.diff.grad is not None and delta.diff.grad.abs().sum() > 0
        with torch.no_grad():
            delta.diff.copy_(torch.randn(delta.diff.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
            live = glue.denoise(trained, x.clone(), sigma, context.clone())
    assert glue.prediction_kind(model) == "eps" and glue.discrete_sigmas(model).shape == (1000,)

    name = f"glue_test_{os.getpid()}.safetensors"
    path = models_dir() / "loras" / name
    exporters.save_lora(path, {KEY: delta.diff})
    try:
        stock = nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        baked = glue.with_weight_deltas(model, {KEY: delta.diff})
        for patched in (stock, baked):
            import comfy.model_management
            comfy.model_management.load_models_gpu([patched])
            with torch.no_grad():
                result = glue.denoise(patched, x.clone(), sigma, context.clone())
            assert (result - live).abs().max() <= 1e-4
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("weights, cast, bf16_device, expected", [
    (torch.float32, None, True, torch.float32),          # ComfyUI on the CPU, or a full-precision load
    (torch.bfloat16, None, False, torch.bfloat16),        # Flux / SD3.5 as ComfyUI loads them on a recent GPU
    (torch.float16, None, True, torch.bfloat16),          # SD1.5/SDXL in fp16: no loss scaling in bf16
    (torch.float16, None, False, torch.float32),          # ... on a GPU without bf16
    (torch.float8_e4m3fn, torch.bfloat16, True, torch.bfloat16),  # fp8 weights cast to bf16 for compute
    (torch.float8_e4m3fn, torch.float16, False, torch.float32),
])
def test_training_computes_in_the_loaded_dtype_where_it_needs_no_loss_scaling(glue, monkeypatch, weights, cast,
                                                                           bf16_device, expected):
    import comfy.model_management
    from types import SimpleNamespace
    model = SimpleNamespace(load_device=torch.device("cpu"),
                            model=SimpleNamespace(manual_cast_dtype=cast, get_dtype=lambda: weights))
    monkeypatch.setattr(comfy.model_management, "should_use_bf16", lambda *args, **kwargs: bf16_device)
    assert glue.training_compute_dtype(model) is expected


def test_the_trainable_clone_of_a_model_loaded_in_fp32_computes_in_fp32(glue, sd15):
    model = sd15[0]
    with glue.training_mode():
        trainable = glue.trainable_unet(model, {})
    assert trainable.model.manual_cast_dtype is torch.float32
