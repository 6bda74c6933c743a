"""The DiT test harness (harness/dit.py) against the real ComfyUI: the tiny Flux and SD3.5 models are what
ComfyUI's own detection says they are, its stock samplers, guidance, text encoders, LoRA and ControlNet
nodes run them end to end, and their attention is not degenerate. If these fail, no DiT test built on the
harness can be trusted.

Each family is loaded by a class-scoped fixture and released when its class ends (harness.dit.release),
the pattern the suite uses to keep one family in memory at a time."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch

from harness import dit
from harness.checkpoints import encode_prompt, sample
from harness.tensors import relative_change

PROMPT, OTHER_PROMPT = "a photo of a cat", "an oil painting of a lighthouse"
SAMPLING = dict(steps=3, sampler_name="euler", scheduler="simple")


def _node(node_id: str, **inputs) -> tuple:
    """Run a stock V3 node (comfy_extras) in-process and return its outputs."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id].execute(**inputs).result


def _flux_guided(conditioning, guidance: float = 3.5):
    return _node("FluxGuidance", conditioning=conditioning, guidance=guidance)[0]


def _head_view(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """[B, heads, L, D] of an attention input as ComfyUI's attention functions read it."""
    if skip_reshape:  # Flux: already [B, H, L, D]
        return t.float()
    b, length = t.shape[:2]  # MMDiT: q, k [B, L, H*D]; v [B, L, H, D]
    return t.float().reshape(b, length, heads, -1).transpose(1, 2)


class AttentionProbe:
    """transformer_options["optimized_attention_override"] that records, for every attention call, the
    softmax probabilities written out (q k^T / sqrt(d)) and passes the call on unchanged; or, with
    ``uniform=True``, replaces the result by uniform attention (the mean of v), to measure how much the
    model's output depends on attention at all."""

    def __init__(self, uniform: bool = False):
        self.uniform = uniform
        self.calls: list[dict] = []

    def __call__(self, func, q, k, v, heads, *args, skip_reshape=False, **kwargs):
        qh, kh = _head_view(q, heads, skip_reshape), _head_view(k, heads, skip_reshape)
        logits = qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])
        probs = logits.softmax(-1)
        n_keys = probs.shape[-1]
        kl_from_uniform = (probs * (probs.clamp_min(1e-30) * n_keys).log()).sum(-1).mean()
        self.calls.append(dict(logit_std=logits.std().item(), kl=kl_from_uniform.item(),
                               block=(kwargs["transformer_options"].get("block_type"),
                                      kwargs["transformer_options"].get("block_index"))))
        if not self.uniform:
            return func(q, k, v, heads, *args, skip_reshape=skip_reshape, **kwargs)
        mean_v = _head_view(v, heads, skip_reshape).mean(-2, keepdim=True).expand(-1, -1, qh.shape[2], -1)
        if kwargs.get("skip_output_reshape"):
            return mean_v.to(v.dtype)
        b, h, length, d = mean_v.shape
        return mean_v.transpose(1, 2).reshape(b, length, h * d).to(v.dtype)


def _with_override(model, override):
    patched = model.clone()
    patched.model_options["transformer_options"] = dict(patched.model_options.get("transformer_options", {}),
                                                        optimized_attention_override=override)
    return patched


def _assert_attention_is_not_degenerate(model, positive, negative, cfg):
    probe = AttentionProbe()
    base = sample(model, positive, negative, dit.empty_latent(1), seed=4, cfg=cfg, **SAMPLING)
    assert torch.equal(base, sample(_with_override(model, probe), positive, negative, dit.empty_latent(1),
                                        seed=4, cfg=cfg, **SAMPLING)), "the probe must not change the output"
    assert probe.calls
    for call in probe.calls:
        assert call["logit_std"] > 0.5, call  # logits not all ~0
        assert call["kl"] > 0.1, call  # probabilities measurably not uniform (nats)
    uniform = sample(_with_override(model, AttentionProbe(uniform=True)), positive, negative,
                         dit.empty_latent(1), seed=4, cfg=cfg, **SAMPLING)
    assert relative_change(uniform, base) > 0.03, "the output barely depends on attention"
    return probe


