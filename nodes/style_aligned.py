"""StyleAligned nodes (Hertz et al., "Style Aligned Image Generation via Shared Attention", CVPR 2024).

- SharedAttentionBatch: patches a MODEL so every image of a batch shares the style of image 0.
- SharedAttentionPromptBatch: one prompt per image, as one batched CONDITIONING (reference first).
- SharedAttentionInvertReference + SharedAttentionApplyReference: the style comes from a real image,
  DDIM-inverted and re-inserted as image 0 at every step.
"""
from __future__ import annotations

import logging

import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..attention.blocks import evenly_skipped, group_norms, parse_block_selection
from ..attention.families import text_encoder_family
from ..attention.dispatcher import sigma_in_range
from ..attention.group_norm import ReferenceSharedGroupNorm, norm_sharing
from ..attention.layout import chunk_count
from ..attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings
from ..attention.style_reference import DEFAULT_REFERENCE_OFFSET, StyleReference, invert_eps, invert_flow
from .comfy_io import io
from .validation import checked_clip, require_finite
from .patching import (
    WRAPPER_KEY,
    add_attention_processor,
    sigma_range,
    transformer_blocks,
    unpatched_modules,
)

CATEGORY = "personalization/style_aligned"
StyleReferenceType = io.Custom("STYLE_ALIGNED_REFERENCE")
log = logging.getLogger(__name__)


def _check_batch(executor, noise, *args, **kwargs):
    """OUTER_SAMPLE wrapper: warns on a batch of one; refuses a prompt batch (SharedAttentionPromptBatch) whose
    size differs from the latent batch, which ComfyUI would silently cut or repeat (image 0 must be line 1)."""
    images = noise.shape[0]
    if images < 2:
        log.warning("SharedAttentionBatch: the latent batch holds one image, so there is nothing to align "
                    "it with; sampling runs unchanged. Use a batch of 2 or more (image 0 is the reference).")
    for kind, conds in (getattr(executor.class_obj, "conds", None) or {}).items():
        for cond in conds:
            context = cond.get("cross_attn")
            prompts = 0 if context is None else context.shape[0]
            if prompts > 1 and prompts != images:
                raise ValueError(f"SharedAttentionBatch: the {kind} conditioning holds {prompts} prompts but the latent "
                                 f"batch has {images} images; set the latent batch_size to the prompt count "
                                 "(SharedAttentionPromptBatch's count output).")
    return executor(noise, *args, **kwargs)


class _ReferenceRowsWrapper:
    """APPLY_MODEL wrapper: publishes the chunk layout to shared GroupNorms and, as the paper's
    ControlNet pipeline does, gives the reference zero ControlNet residuals (U-Net and DiT ControlNets alike)."""

    def __init__(self, share_group_norm: bool, controlnet_on_reference: bool, sigma_start: float, sigma_end: float):
        self.share_group_norm = share_group_norm
        self.controlnet_on_reference = controlnet_on_reference
        self.sigma_start, self.sigma_end = sigma_start, sigma_end

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        n_chunks = chunk_count(transformer_options.get("cond_or_uncond"), x.shape[0])
        sigma = float(transformer_options["sigmas"].max()) if "sigmas" in transformer_options else None
        in_range = sigma_in_range(sigma, self.sigma_start, self.sigma_end)
        if control is not None and not self.controlnet_on_reference:
            control = _zero_reference_rows(control, n_chunks)
        with norm_sharing(n_chunks if self.share_group_norm and in_range else None):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _zero_reference_rows(control: dict, n_chunks: int) -> dict:
    def zeroed(residual):
        if residual is None:
            return None
        out = residual.clone()
        out.view(n_chunks, -1, *out.shape[1:])[:, 0] = 0
        return out
    return {name: [zeroed(r) for r in residuals] for name, residuals in control.items()}


