"""RealCustom nodes (Huang et al., "RealCustom: Narrowing Real Text Word for Real-Time Open-Domain
Text-to-Image Customization", CVPR 2024; inference as in the released code bytedance/RealCustom).

- RealCustomLoader: the image branch (projector + visual K/V of every cross-attention layer), either the
  released SDXL model or this pack's CLIP-vision format.
- RealCustomDINOv2Loader: DINOv2-L/14 with registers, the released model's second image encoder.
- RealCustomEncodeReference: the reference image (and a black image for the negative pass) → image tokens.
- AdaptiveMaskGuidance: patches a MODEL so the image branch is gated, at every step, by the mask of a real
  word of the prompt read from the model's own cross-attention.
- RealCustomMaskPreview: the mask of every step of the last sampling run, as MASK and IMAGE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import folder_paths
import torch
import torch.nn.functional as F

from ..attention.realcustom import (
    COND,
    UNCOND,
    MASK_STRATEGIES,
    PER_BLOCK,
    RUN_KEY,
    SCOPE_SELECTIONS,
    ImageTokens,
    MaskedImageBranch,
    MaskGuidanceRun,
    MaskSettings,
    WordMapReader,
    block_name,
    cascaded_cond,
    cond_rows,
    step_index,
)
from ..attention.blocks import UNET, family_of_tag
from ..attention.realcustom_encoder import RegisterViT, interleave_local_tokens, reference_views
from ..attention.realcustom_scoring import INFERENCE_KEEP, alpha_bar, masked_latent, model_input
from ..attention.realcustom_weights import (
    BRANCH_LAYOUT_KEY,
    FAMILY_KEY,
    FORMAT_KEY,
    OFFICIAL_FORMAT,
    RealCustomAdapter,
    adapter_from_state_dict,
    convert_official,
)
from .comfy_io import io
from .model_folders import register_model_folder
from .validation import read_safetensors, require_finite
from .patching import WRAPPER_KEY, add_attention_processor, transformer_blocks
from .prompt_tokens import find_phrase_tokens

CATEGORY = "personalization/realcustom"
ADAPTER_FOLDER = "realcustom"
RUN_WRAPPER_KEY = WRAPPER_KEY + ".realcustom"
#: where the word map of a step comes from: the paper's and released code's schedule (default), the fast option
MAP_SOURCES = ("text-only pass", "previous step")
UNCOND_IMAGES = ("black image", "none")
GUIDANCE_MODES = ("CFG (released code)", "cascaded (paper eq. 13)")

AdapterType = io.Custom("REALCUSTOM_ADAPTER")
DinoType = io.Custom("REALCUSTOM_DINOV2")
ReferenceType = io.Custom("REALCUSTOM_REFERENCE")
MasksType = io.Custom("REALCUSTOM_MASKS")


register_model_folder(ADAPTER_FOLDER)


@dataclass(frozen=True, eq=False)
class LoadedAdapter:
    adapter: RealCustomAdapter
    #: ComfyUI's memory manager loads/offloads the adapter through this patcher
    patcher: comfy.model_patcher.ModelPatcher
    name: str


@dataclass(frozen=True, eq=False)
class EncodedReference:
    adapter: LoadedAdapter
    tokens: ImageTokens
    #: the encoder features of the reference and the black image, kept when the adapter scores its tokens
    #: per step (adaptive scoring); the projected ``tokens`` serve adapters without scoring
    features: ImageTokens | None = None


@dataclass(eq=False)
class MaskRecord:
    """Masks of every step of the last finished sampling run of one patched model (the node's output)."""

    steps: list[torch.Tensor] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class LoadedDino:
    model: RegisterViT
    patcher: comfy.model_patcher.ModelPatcher
    name: str


OFFICIAL_ENCODER_MESSAGE = (
    "RealCustomEncodeReference: the released RealCustom model reads SigLIP-so400m-patch14-384 AND DINOv2-L/14 "
    "with 4 registers. Connect the SigLIP model as clip_vision (CLIPVisionLoader, e.g. "
    "sigclip_vision_patch14_384.safetensors) and the DINOv2 one to the dinov2 input (RealCustomDINOv2Loader with "
    "timm's vit_large_patch14_reg4_dinov2.lvd142m weights as safetensors in models/clip_vision).")


class RealCustomLoader(io.ComfyNode):
    """Loads a RealCustom image branch from models/realcustom (safetensors).

    Two formats: the released SDXL model (bytedance/RealCustom ``RealCustom_highres``, converted key by key
    from its diffusers names; convert the released ``.pth`` to safetensors once, this pack never unpickles),
    or this pack's CLIP-vision format written by RealCustomTrainer (any U-Net, SD1.5 first; Flux and SD3/SD3.5
    adapters are of this format too). The file records the model family it was made for (files without it are
    U-Net adapters); AdaptiveMaskGuidance refuses it on a model of another family. It also records the branch's
    layout: a full-rank key/value pair per block (the released model, every file without the entry) or a shared
    pair plus a low-rank change per block (RealCustomTrainer's default on the DiTs), and the blocks it serves.

    - adapter_name: file in models/realcustom.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealCustomLoader",
            display_name="RealCustom Load Adapter (personalization)",
            category=CATEGORY,
            description="Load a RealCustom image branch (projector + visual key/value projections).",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(ADAPTER_FOLDER),
                                   tooltip="Adapter file in models/realcustom (safetensors).")],
            outputs=[AdapterType.Output(display_name="adapter", tooltip="The image branch, for RealCustomEncodeReference.")],
        )

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(ADAPTER_FOLDER, adapter_name)
        state_dict, metadata = read_safetensors("RealCustomLoader", path, "RealCustom adapter")
        format_name = metadata.get(FORMAT_KEY)
        if format_name is None:  # the released checkpoint, converted to safetensors as is
            state_dict, format_name = convert_official(state_dict), OFFICIAL_FORMAT
        try:
            family = family_of_tag(metadata.get(FAMILY_KEY, UNET.file_tag))
        except ValueError as error:
            raise ValueError(f"RealCustomLoader: {adapter_name} records {error}") from None
        try:
            adapter = adapter_from_state_dict(state_dict, format_name, family,
                                              metadata.get(BRANCH_LAYOUT_KEY, PER_BLOCK))
        except ValueError as error:
            raise ValueError(f"RealCustomLoader: {adapter_name}: {error}") from None
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(LoadedAdapter(adapter, patcher, adapter_name))


class RealCustomDINOv2Loader(io.ComfyNode):
    """Loads DINOv2 with register tokens (timm ``vit_large_patch14_reg4_dinov2.lvd142m``), the second image
    encoder of the released RealCustom model (bytedance/RealCustom), which ComfyUI's CLIPVisionLoader cannot
    read: ComfyUI's DINOv2 has no register tokens. Its penultimate block's patch tokens are what the
    released adapter was trained on; the 518-px position embedding is resampled to the 384-px views as
    timm does.

    - dinov2_name: the timm weights as safetensors in models/clip_vision (timm's ``model.safetensors``, or the
      released ``ckpts/vit_large_patch14_reg4_dinov2.lvd142m/pytorch_model.bin`` converted once; this pack
      never unpickles).
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealCustomDINOv2Loader",
            display_name="RealCustom Load DINOv2 (personalization)",
            category=CATEGORY,
            description="Load DINOv2-L/14 with registers, the released RealCustom model's second image encoder.",
            inputs=[io.Combo.Input("dinov2_name", options=folder_paths.get_filename_list("clip_vision"),
                                   tooltip="timm vit_large_patch14_reg4_dinov2 weights (safetensors) in models/clip_vision.")],
            outputs=[DinoType.Output(display_name="dinov2", tooltip="The encoder, for RealCustomEncodeReference's dinov2 input.")],
        )

    @classmethod
    def execute(cls, dinov2_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("clip_vision", dinov2_name)
        state_dict, _ = read_safetensors("RealCustomDINOv2Loader", path, "DINOv2 file")
        try:
            encoder = RegisterViT.from_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(f"RealCustomDINOv2Loader: {dinov2_name} is {error}") from None
        patcher = comfy.model_patcher.ModelPatcher(encoder, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(LoadedDino(encoder, patcher, dinov2_name))


def _released_features(clip_vision, dinov2: LoadedDino, views: torch.Tensor) -> torch.Tensor:
    """SigLIP (clip_vision) and DINOv2 penultimate patch tokens of ``(B, 3, 384, 384)`` views, channel-concatenated."""
    siglip = clip_vision.encode_image(views.movedim(1, -1), crop=False)["penultimate_hidden_states"]
    comfy.model_management.load_model_gpu(dinov2.patcher)
    with torch.no_grad():
        dino = dinov2.model(views.to(dinov2.patcher.load_device))
    if siglip.shape[1] != dino.shape[1]:
        raise ValueError(f"RealCustomEncodeReference: the clip_vision model gives {siglip.shape[1]} tokens per 384-px view, "
                         f"DINOv2 {dino.shape[1]}; the released model needs SigLIP-so400m-patch14-384 as clip_vision.")
    return torch.cat([siglip.float().to(dino.device), dino.float()], dim=-1)


def _released_tokens(adapter: LoadedAdapter, clip_vision, dinov2: LoadedDino | None, image) -> torch.Tensor:
    """Tokens of [reference, black image] for the released model: global and polyphase local views through
    SigLIP + DINOv2 (see attention/realcustom_encoder.py), then the released projector."""
    if dinov2 is None:
        raise ValueError(OFFICIAL_ENCODER_MESSAGE)
    images = torch.cat([image, torch.zeros_like(image)])[..., :3].movedim(-1, 1).float()
    global_views, local_views = reference_views(images)
    global_features = _released_features(clip_vision, dinov2, global_views)
    local_features = interleave_local_tokens(_released_features(clip_vision, dinov2, local_views))
    if global_features.shape[-1] != adapter.adapter.vision_dim:
        raise ValueError(f"RealCustomEncodeReference: clip_vision + dinov2 give {global_features.shape[-1]} channels, but "
                         f"adapter {adapter.name} expects {adapter.adapter.vision_dim} (SigLIP-so400m 1152 + DINOv2-L 1024); "
                         "connect the encoders it was trained with.")
    return _project(adapter, global_features, local_features)


def _project(adapter: LoadedAdapter, *features: torch.Tensor) -> torch.Tensor:
    """The adapter's projector on encoder features (loaded by ComfyUI's memory manager), as float tokens."""
    comfy.model_management.load_model_gpu(adapter.patcher)
    projector = adapter.adapter.projector
    with torch.no_grad():
        weight = next(projector.parameters())
        return projector(*(f.to(weight) for f in features)).float()


class RealCustomEncodeReference(io.ComfyNode):
    """Turns the reference image into RealCustom image tokens (and a black image into the negative tokens,
    as the released code does for the unconditional pass).

    - adapter: from RealCustomLoader.
    - clip_vision: the image encoder the adapter was trained with (CLIP_VISION; its penultimate hidden states).
    - image: one reference image; like the released code it is squashed to the encoder's square input
      unless crop is on.
    - crop: center-crop instead of squashing (released code: off).
    - dinov2: RealCustomDINOv2Loader, needed by the released SDXL model only (with SigLIP-so400m-384 as
      clip_vision); its reference is seen as the released code does: squashed to 768, one 384 global view
      and the four 384 polyphase views of the 768 image, both encoders at their penultimate block.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealCustomEncodeReference",
            display_name="RealCustom Encode Subject (personalization)",
            category=CATEGORY,
            description="Encode a reference image into the image tokens of a RealCustom adapter.",
            inputs=[
                AdapterType.Input("adapter", tooltip="RealCustom adapter from RealCustomLoader."),
                io.ClipVision.Input("clip_vision", tooltip="Image encoder the adapter was trained with."),
                io.Image.Input("image", tooltip="The subject's reference image (one image)."),
                io.Boolean.Input("crop", default=False, tooltip="Center-crop to a square instead of squashing (released code squashes)."),
                DinoType.Input("dinov2", optional=True,
                               tooltip="DINOv2 with registers (RealCustomDINOv2Loader); only the released SDXL model needs it."),
            ],
            outputs=[ReferenceType.Output(display_name="reference", tooltip="Reference tokens for AdaptiveMaskGuidance.")],
        )

    @classmethod
    def execute(cls, adapter: LoadedAdapter, clip_vision, image, crop, dinov2: LoadedDino | None = None) -> io.NodeOutput:
        if image.shape[0] != 1:
            raise ValueError(f"RealCustomEncodeReference: give one reference image, got a batch of {image.shape[0]} "
                             "(pick one with ImageFromBatch).")
        require_finite("RealCustomEncodeReference", "reference image", image)
        if adapter.adapter.format_name == OFFICIAL_FORMAT:
            tokens = _released_tokens(adapter, clip_vision, dinov2, image).to(comfy.model_management.intermediate_device())
            return io.NodeOutput(EncodedReference(adapter, ImageTokens(reference=tokens[:1], negative=tokens[1:])))
        images = torch.cat([image, torch.zeros_like(image)])  # reference, black image
        features = clip_vision.encode_image(images, crop=crop)["penultimate_hidden_states"]
        if features.shape[-1] != adapter.adapter.vision_dim:
            raise ValueError(f"RealCustomEncodeReference: this CLIP vision model gives {features.shape[-1]}-d features, "
                             f"but adapter {adapter.name} expects {adapter.adapter.vision_dim}-d; use the image encoder it "
                             "was trained with.")
        tokens = _project(adapter, features).to(comfy.model_management.intermediate_device())
        raw = features.float().to(comfy.model_management.intermediate_device())
        return io.NodeOutput(EncodedReference(adapter, ImageTokens(reference=tokens[:1], negative=tokens[1:]),
                                              ImageTokens(raw[:1], raw[1:]) if adapter.adapter.scoring else None))


def _rows_of_control(control, rows: slice):
    if control is None:
        return None
    return {name: [None if r is None else r[rows] for r in residuals] for name, residuals in control.items()}


def _guided_call(transformer_options: dict, batch: int, cond_only, whole, scored_tokens=None):
    """The schedule of one model call (shared by the U-Net and the DiT wrappers): the word-map capture of the step
    (a text-only pass of the cond rows, ``cond_only(rows, options)``, or the guided pass ``whole()`` itself),
    the mask that gates the step recorded, the image tokens of the call scored (``scored_tokens(run)``)."""
    run: MaskGuidanceRun | None = transformer_options.get(RUN_KEY)
    if run is None:
        raise RuntimeError("AdaptiveMaskGuidance: the model was called outside a sampling run; sample it with a "
                           "sampler node (KSampler, SamplerCustom...).")
    step = step_index(transformer_options["sample_sigmas"], float(transformer_options["sigmas"].max()))
    run.start_call(step)
    layout = transformer_options.get("cond_or_uncond")
    rows = cond_rows(layout, batch)
    if rows is not None and run.needs_text_only_pass(step):
        if run.cascaded and list(layout or ()).count(COND) > 1:
            raise ValueError("AdaptiveMaskGuidance: cascaded guidance needs ONE positive conditioning; combined or area "
                             "positive conds are not supported (use the released CFG guidance).")
        run.capturing, run.injecting = run.captures_in_text_only_pass(step), False
        try:
            text_prediction = cond_only(rows, {**transformer_options, "cond_or_uncond": [COND]})
        finally:
            run.capturing, run.injecting = False, True
        run.finish_text_only_pass(float(transformer_options["sigmas"].max()), text_prediction)
    run.record(step)
    if run.token_scorer is not None:
        run.tokens = scored_tokens(run)
    run.capturing = run.capture_in_guided_pass(step)
    try:
        return whole()
    finally:
        run.capturing = False


def guided_diffusion_model(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """DIFFUSION_MODEL wrapper of the U-Nets (their forward's signature): see :func:`_guided_call`. The text-only
    prediction it keeps for the cascaded guidance is the model's output (eps or v)."""
    return _guided_call(
        transformer_options, x.shape[0],
        lambda rows, options: executor(x[rows], timesteps[rows], context[rows], None if y is None else y[rows],
                                       _rows_of_control(control, rows), options, **kwargs),
        lambda: executor(x, timesteps, context, y, control, transformer_options, **kwargs),
        lambda run: run.token_scorer(x, context, transformer_options.get("cond_or_uncond"), run.mask,
                                     transformer_options["sigmas"]))


def _batch_rows(value, rows: slice, batch: int):
    """``value[rows]`` for a per-row tensor of the model call (batch first), else ``value`` (shared inputs)."""
    return value[rows] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value


def guided_apply_model(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """APPLY_MODEL wrapper of the DiTs (whose forwards have no common signature, and SD3's no DIFFUSION_MODEL
    wrappers): see :func:`_guided_call`. The text-only prediction it keeps is the denoised one; the extra conds
    (Flux's guidance, the pooled ``y``) are cut to the cond rows with the latent."""
    batch = x.shape[0]
    return _guided_call(
        transformer_options, batch,
        lambda rows, options: executor(x[rows], t[rows], _batch_rows(c_concat, rows, batch), c_crossattn[rows],
                                       _rows_of_control(control, rows), options,
                                       **{name: _batch_rows(value, rows, batch) for name, value in kwargs.items()}),
        lambda: executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs),
        lambda run: run.token_scorer(x, c_crossattn, transformer_options.get("cond_or_uncond"), run.mask, t))


@dataclass(frozen=True, eq=False)
class _SamplingRun:
    """OUTER_SAMPLE wrapper: one MaskGuidanceRun per sampling run, visible to the processors through the
    run's own copy of transformer_options, dropped afterwards; its masks go to the node's MaskRecord."""

    settings: MaskSettings
    indicator: torch.Tensor
    update_fraction: float
    text_only_pass: bool
    tokens: ImageTokens
    record: MaskRecord
    cascaded: bool = False
    token_scorer: "_ScoredTokens | None" = None

    def __call__(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        options = executor.class_obj.model_options["transformer_options"]  # the sampler's per-run copy
        run = MaskGuidanceRun(self.settings, self.indicator, total_steps=len(sigmas) - 1,
                              update_fraction=self.update_fraction, text_only_pass=self.text_only_pass,
                              tokens=self.tokens.to(noise.device), cascaded=self.cascaded,
                              token_scorer=None if self.token_scorer is None else self.token_scorer.to(noise.device))
        options[RUN_KEY] = run
        try:
            output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            del options[RUN_KEY]
        self.record.steps = run.history
        return output


@dataclass(frozen=True, eq=False)
class _ScoredTokens:
    """The image tokens of one model call from an adapter with the paper's adaptive scoring: each chunk's
    encoder features (reference for cond chunks, black image for uncond ones) are scored from that chunk's
    prompt, its model input masked by the word mask (paper: the visual context only sees the subject) and
    ᾱ_t, weighted, cut to γ_num = 0.8 of the tokens, then projected."""

    adapter: object  # RealCustomAdapter with a scoring module
    features: ImageTokens
    #: the model samples a rectified flow (CONST): its input ``x`` is ComfyUI's noisy latent itself, brought to the
    #: VP form the scoring module reads (an ε/v U-Net's input is that form already)
    flow: bool = False

    def to(self, device) -> "_ScoredTokens":
        return _ScoredTokens(self.adapter, self.features.to(device), self.flow)

    def __call__(self, x, context, layout, mask, sigmas) -> ImageTokens:
        chunks = list(layout or ()) or [COND]
        rows = x.shape[0] // len(chunks)
        scoring, projector = self.adapter.scoring, self.adapter.projector
        weight = next(projector.parameters())
        latent = x[:, :scoring.latent_channels].to(weight)
        if self.flow:
            latent = model_input(latent, sigmas.flatten().expand(x.shape[0]) if sigmas.numel() == 1 else sigmas.flatten(),
                                 flow=True)
        if mask is not None:
            latent = masked_latent(latent, mask)
        # ComfyUI's sigmas are per image (or one for all), not per row of the cond/uncond batch
        image_sigmas = sigmas.flatten()[:rows] if sigmas.numel() >= rows else sigmas.flatten().expand(rows)
        alpha = alpha_bar(image_sigmas, flow=self.flow).to(weight)

        def tokens_of(kind: int, features: torch.Tensor) -> torch.Tensor:
            chunk = chunks.index(kind) if kind in chunks else 0  # a chunk the branch reads, or any (unread)
            picked = slice(chunk * rows, (chunk + 1) * rows)
            kept = scoring(features.to(weight).expand(rows, -1, -1), context[picked].to(weight), latent[picked],
                           alpha, INFERENCE_KEEP)
            return projector(kept)

        negative = None if self.features.negative is None else tokens_of(UNCOND, self.features.negative)
        return ImageTokens(tokens_of(COND, self.features.reference), negative)


@dataclass(frozen=True)
class _CascadedGuidance:
    """sampler_pre_cfg_function: replaces the cond prediction so that ComfyUI's CFG (any cfg function) gives
    the paper's eq. 13 with ω_t = the sampler's CFG and ω_i = ``image_scale``."""

    image_scale: float
    #: the text-only predictions are denoised already (the DiT wrapper), not the model's output (the U-Net one)
    denoised_predictions: bool = False

    def __call__(self, args):
        run: MaskGuidanceRun = args["model_options"]["transformer_options"][RUN_KEY]
        sigma, cond_denoised = args["sigma"], args["conds_out"][0]
        text = run.take_text_prediction(float(sigma.max()))
        text_denoised = text if self.denoised_predictions else \
            args["model"].model_sampling.calculate_denoised(sigma, text.float(), args["input"])
        return [cascaded_cond(text_denoised, cond_denoised, args["cond_scale"], self.image_scale),
                *args["conds_out"][1:]]


def _check_adapter_fits(model, adapter: LoadedAdapter, blocks) -> None:
    model_family, made_for = blocks[0].family, adapter.adapter.family
    if made_for != model_family:
        raise ValueError(f"AdaptiveMaskGuidance: adapter {adapter.name} was made for {made_for.name} models, but this "
                         f"MODEL ({type(model.model).__name__}) is a {model_family.name} model; use an adapter trained "
                         f"for {model_family.name}.")
    cross = {block_name(b.key): b for b in blocks if b.has_cross_attention}
    for key, inner in adapter.adapter.branch.widths().items():
        name = block_name(key)
        block = cross.get(name)
        if block is None or block.channels != inner:
            family = "SDXL" if adapter.adapter.format_name == OFFICIAL_FORMAT else "another model"
            raise ValueError(
                f"AdaptiveMaskGuidance: adapter {adapter.name} was made for {family} (its layer {name} has width {inner}), "
                f"but this MODEL ({type(model.model).__name__}) "
                + ("has no such cross-attention layer." if block is None else f"has width {block.channels} there."))


class AdaptiveMaskGuidance(io.ComfyNode):
    """RealCustom adaptive mask guidance (Huang et al., CVPR 2024), as in the released code.

    A real word of the prompt ("toy") is narrowed to the reference subject: at every step the word's text
    cross-attention map (mean over heads, summed over its tokens, averaged over all cross-attention
    layers at the size of the largest one, paper §3.3: the latent's size on SD1.5, half of it on SDXL)
    is normalised and its top ``mask_scope`` kept with soft values; an image branch in every
    cross-attention layer the adapter serves (the layer's query, the adapter's visual keys/values: its own per
    layer, or a shared pair plus the layer's low-rank change) is multiplied by that mask and added to the text
    attention. Cond rows see the reference, uncond rows a black image with
    the same mask (released code). Works with CFG 1, any batch size (one mask per image), ControlNet, LoRA.

    Paper vs code: the released model has no adaptive scoring module and uses plain CFG (not the paper's
    cascaded eq. 13); this node follows the code by default, offers eq. 13 as ``guidance``, and scores the
    image tokens per call (paper §3.2, γ_num 0.8, masked latent) when the adapter was trained with the
    adaptive scoring module (RealCustomTrainer). ``map_source`` "text-only pass" (default) is the schedule of
    the paper (§3.3) and the released code: before each updating step a forward of the cond rows without the
    image branch reads the map that gates that same step (one extra cond-only forward per updating step;
    bench/map_source.py: +58 % sampling time on the tiny test model on the CPU, CFG 5, every step updating).
    "previous step" is this pack's faster option: the map is read from the cond rows of the guided pass
    itself and gates the next step (one text-only forward at step 0 only), so it comes one step late and
    with the subject already injected; its masks differ from the released schedule's (tiny test model: up
    to 0.98 in a mask value, 3–13 of the 64 kept positions per step at 128 px, 12–47 of 256 at 256 px).

    Families: SD1.5/SD2/SDXL and the DiTs (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image), with an adapter made for
    the model's family (its file records the family; another family's adapter is refused). On a DiT the word map of a block is the head mean of the
    image-token queries' probabilities in the block's one joint softmax over text and image keys, read on the
    word's text columns (Flux: T5 tokens; SD3: CLIP-L/G tokens, then T5's), and the mask grid is the image-token
    grid (every block's map has that size); the branch attends the image-token queries to the reference tokens
    and is added to the image tokens' part of the joint output (text tokens untouched); an adaptive scoring
    module reads the flow's ᾱ of the same signal-to-noise ratio.

    Inputs (safe ranges):
    - model, reference (RealCustomEncodeReference), clip + prompt: the SAME prompt text as the positive
      CLIPTextEncode (share one string); word: a word/phrase that occurs in it (multi-token phrases and
      repeated words are summed).
    - mask_strategy: max_norm (paper, code CLI), min_max_per_channel (code app), min_max_norm.
    - mask_scope: top fraction kept, 0.25 (paper best; robust 0.2–0.4).
    - binary_mask: kept positions become 1 (paper ablation: worse controllability); off.
    - update_fraction: part of the steps during which the mask is recomputed, then frozen; 1.0 = every step
      (code CLI), 0.48 = first 12 of 25 (code app).
    - map_source: "text-only pass" (paper and released code, default) or "previous step" (faster, masks one
      step late).
    - uncond_image: "black image" (released) or "none" (no image branch in the negative pass: stronger push).
    - strength: multiplies the image branch; 1.0 as released, 0 = off.
    - scope_selection: "top-k" keeps the top ``mask_scope`` fraction (paper eq. 11, released default);
      "threshold" keeps the normalised values ≥ 1 − mask_scope (released alternative).
    - guidance: "CFG (released code)" is ComfyUI's CFG between the guided cond and the uncond pass;
      "cascaded (paper eq. 13)" is ε(∅) + ω_t (ε_T2I − ε(∅)) + ω_i (ε_TI2I − ε_T2I) with ω_t = the sampler's
      CFG (paper 7.5) and ω_i = image_guidance (paper 12.5); it costs one text-only cond forward per model
      call (3 instead of 2 per step, as the paper), which also supplies the mask on the released schedule.
      Works at CFG 1 (then no uncond pass) and with any CFG function; needs one positive conditioning.
    - image_guidance: ω_i of the cascaded guidance (0–30, paper 12.5); ignored by the released CFG.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AdaptiveMaskGuidance",
            display_name="RealCustom Subject Guidance (personalization)",
            category=CATEGORY,
            description="RealCustom: a real word of the prompt takes the reference subject, inside that word's own attention mask.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5/SDXL or DiT model (Flux.1, Flux.2, Chroma, SD3/SD3.5, Z-Image, Qwen-Image) of the adapter's family; left unchanged."),
                ReferenceType.Input("reference", tooltip="Reference tokens from RealCustomEncodeReference."),
                io.Clip.Input("clip", tooltip="Text encoder of the model, to find the word's tokens in the prompt."),
                io.String.Input("prompt", multiline=True, default="a photo of a toy on the beach",
                                tooltip="The positive prompt, exactly as encoded for the sampler."),
                io.String.Input("word", default="toy", tooltip="The real word (or phrase) of the prompt that becomes the subject."),
                io.Combo.Input("mask_strategy", options=list(MASK_STRATEGIES), default="max_norm",
                               tooltip="Normalisation of the word map: max_norm (paper), min_max_per_channel (released app)."),
                io.Float.Input("mask_scope", default=0.25, min=0.01, max=1.0, step=0.01,
                               tooltip="Fraction of the image the subject may influence (top of the word map); paper 0.25."),
                io.Boolean.Input("binary_mask", default=False, tooltip="Kept mask values become 1 instead of their soft score."),
                io.Float.Input("update_fraction", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Recompute the mask during this part of the steps, then freeze it (app: 0.48)."),
                io.Combo.Input("map_source", options=list(MAP_SOURCES), default=MAP_SOURCES[0],
                               tooltip="text-only pass: paper and released code (+1 cond pass per updating step); previous step: map of the guided pass, one step late (faster)."),
                io.Combo.Input("uncond_image", options=list(UNCOND_IMAGES), default=UNCOND_IMAGES[0],
                               tooltip="Image the negative pass sees: a black image (released) or none."),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.01,
                               tooltip="Multiplier of the image branch; 1.0 as released, 0 disables it."),
                io.Combo.Input("scope_selection", options=list(SCOPE_SELECTIONS), default=SCOPE_SELECTIONS[0],
                               tooltip="top-k: keep the top mask_scope fraction (paper); threshold: keep values ≥ 1 − mask_scope."),
                io.Combo.Input("guidance", options=list(GUIDANCE_MODES), default=GUIDANCE_MODES[0],
                               tooltip="Released CFG, or the paper's cascaded eq. 13 (ω_t = sampler CFG, ω_i = image_guidance; +1 pass)."),
                io.Float.Input("image_guidance", default=12.5, min=0.0, max=30.0, step=0.1,
                               tooltip="ω_i of the cascaded guidance (paper 12.5 with CFG 7.5); unused by the released CFG."),
            ],
            outputs=[
                io.Model.Output(tooltip="The patched model."),
                MasksType.Output(display_name="masks", tooltip="Masks of every step of the last run; view with RealCustomMaskPreview."),
            ],
        )

    @classmethod
    def execute(cls, model, reference: EncodedReference, clip, prompt, word, mask_strategy, mask_scope, binary_mask,
                update_fraction, map_source, uncond_image, strength, scope_selection=SCOPE_SELECTIONS[0],
                guidance=GUIDANCE_MODES[0], image_guidance=12.5) -> io.NodeOutput:
        blocks = transformer_blocks(model, "AdaptiveMaskGuidance")
        joint = blocks[0].family.joint
        _check_adapter_fits(model, reference.adapter, blocks)
        phrase = find_phrase_tokens(clip, prompt, word, node_name="AdaptiveMaskGuidance").placed(blocks[0].family)
        settings = MaskSettings(strategy=mask_strategy, scope=mask_scope, binary=binary_mask, selection=scope_selection)
        cascaded = guidance == GUIDANCE_MODES[1]
        tokens = ImageTokens(reference.tokens.reference,
                             reference.tokens.negative if uncond_image == UNCOND_IMAGES[0] else None)
        scorer = None
        if reference.features is not None:
            features = ImageTokens(reference.features.reference,
                                   reference.features.negative if uncond_image == UNCOND_IMAGES[0] else None)
            flow = isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)
            scorer = _ScoredTokens(reference.adapter.adapter, features, flow)
        cross_blocks = [b for b in blocks if b.has_cross_attention]
        record = MaskRecord()

        patched = model.clone()
        add_attention_processor(patched, WordMapReader(), cross_blocks)
        add_attention_processor(patched, MaskedImageBranch(reference.adapter.adapter.branch, strength), cross_blocks)
        patched.set_additional_models(RUN_WRAPPER_KEY, [reference.adapter.patcher])
        if joint:
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RUN_WRAPPER_KEY,
                                         guided_apply_model)
        else:
            patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, RUN_WRAPPER_KEY,
                                         guided_diffusion_model)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, RUN_WRAPPER_KEY,
                                     _SamplingRun(settings, phrase.indicator(), update_fraction,
                                                  map_source == MAP_SOURCES[0], tokens, record, cascaded, scorer))
        if cascaded:
            patched.set_model_sampler_pre_cfg_function(_CascadedGuidance(image_guidance, denoised_predictions=joint))
        return io.NodeOutput(patched, record)


class RealCustomMaskPreview(io.ComfyNode):
    """Shows what the word covered: the mask that gated the image branch at every step of the last
    sampling run of an AdaptiveMaskGuidance model, upscaled to the image size.

    - masks: AdaptiveMaskGuidance's masks output.
    - samples: the LATENT of the sampler that used that model (orders this node after sampling).
    Outputs are ordered step by step, each step holding one mask per image of the batch.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RealCustomMaskPreview",
            display_name="RealCustom Mask Preview (personalization)",
            category=CATEGORY,
            description="The word mask of every sampling step, as MASK and IMAGE batches.",
            inputs=[
                MasksType.Input("masks", tooltip="masks output of AdaptiveMaskGuidance."),
                io.Latent.Input("samples", tooltip="Output of the sampler that used the patched model."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="Steps × images masks at image size (step-major)."),
                io.Image.Output(display_name="preview", tooltip="The same masks as grey images, for PreviewImage."),
            ],
        )

    @classmethod
    def execute(cls, masks: MaskRecord, samples) -> io.NodeOutput:
        latent = samples["samples"]
        if not masks.steps:
            raise ValueError("RealCustomMaskPreview: no sampling run of the AdaptiveMaskGuidance model has finished; "
                             "connect the LATENT of the sampler that used that model.")
        if masks.steps[0].shape[0] != latent.shape[0]:
            raise ValueError(f"RealCustomMaskPreview: the last run had {masks.steps[0].shape[0]} images, these samples "
                             f"{latent.shape[0]}; connect the sampler that used the AdaptiveMaskGuidance model.")
        size = (latent.shape[-2] * 8, latent.shape[-1] * 8)
        stacked = torch.cat(masks.steps)[:, None]
        mask = F.interpolate(stacked, size=size, mode="bilinear").clamp(0, 1)[:, 0]
        return io.NodeOutput(mask, mask[..., None].expand(-1, -1, -1, 3).contiguous())


REALCUSTOM_NODES = [RealCustomLoader, RealCustomDINOv2Loader, RealCustomEncodeReference, AdaptiveMaskGuidance, RealCustomMaskPreview]