def _lora_changes_output_and_every_key_loads(stock_comfy, model, family, positive, negative, cfg):
    import comfy.lora
    from safetensors.torch import load_file

    path = dit.lora_path(family)
    layers = {k[:-len(".lora_A.weight")] for k in load_file(str(path)) if k.endswith(".lora_A.weight")}
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert layers <= set(key_map), "ComfyUI's LoRA key map must know every layer name"
    target_of = {name: key_map[name][0] if isinstance(key_map[name], tuple) else key_map[name] for name in layers}
    model_keys = set(model.model.state_dict())
    present = [name for name in layers if target_of[name] in model_keys]
    targets = {target_of[name] for name in present}
    patched = stock_comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)[0]
    assert set(patched.patches) == targets and targets, "every LoRA layer of the model must be patched"
    assert not model.patches, "the loader must patch a clone"
    base = sample(model, positive, negative, dit.empty_latent(1), seed=3, cfg=cfg, **SAMPLING)
    with_lora = sample(patched, positive, negative, dit.empty_latent(1), seed=3, cfg=cfg, **SAMPLING)
    assert torch.isfinite(with_lora).all() and relative_change(with_lora, base) > 0.01
    return present, layers


@pytest.fixture(scope="class")
def flux(stock_comfy):
    """The tiny Flux dev for one test class, released (with the rest of the family) when the class ends."""
    yield dit.flux_model("dev")
    dit.release("flux")


@pytest.fixture(scope="class")
def flux_prompts(flux):
    clip = dit.flux_clip()
    return encode_prompt(clip, PROMPT), encode_prompt(clip, "")


@pytest.fixture(scope="class")
def sd35_prompts(stock_comfy):
    """CLIPTextEncode of the tiny SD3.5 text encoders; SD3.5 and the VAE are released when the class ends."""
    clip = dit.sd35_clip()
    yield encode_prompt(clip, PROMPT), encode_prompt(clip, "blurry")
    dit.release("sd35", "vae")