class SharedAttentionBatch(io.ComfyNode):
    """StyleAligned (Hertz et al., CVPR 2024): the images of one batch share image 0's style.

    In every selected self-attention layer each target image's queries and keys are AdaIN-normalised
    to the reference's statistics and it also attends to the reference's keys/values. Image 0 of the
    batch (in each cond/uncond pass) is the reference and comes out exactly as without this node.
    Training-free; works for SD1.5/SD2/SDXL U-Nets and the DiTs: Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image,
    Qwen-Image (there the image tokens of each joint text+image attention are shared, never the reference's text:
    see web/docs), CFG on or off, with ControlNet and LoRA.

    Inputs (safe ranges):
    - adain_queries / adain_keys: normalise target Q / K to the reference (paper: both on).
    - adain_values: also normalise V (paper ablation; off).
    - shared_score_shift: ln λ added to the logits of the reference keys; 0 (text) or ln 2 = 0.693
      (reference image, "more fidelity"); -1..1.5 is sensible.
    - shared_score_scale: multiplies the reference keys; 1.0, or 0.5 when a famous image is copied.
    - share_group_norm: GroupNorm statistics joined with the reference (off for text, on for a real
      reference image in the official notebooks); U-Nets only. LayerNorm sharing is a mathematical no-op,
      not offered.
    - full_attention_share: the paper's ablation where all images attend to all (content leaks).
    - blocks: which transformer blocks share, e.g. "input, middle, output:3" (Flux "double, single:0",
      SD3 "joint:0"); empty = all.
    - skip_fraction: switch sharing off in an evenly spaced fraction of layers (paper's only_self_level;
      more → more diverse, less aligned sets), 0..1.
    - start_percent / end_percent: part of sampling during which sharing is active.
    - controlnet_on_reference: feed ControlNet residuals to the reference too (paper: off, zero residual).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SharedAttentionBatch",
            display_name="StyleAligned Batch (personalization)",
            category=CATEGORY,
            description="StyleAligned: every image of the batch takes the style of image 0 through shared self-attention.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5/SD2/SDXL or DiT model (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image) to patch; the input is left unchanged."),
                io.Boolean.Input("adain_queries", default=True, tooltip="AdaIN the targets' queries to the reference (paper: on)."),
                io.Boolean.Input("adain_keys", default=True, tooltip="AdaIN the targets' keys to the reference (paper: on)."),
                io.Boolean.Input("adain_values", default=False, tooltip="AdaIN the values too (paper ablation: off)."),
                io.Float.Input("shared_score_shift", default=0.0, min=-3.0, max=3.0, step=0.01,
                               tooltip="ln λ added to attention logits on the reference; 0.693 (=ln 2) for a real reference image."),
                io.Float.Input("shared_score_scale", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Scale of the reference keys; below 1 weakens the reference (0.5 if it gets copied)."),
                io.Boolean.Input("share_group_norm", default=False,
                                 tooltip="Join GroupNorm statistics with the reference (official: off for text, on for a real image); U-Nets only."),
                io.Boolean.Input("full_attention_share", default=False,
                                 tooltip="Ablation: every image attends to every image, no AdaIN (leaks content)."),
                io.String.Input("blocks", default="", tooltip="Blocks that share, e.g. 'input, middle, output:3', Flux 'double, single:0', Z-Image 'layer:0'; empty = all."),
                io.Float.Input("skip_fraction", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of layers, evenly spaced, that do not share (paper's level); higher = more diverse."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Sharing starts at this part of sampling."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Sharing ends at this part of sampling."),
                io.Boolean.Input("controlnet_on_reference", default=False,
                                 tooltip="Also apply ControlNet to the reference image (paper: off, the reference gets zero residuals)."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model; sample a batch of 2 or more, image 0 is the reference.")],
        )

    @classmethod
    def execute(cls, model, adain_queries, adain_keys, adain_values, shared_score_shift, shared_score_scale,
                share_group_norm, full_attention_share, blocks, skip_fraction, start_percent, end_percent,
                controlnet_on_reference) -> io.NodeOutput:
        found = transformer_blocks(model, "SharedAttentionBatch")
        if share_group_norm and found[0].family.joint:
            raise ValueError(f"SharedAttentionBatch: share_group_norm joins the GroupNorm statistics of a U-Net; a "
                             f"{found[0].family.name} model has no GroupNorm (its LayerNorms normalise each token "
                             "alone, so joining them with the reference changes nothing). Turn share_group_norm off.")
        selected = parse_block_selection(blocks, found) & evenly_skipped([b.key for b in found], skip_fraction)
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        settings = StyleAlignedSettings(
            adain_queries=adain_queries, adain_keys=adain_keys, adain_values=adain_values,
            score_scale=shared_score_scale, score_shift=shared_score_shift, full_attention_share=full_attention_share)
        processor = SharedAttentionProcessor(settings=settings, blocks=selected, sigma_start=sigma_start, sigma_end=sigma_end)

        patched = model.clone()
        add_attention_processor(patched, processor, found)
        if share_group_norm:
            for path, norm in group_norms(unpatched_modules(model)):
                patched.add_object_patch(f"diffusion_model.{path}", ReferenceSharedGroupNorm(norm))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY + ".style_aligned",
                                     _ReferenceRowsWrapper(share_group_norm, controlnet_on_reference, sigma_start, sigma_end))
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY + ".style_aligned",
                                     _check_batch)
        return io.NodeOutput(patched)


class SharedAttentionPromptBatch(io.ComfyNode):
    """One prompt per image for a StyleAligned batch (paper: "<object>, <shared style>").

    - prompts: one prompt per line, blank lines skipped; line 1 is the reference (image 0).
    - style: text appended to every line after a comma (e.g. "minimal origami"); may be empty.
    Outputs the batched CONDITIONING (SDXL pooled output batched too) and the prompt count to wire
    into the latent's batch_size.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SharedAttentionPromptBatch",
            display_name="StyleAligned Prompt Batch (personalization)",
            category=CATEGORY,
            description="Encode one prompt per line into one batched conditioning; line 1 is the style reference.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder of the model."),
                io.String.Input("prompts", multiline=True, default="a toy train\na toy airplane\na toy bicycle",
                                tooltip="One prompt per line; the first line describes the reference image."),
                io.String.Input("style", default="", tooltip="Appended to every prompt after a comma, e.g. 'minimal origami'."),
            ],
            outputs=[
                io.Conditioning.Output(tooltip="One conditioning per prompt, batched in order."),
                io.Int.Output(display_name="count", tooltip="Number of prompts: use it as the latent batch size."),
            ],
        )

    @classmethod
    def execute(cls, clip, prompts, style) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError("SharedAttentionPromptBatch: write at least one prompt (one per line).")
        if clip is None:
            raise ValueError("SharedAttentionPromptBatch: the clip input is empty; the checkpoint has no text encoder.")
        clip = checked_clip("SharedAttentionPromptBatch", clip)
        encoded = []
        for line in lines:
            text = f"{line}, {style.strip()}" if style.strip() else line
            encoded.append(clip.encode_from_tokens(clip.tokenize(text), return_pooled=True, return_dict=True))
        family = text_encoder_family(clip.cond_stage_model)
        batched = {key: _batched(family, key, [e[key] for e in encoded]) for key in encoded[0]}
        context = batched.pop("cond")
        return io.NodeOutput([[context, batched]], len(lines))