@pytest.mark.usefixtures("flux")
class TestFlux:
    @pytest.mark.parametrize("variant, config_class, guidance_key", [("dev", "Flux", True),
                                                                     ("schnell", "FluxSchnell", False)])
    def test_comfyui_detects_flux_from_the_real_keys(self, stock_comfy, variant, config_class, guidance_key):
        import comfy.model_base
        import comfy.model_detection
        import comfy.supported_models
        import comfy.utils

        sd = comfy.utils.load_torch_file(str(dit.flux_path(variant)))
        for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                    "double_blocks.1.img_attn.qkv.weight", "double_blocks.0.txt_attn.norm.key_norm.scale",
                    "single_blocks.1.linear1.weight", "final_layer.adaLN_modulation.1.weight"):
            assert key in sd
        assert ("guidance_in.in_layer.weight" in sd) is guidance_key
        detected = comfy.model_detection.model_config_from_unet(sd, "")
        assert type(detected) is getattr(comfy.supported_models, config_class)
        expected = dit.flux_config(variant)
        assert {k: detected.unet_config[k] for k in expected if k != "num_heads"} == \
            {k: v for k, v in expected.items() if k != "num_heads"}
        # ComfyUI pins 24 heads for Flux, so only a 3072-wide file builds through UNETLoader: the reason
        # the harness builds this model itself. If this starts failing, UNETLoader can load it directly.
        assert detected.unet_config["num_heads"] == 24
        with pytest.raises(ValueError, match="divisible by num_heads 24"):
            comfy.sd.load_diffusion_model_state_dict(sd)

        model = dit.flux_model(variant)
        assert type(model.model) is comfy.model_base.Flux
        assert type(model.model.model_config) is getattr(comfy.supported_models, config_class)
        assert model.model.diffusion_model.num_heads == 2 and model.model.diffusion_model.hidden_size == 256
        assert model.model.model_type == (comfy.model_base.ModelType.FLUX if variant == "dev"
                                          else comfy.model_base.ModelType.FLOW)

    def test_text_encoders_encode_a_real_prompt(self, flux, flux_prompts):
        import comfy.text_encoders.flux

        clip = dit.flux_clip()
        assert isinstance(clip.tokenizer, comfy.text_encoders.flux.FluxTokenizer)
        assert isinstance(clip.cond_stage_model, comfy.text_encoders.flux.FluxClipModel)
        positive, _ = flux_prompts
        context, extra = positive[0]
        assert context.shape == (1, 256, 4096) and extra["pooled_output"].shape == (1, 768)
        assert torch.isfinite(context).all()
        other = encode_prompt(clip, OTHER_PROMPT)[0]
        assert not torch.allclose(other[0], context) and not torch.allclose(other[1]["pooled_output"],
                                                                           extra["pooled_output"])
        assert torch.equal(encode_prompt(clip, PROMPT)[0][0], context)
        random = dit.conditioning("flux")[0]
        assert random[0].shape == context.shape and random[1]["pooled_output"].shape == extra["pooled_output"].shape

    def test_flux_guidance_and_ksampler_cfg1_sample_end_to_end(self, flux, flux_prompts):
        positive, negative = flux_prompts
        out = sample(flux, _flux_guided(positive), negative, dit.empty_latent(2), seed=1, cfg=1.0, **SAMPLING)
        assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()
        again = sample(flux, _flux_guided(positive), negative, dit.empty_latent(2), seed=1, cfg=1.0, **SAMPLING)
        assert torch.equal(out, again), "sampling must be deterministic for identity tests"
        stronger = sample(flux, _flux_guided(positive, 6.0), negative, dit.empty_latent(2), seed=1, cfg=1.0,
                              **SAMPLING)
        assert relative_change(stronger, out) > 1e-3, "guidance_in must feed the model"

    def test_sampler_custom_advanced_matches_ksampler(self, flux, flux_prompts):
        positive = _flux_guided(flux_prompts[0])
        latent = dit.empty_latent(1)
        guider = _node("BasicGuider", model=flux, conditioning=positive)[0]
        sigmas = _node("BasicScheduler", model=flux, scheduler="simple", steps=SAMPLING["steps"], denoise=1.0)[0]
        out = _node("SamplerCustomAdvanced", noise=_node("RandomNoise", noise_seed=5)[0], guider=guider,
                    sampler=_node("KSamplerSelect", sampler_name="euler")[0], sigmas=sigmas, latent_image=latent)[0]
        expected = sample(flux, positive, flux_prompts[1], latent, seed=5, cfg=1.0, **SAMPLING)
        torch.testing.assert_close(out["samples"], expected)

    def test_schnell_samples(self, stock_comfy):
        positive = dit.conditioning("flux", tokens=32)
        out = sample(dit.flux_model("schnell"), positive, positive, dit.empty_latent(1), cfg=1.0, **SAMPLING)
        assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()

    def test_attention_is_not_degenerate(self, flux):
        positive = _flux_guided(dit.conditioning("flux", tokens=32))
        probe = _assert_attention_is_not_degenerate(flux, positive, positive, cfg=1.0)
        blocks = {call["block"] for call in probe.calls}
        assert blocks == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}

    def test_lora_loads_every_key_and_changes_output(self, stock_comfy, flux):
        positive = _flux_guided(dit.conditioning("flux", tokens=32))
        present, layers = _lora_changes_output_and_every_key_loads(stock_comfy, flux, "flux", positive, positive, 1.0)
        assert sorted(present) == sorted(layers)

    def test_controlnet_changes_output(self, stock_comfy, flux):
        import comfy.ldm.flux.controlnet

        control = dit.flux_controlnet()
        assert type(control.control_model) is comfy.ldm.flux.controlnet.ControlNetFlux
        positive = _flux_guided(dit.conditioning("flux", tokens=32))
        hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        controlled = stock_comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, positive, control, hint, 1.0, 0.0, 1.0)
        base = sample(flux, positive, positive, dit.empty_latent(1), seed=2, cfg=1.0, **SAMPLING)
        out = sample(flux, *controlled, dit.empty_latent(1), seed=2, cfg=1.0, **SAMPLING)
        assert torch.isfinite(out).all() and relative_change(out, base) > 0.01


@pytest.mark.usefixtures("sd35_prompts")
class TestSD35:
    @pytest.mark.parametrize("variant, attn2_layers", [("large", []), ("medium", [0, 1])])
    def test_stock_unet_loader_and_comfyui_detection(self, stock_comfy, variant, attn2_layers):
        import comfy.model_base
        import comfy.model_detection
        import comfy.supported_models
        import comfy.utils

        sd = comfy.utils.load_torch_file(str(dit.sd35_path(variant)))
        detected = comfy.model_detection.detect_unet_config(sd, "")
        assert type(comfy.model_detection.model_config_from_unet(sd, "")) is comfy.supported_models.SD3
        # SD3.5 as opposed to SD3.0: RMS q/k norms; Medium (MMDiT-X) as opposed to Large: x_block.attn2
        assert detected["qk_norm"] == "rms" and "joint_blocks.0.context_block.attn.ln_q.weight" in sd
        assert detected["x_block_self_attn_layers"] == attn2_layers
        assert sorted({int(k.split(".")[1]) for k in sd if ".x_block.attn2." in k}) == attn2_layers
        assert detected["depth"] == 3 and detected["context_embedder_config"]["params"]["in_features"] == 4096
        assert detected["adm_in_channels"] == 2048

        model = dit.sd35_model(variant)
        assert type(model.model) is comfy.model_base.SD3
        assert type(model.model.model_config) is comfy.supported_models.SD3
        blocks = model.model.diffusion_model.joint_blocks
        assert [i for i, b in enumerate(blocks) if b.x_block.x_block_self_attn] == attn2_layers
        assert blocks[-1].context_block.pre_only and not blocks[0].context_block.pre_only

    def test_text_encoders_encode_a_real_prompt(self, sd35_prompts):
        import comfy.text_encoders.sd3_clip

        clip = dit.sd35_clip()
        assert isinstance(clip.tokenizer, comfy.text_encoders.sd3_clip.SD3Tokenizer)
        model = clip.cond_stage_model
        assert isinstance(model, comfy.text_encoders.sd3_clip.SD3ClipModel)
        assert model.clip_l is not None and model.clip_g is not None and model.t5xxl is not None
        assert model.t5xxl.transformer.num_layers == 1
        context, extra = sd35_prompts[0][0]
        assert context.shape == (1, 154, 4096) and extra["pooled_output"].shape == (1, 2048)
        assert torch.isfinite(context).all()
        other = encode_prompt(clip, OTHER_PROMPT)[0][0]
        for part in (slice(0, 77), slice(77, 154)):  # CLIP-L+G tokens, then T5 tokens
            assert not torch.allclose(other[:, part], context[:, part])
        random = dit.conditioning("sd35")[0]
        assert random[0].shape == context.shape and random[1]["pooled_output"].shape == extra["pooled_output"].shape

    @pytest.mark.parametrize("variant", ["large", "medium"])
    def test_ksampler_cfg4_samples_end_to_end(self, sd35_prompts, variant):
        model = dit.sd35_model(variant)
        out = sample(model, *sd35_prompts, dit.empty_latent(2), seed=1, cfg=4.0, **SAMPLING)
        assert out.shape == (2, 16, 8, 8) and torch.isfinite(out).all()
        assert torch.equal(out, sample(model, *sd35_prompts, dit.empty_latent(2), seed=1, cfg=4.0, **SAMPLING))
        cfg1 = sample(model, *sd35_prompts, dit.empty_latent(2), seed=1, cfg=1.0, **SAMPLING)
        assert relative_change(cfg1, out) > 0.01, "the negative prompt must matter at CFG 4"

    @pytest.mark.parametrize("variant", ["large", "medium"])
    def test_attention_is_not_degenerate(self, stock_comfy, variant):
        positive, negative = dit.conditioning("sd35", tokens=32), dit.conditioning("sd35", tokens=32, seed=1)
        probe = _assert_attention_is_not_degenerate(dit.sd35_model(variant), positive, negative, cfg=4.0)
        joint_calls = 3 + len(dit.SD35_VARIANTS[variant])  # per model call: one per block, + x_block.attn2
        assert len(probe.calls) % joint_calls == 0

    @pytest.mark.parametrize("variant", ["large", "medium"])
    def test_lora_changes_output(self, stock_comfy, variant):
        positive, negative = dit.conditioning("sd35", tokens=32), dit.conditioning("sd35", tokens=32, seed=1)
        present, layers = _lora_changes_output_and_every_key_loads(
            stock_comfy, dit.sd35_model(variant), "sd35", positive, negative, 4.0)
        missing = sorted(layers - set(present))
        # The file targets Medium; on Large only Medium's extra x_block.attn2 layers have no weight.
        assert missing == ([] if variant == "medium" else sorted(n for n in layers if ".attn2." in n))

    def test_controlnet_loads_and_changes_output(self, stock_comfy):
        import comfy.cldm.dit_embedder
        import comfy.controlnet

        control = dit.sd35_controlnet()  # stock ControlNetLoader
        assert type(control) is comfy.controlnet.ControlNetSD35
        assert type(control.control_model) is comfy.cldm.dit_embedder.ControlNetEmbedder
        model = dit.sd35_model("large")
        positive, negative = dit.conditioning("sd35", tokens=32), dit.conditioning("sd35", tokens=32, seed=1)
        hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        controlled = _node("ControlNetApplySD3", positive=positive, negative=negative, control_net=control,
                           vae=dit.vae(), image=hint, strength=1.0, start_percent=0.0, end_percent=1.0)
        base = sample(model, positive, negative, dit.empty_latent(1), seed=2, cfg=4.0, **SAMPLING)
        out = sample(model, *controlled, dit.empty_latent(1), seed=2, cfg=4.0, **SAMPLING)
        assert torch.isfinite(out).all() and relative_change(out, base) > 0.01

    def test_vae_loader_decodes_and_encodes_16_channels(self, stock_comfy):
        vae = dit.vae()
        assert vae.latent_channels == 16
        images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
        latents = vae.encode(images)
        assert latents.shape == (2, 16, 8, 8) and torch.isfinite(latents).all()
        assert not torch.allclose(latents[0], latents[1]), "the encoder must see the image"
        decoded = vae.decode(latents)
        assert decoded.shape == (2, 64, 64, 3) and torch.isfinite(decoded).all()