#: the per-token tensors of an encoding (``(1, tokens, ...)``), which the family's model takes batched its own way
_PER_TOKEN = ("cond", "attention_mask")


def _batched(family, key: str, per_prompt: list):
    """One value of the prompts' encodings as a batch: per-token tensors (the contexts, Flux.2's and Z-Image's
    attention masks) as the text encoder's ``family`` batches them, other tensors (pooled outputs) stacked, and what
    is no tensor (Flux.2's pooled_output None, which its model reads) as it is."""
    if key in _PER_TOKEN:
        return family.batched_prompts(per_prompt)
    return torch.cat(per_prompt) if isinstance(per_prompt[0], torch.Tensor) else per_prompt[0]


class SharedAttentionInvertReference(io.ComfyNode):
    """DDIM inversion of a real reference image for StyleAligned (paper §"style from a reference image"),
    the official loop: from the clean latent at ᾱ_0, each step predicts the noise of the current latent
    at the next timestep. ε- and v-prediction U-Nets (variance-preserving schedules); on rectified-flow
    models (Flux, SD3/SD3.5) the same idea in their own parametrisation: the sampler's Euler ODE run
    backwards, each step taking the velocity of the current latent at the next level.

    - model: the model you will sample with (before or after SharedAttentionBatch: inversion itself
      runs without sharing).
    - positive: a prompt describing the reference (subject and style), e.g. "a man in bed, medieval painting".
    - negative: usually an empty prompt or ConditioningZeroOut (the official code uses zeros).
    - latent: VAE-encoded reference, one image.
    - steps / scheduler: MUST equal those of the sampler that uses the reference (official: 50, DDIM;
      Flux/SD3.5: the scheduler you sample with, e.g. simple or beta).
    - cfg: guidance during inversion (official: 2; 1–3 is sensible; 1 for guidance-distilled Flux, whose
      positive carries FluxGuidance's guidance).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SharedAttentionInvertReference",
            display_name="StyleAligned Invert Image (personalization)",
            category=CATEGORY,
            description="DDIM-invert a reference latent so its style can lead a StyleAligned batch.",
            inputs=[
                io.Model.Input("model", tooltip="Model used for inversion and later sampling."),
                io.Conditioning.Input("positive", tooltip="Prompt describing the reference image's subject and style."),
                io.Conditioning.Input("negative", tooltip="Unconditional prompt (empty text or ConditioningZeroOut)."),
                io.Latent.Input("latent", tooltip="VAE-encoded reference image (batch of 1)."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Must equal the sampler's steps (official: 50)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="Must equal the sampler's scheduler (ddim_uniform = the paper's DDIM)."),
                io.Float.Input("cfg", default=2.0, min=1.0, max=10.0, step=0.1, tooltip="Guidance during inversion (official: 2)."),
            ],
            outputs=[StyleReferenceType.Output(display_name="reference", tooltip="The reference's latent at every step of the schedule.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, steps, scheduler, cfg) -> io.NodeOutput:
        samples = latent["samples"]
        if samples.shape[0] != 1:
            raise ValueError(f"SharedAttentionInvertReference: the reference latent must hold one image, got a batch of "
                             f"{samples.shape[0]}; pick one with LatentFromBatch.")
        require_finite("SharedAttentionInvertReference", "reference latent", samples)
        transformer_blocks(model, "SharedAttentionInvertReference")
        model_sampling = model.get_model_object("model_sampling")
        inversion = _inversion_of(model_sampling)
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
        trajectory: dict[str, StyleReference] = {}
        progress = latent_preview.prepare_callback(model, steps)

        def run_inversion(model_k, x, flipped_sigmas, extra_args=None, callback=None, disable=None):
            def denoise(x_now, sigma):
                return model_k(x_now, sigma, **(extra_args or {}))

            def on_step(i, x_now):
                if callback is not None:
                    callback({"i": i, "denoised": x_now, "x": x_now, "sigma": flipped_sigmas[i + 1]})
            trajectory["reference"] = inversion(denoise, x, flipped_sigmas.flip(0), on_step)
            return x

        comfy.sample.sample_custom(
            model, torch.zeros_like(samples), cfg, comfy.samplers.KSAMPLER(run_inversion), sigmas.flip(0),
            positive, negative, samples, callback=progress, disable_pbar=True, seed=0)
        return io.NodeOutput(trajectory["reference"])


def _inversion_of(model_sampling):
    """The inversion of the model's parametrisation: DDIM's for ε/v-prediction (variance preserving), the
    backward Euler ODE for rectified flow; a clear error for any other."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        return invert_flow
    if isinstance(model_sampling, comfy.model_sampling.EPS) and getattr(model_sampling, "sigma_data", 1.0) == 1.0:
        return lambda denoise, x, sigmas, on_step: invert_eps(denoise, x, sigmas, model_sampling.sigma_min, on_step)
    raise ValueError("SharedAttentionInvertReference inverts models with a variance-preserving schedule (ε- or "
                     "v-prediction: SD1.5/SD2/SDXL) or rectified flow (Flux, SD3/SD3.5); this MODEL samples with "
                     f"{type(model_sampling).__name__}.")