@pytest.mark.parametrize("family", ["flux", "sd35"])
def test_release_frees_a_family(stock_comfy, family):
    if family == "flux":
        model, clip, control, cfg = dit.flux_model("schnell"), dit.flux_clip(), dit.flux_controlnet(), 1.0
    else:
        model, clip, control, cfg = dit.sd35_model("large"), dit.sd35_clip(), dit.sd35_controlnet(), 4.0
    vae = dit.vae()
    alive = [weakref.ref(model.model), weakref.ref(clip.cond_stage_model), weakref.ref(control.control_model),
             weakref.ref(vae.first_stage_model)]
    positive = encode_prompt(clip, PROMPT)
    vae.decode(sample(model, positive, positive, dit.empty_latent(1), cfg=cfg, steps=1))
    assert dit.vae() is vae, "a model is built once per process until released"
    del model, clip, control, vae, positive
    dit.release(family, "vae")
    gc.collect()
    assert [ref() for ref in alive] == [None] * 4


def _prompt(nodes: dict) -> dict:
    return {node_id: {"class_type": kind, "inputs": inputs} for node_id, (kind, inputs) in nodes.items()}


@pytest.mark.parametrize("family, loader, file_name, variant", [
    ("flux", "UNETLoader", "flux1-dev.safetensors", "dev"),
    ("flux", "UNETLoader", "flux1-fill-dev.safetensors", "fill"),
    ("flux", "UNETLoader", "flux1-schnell.safetensors", "schnell"),
    ("sd35", "UNETLoader", "sd3.5_medium.safetensors", "medium"),
    ("sd35", "CheckpointLoaderSimple", "sd3.5_large.safetensors", "large"),
])
def test_a_graph_gets_the_tiny_variant_its_model_file_names(stock_comfy, family, loader, file_name, variant):
    """A graph loading FLUX.1 Fill gets the tiny Fill (its inpainting channels), schnell the tiny schnell, and so on:
    the variant is read from the loaded file's name as the publishers spell it."""
    name_input = "unet_name" if loader == "UNETLoader" else "ckpt_name"
    api = _prompt({"1": (loader, {name_input: file_name})})
    dit.use_tiny_dit_models(api, family)
    if family == "flux":
        assert api["1"] == {"class_type": "TinyFluxModelLoader", "inputs": {"variant": variant}}
    else:
        tiny = dit.sd35_path(variant) if loader == "UNETLoader" else dit.sd35_checkpoint_path(variant)
        assert api["1"]["inputs"][name_input] == tiny.name


def test_flux_workflow_runs_with_stand_ins_for_the_loaders_stock_comfyui_cannot_build(stock_comfy):
    """A Flux graph as users wire it (UNETLoader, DualCLIPLoader, LoRA, ControlNet, FluxGuidance, KSampler
    at CFG 1, VAE decode), executed by ComfyUI's own validator and executor on the tiny models."""
    from harness.workflows import execute_workflow

    api = _prompt({
        "1": ("UNETLoader", {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        "2": ("DualCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors",
                                 "type": "flux"}),
        "3": ("LoraLoaderModelOnly", {"model": ["1", 0], "lora_name": "style.safetensors", "strength_model": 1.0}),
        "4": ("CLIPTextEncode", {"clip": ["2", 0], "text": PROMPT}),
        "5": ("FluxGuidance", {"conditioning": ["4", 0], "guidance": 3.5}),
        "6": ("ControlNetLoader", {"control_net_name": "flux-canny-controlnet.safetensors"}),
        "7": ("EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}),
        "8": ("ControlNetApplyAdvanced", {"positive": ["5", 0], "negative": ["5", 0], "control_net": ["6", 0],
                                          "image": ["7", 0], "strength": 1.0, "start_percent": 0.0,
                                          "end_percent": 1.0}),
        "9": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 2}),
        "10": ("KSampler", {"model": ["3", 0], "positive": ["8", 0], "negative": ["8", 1], "latent_image": ["9", 0],
                            "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                            "denoise": 1.0}),
        "11": ("VAELoader", {"vae_name": "ae.safetensors"}),
        "12": ("VAEDecode", {"samples": ["10", 0], "vae": ["11", 0]}),
        "13": ("PreviewImage", {"images": ["12", 0]}),
    })
    dit.use_tiny_dit_models(api, "flux")
    assert {n["class_type"] for n in api.values()} >= {"TinyFluxModelLoader", "TinyDiTTextEncoders",
                                                         "TinyFluxControlNetLoader", "VAELoader"}
    try:
        with dit.stand_in_nodes():
            image = execute_workflow(api)["12"].outputs[0][0]
    finally:
        dit.release("flux", "vae")
    assert image.shape == (2, 64, 64, 3) and torch.isfinite(image).all()
    assert "TinyFluxModelLoader" not in stock_comfy.nodes.NODE_CLASS_MAPPINGS


def test_sd35_workflow_runs_through_stock_unet_and_controlnet_loaders(stock_comfy):
    from harness.workflows import execute_workflow

    api = _prompt({
        "1": ("UNETLoader", {"unet_name": "sd3.5_medium.safetensors", "weight_dtype": "default"}),
        "2": ("TripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                   "clip_name3": "t5xxl_fp16.safetensors"}),
        "3": ("CLIPTextEncode", {"clip": ["2", 0], "text": PROMPT}),
        "4": ("CLIPTextEncode", {"clip": ["2", 0], "text": "blurry"}),
        "5": ("ControlNetLoader", {"control_net_name": "sd3.5_large_controlnet_canny.safetensors"}),
        "6": ("VAELoader", {"vae_name": "sd3_vae.safetensors"}),
        "7": ("EmptyImage", {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}),
        "8": ("ControlNetApplySD3", {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["5", 0],
                                     "vae": ["6", 0], "image": ["7", 0], "strength": 1.0, "start_percent": 0.0,
                                     "end_percent": 1.0}),
        "9": ("EmptySD3LatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        "10": ("KSampler", {"model": ["1", 0], "positive": ["8", 0], "negative": ["8", 1], "latent_image": ["9", 0],
                            "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
                            "denoise": 1.0}),
        "11": ("VAEDecode", {"samples": ["10", 0], "vae": ["6", 0]}),
        "12": ("PreviewImage", {"images": ["11", 0]}),
    })
    dit.use_tiny_dit_models(api, "sd35")  # sd3.5_medium: the tiny Medium
    assert api["1"]["class_type"] == "UNETLoader" and api["5"]["class_type"] == "ControlNetLoader"
    try:
        with dit.stand_in_nodes():
            image = execute_workflow(api)["11"].outputs[0][0]
    finally:
        dit.release("sd35", "vae")
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