def _reference_input_wrapper(reference: StyleReference, offset: int):
    def replace_reference_rows(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if tuple(x.shape[1:]) != tuple(reference.latents.shape[1:]):
            raise ValueError(
                f"SharedAttentionApplyReference: the reference latent is {tuple(reference.latents.shape[1:])} "
                f"(channels, height, width) but the sampled batch is {tuple(x.shape[1:])}; encode the reference at "
                "the size you generate.")
        sigma = float(t.max())
        latent = reference.latent_for(transformer_options["sample_sigmas"], sigma, offset).to(x)
        n_chunks = chunk_count(transformer_options.get("cond_or_uncond"), x.shape[0])
        x = x.clone()
        x.view(n_chunks, -1, *x.shape[1:])[:, 0] = latent
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return replace_reference_rows


class SharedAttentionApplyReference(io.ComfyNode):
    """Make image 0 of a StyleAligned batch follow an inverted real image (official transfer schedule).

    At step 0 image 0 is the reference's latent ``offset`` steps ahead; it is held at ``offset + 1``
    until sampling catches up, then follows the inverted trajectory exactly. Chain after
    SharedAttentionBatch (official transfer settings: share_group_norm on, shared_score_shift 0.693)
    and sample a batch of 1 + N images with the reference's prompt first, with the same steps and
    scheduler as the inversion, denoise 1.0. Drop image 0 from the output (LatentFromBatch).

    - offset: 0..10, official 5; larger gives targets a cleaner style signal early.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SharedAttentionApplyReference",
            display_name="StyleAligned Apply Image (personalization)",
            category=CATEGORY,
            description="Image 0 of the batch follows the inverted reference image at every step.",
            inputs=[
                io.Model.Input("model", tooltip="Usually the output of SharedAttentionBatch."),
                StyleReferenceType.Input("reference", tooltip="Output of SharedAttentionInvertReference."),
                io.Int.Input("offset", default=DEFAULT_REFERENCE_OFFSET, min=0, max=50,
                             tooltip="Steps the reference runs ahead of the targets at the start (official: 5)."),
            ],
            outputs=[io.Model.Output(tooltip="Model whose batch image 0 is the reference image.")],
        )

    @classmethod
    def execute(cls, model, reference: StyleReference, offset) -> io.NodeOutput:
        if offset > reference.steps:
            raise ValueError(f"SharedAttentionApplyReference: offset {offset} exceeds the {reference.steps} inverted steps.")
        require_finite("SharedAttentionApplyReference", "inverted reference latents", reference.latents)
        patched = model.clone()
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY + ".style_reference",
                                     _reference_input_wrapper(reference, offset))
        return io.NodeOutput(patched)


STYLE_ALIGNED_NODES = [SharedAttentionBatch, SharedAttentionPromptBatch, SharedAttentionInvertReference,
                       SharedAttentionApplyReference]
