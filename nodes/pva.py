"""Parallel Visual Attention nodes (Xu et al., "Personalized Face Inpainting with Diffusion Models by
Parallel Visual Attention", WACV 2024).

- PVALoader: a PVA weights file (parallel projections, identity token transformer, identity word).
- ParallelVisualAttention: patches a MODEL so the reference faces' identity tokens join every
  cross-attention softmax (works with inpainting models and InpaintModelConditioning, and plain txt2img).
- PVATextEncode: CLIPTextEncode with the learned identity word put in place of its placeholder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import folder_paths
import torch

from ..attention.blocks import TransformerBlock, selected_blocks
from ..attention.low_rank import LowRankChange
from ..attention.pva import (JointParallelProjection, LowRankJointProjection, LowRankParallelProjection,
                             OwnProjections, ParallelProjection, ParallelVisualAttentionProcessor, WeightReader,
                             block_name)
from ..attention.pva_identity import IResNet, arcface_crop
from ..attention.pva_weights import PVAFormatError, PVAWeights
from .comfy_io import io
from .model_folders import register_model_folder
from .validation import checked_clip, read_safetensors, require_finite
from .patching import WRAPPER_KEY, add_attention_processor, sigma_range, transformer_blocks
from .prompt_tokens import encoder_attribute, occurrences_per_encoder

CATEGORY = "personalization/pva"
PVA_FOLDER = "pva"
#: InsightFace's ArcFace r50 trained on MS1MV3, the paper's identity backbone, converted to safetensors.
ARCFACE_FILE = "ms1mv3_arcface_r50.safetensors"
PVAType = io.Custom("PVA")


register_model_folder(PVA_FOLDER)  # PVA weights and the ArcFace backbone


@dataclass(frozen=True)
class LoadedPVA:
    """A PVA file and the ModelPatcher that lets ComfyUI's memory manager place its weights."""

    name: str
    weights: PVAWeights
    patcher: comfy.model_patcher.ModelPatcher


def _arcface_backbone() -> IResNet:
    path = folder_paths.get_full_path(PVA_FOLDER, ARCFACE_FILE)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths(PVA_FOLDER))
        raise FileNotFoundError(
            f"PVALoader: this PVA file uses the ArcFace identity encoder, but {ARCFACE_FILE} is not in {folders}. "
            "Get InsightFace's arcface_torch ms1mv3_arcface_r50 weights (ms1mv3_arcface_r50.pth, the paper's "
            "backbone) and convert them once to safetensors (see the PVALoader docs); pickled .pth files are not "
            "loaded. Or use a PVA file trained with the CLIP vision encoder.")
    return IResNet.from_state_dict(read_safetensors("PVALoader", path, "ArcFace backbone")[0])


class PVALoader(io.ComfyNode):
    """Loads PVA weights (Xu et al., WACV 2024) from ``models/pva`` (safetensors only).

    A PVA file holds the parallel query/key/value projections of every cross-attention layer, the
    identity token transformer, the learned identity word and, when trained in the paper's stage 2, its
    own ArcFace backbone. Files come from PVATrainer / PVAIdentityTune (the authors released no weights).
    Files trained on ArcFace features need ``models/pva/ms1mv3_arcface_r50.safetensors`` unless they
    carry their own backbone.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVALoader",
            display_name="PVA Load Face Weights (personalization)",
            category=CATEGORY,
            description="Load Parallel Visual Attention weights (projections, identity tokens, identity word).",
            inputs=[io.Combo.Input("pva_name", options=folder_paths.get_filename_list(PVA_FOLDER),
                                   tooltip="A PVA .safetensors file in models/pva.")],
            outputs=[PVAType.Output(display_name="pva", tooltip="PVA weights for ParallelVisualAttention and PVATextEncode.")],
        )

    @classmethod
    def execute(cls, pva_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(PVA_FOLDER, pva_name)
        if path is None:
            raise FileNotFoundError(f"PVALoader: {pva_name!r} is not in {folder_paths.get_folder_paths(PVA_FOLDER)}")
        weights = PVAWeights.from_state(*read_safetensors("PVALoader", path, "PVA weights file"), source=Path(path).name)
        if weights.encoder == "arcface" and weights.face_encoder is None:
            weights.face_encoder = _arcface_backbone()
            weights.stock_face_encoder = True
        patcher = comfy.model_patcher.ModelPatcher(weights, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(LoadedPVA(pva_name, weights, patcher))


def own_layers(model, block: TransformerBlock) -> tuple[tuple[torch.nn.Module, slice], ...]:
    """(layer, output rows) of the block's own query (image stream), key and value (text stream) projections."""
    module = model.get_model_object("diffusion_model").get_submodule
    paths = block.projections
    if paths is None:
        attn2 = module(block.module_path).attn2
        return (attn2.to_q, slice(None)), (attn2.to_k, slice(None)), (attn2.to_v, slice(None))
    width = block.channels
    return tuple((module(role.path), role.rows(width)) for role in (paths.image_query, paths.text_key, paths.text_value))


def context_width(model, block: TransformerBlock) -> int:
    """Width of the identity tokens the block's parallel keys take: its own key projection's input width."""
    return own_layers(model, block)[1][0].in_features


def parallel_projections(model, blocks: list[TransformerBlock], rank: int = 0) -> dict[str, torch.nn.Module]:
    """The paper's initial parallel projections of each of ``blocks``: copies of the block's own (a U-Net's
    attn2 to_q/k/v; a DiT block's image query and text key/value projections with their per-head norms); with
    ``rank`` > 0 their low-rank form (the block's own read at run time plus a change, zero at the start)."""
    module = model.get_model_object("diffusion_model").get_submodule
    projections = {}
    for block in blocks:
        query, key, value = own_layers(model, block)
        width = block.channels
        paths = block.projections
        if rank and paths is None:
            projection = LowRankParallelProjection(query[0].in_features, key[0].in_features, query[0].out_features,
                                                   rank)
        elif rank:
            projection = LowRankJointProjection.initial(query[0].in_features, width, rank, module(paths.query_norm),
                                                        module(paths.key_norm))
        elif paths is None:
            projection = ParallelProjection.copy_of(module(block.module_path).attn2)
        else:
            projection = JointParallelProjection.copy_of(query, module(paths.query_norm), key, value,
                                                         module(paths.key_norm), width)
        projections[block_name(block.key)] = projection
    return projections


def _live_rows(layer: torch.nn.Module, rows: slice) -> WeightReader:
    """Reads ``rows`` of a ComfyUI linear layer's weight and bias as its own forward uses them at that moment: cast
    to the input's dtype and device by ComfyUI (fp16/bf16/fp8 storage, low-VRAM offload), fp8 scale applied, LoRA
    patches included (merged into the weight on a normal load, applied at cast time in low-VRAM mode)."""
    def read(x: torch.Tensor):
        if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None) \
                or getattr(layer, "bias_function", None):
            weight, bias = comfy.ops.cast_bias_weight(layer, x)
        else:
            weight, bias = layer.weight.to(x), None if layer.bias is None else layer.bias.to(x)
        scale = getattr(layer, "scale_weight", None)  # comfy.ops.scaled_fp8_ops
        if scale is not None:
            weight = weight * scale.to(weight)
        return weight[rows], None if bias is None else bias[rows]
    return read


def own_projections(model, blocks: list[TransformerBlock]) -> dict[str, OwnProjections]:
    """The base of low-rank parallel projections: each block's own query, key and value projections, read from
    the MODEL as sampled (its LoRAs included: the block's text projections run with them too, and the paper's
    copy is of the model the pathway is used with; see docs/pva.md)."""
    return {block_name(b.key): OwnProjections(*(_live_rows(layer, rows) for layer, rows in own_layers(model, b)))
            for b in blocks}


def _check_model_fits(pva: LoadedPVA, model, node: str = "ParallelVisualAttention") -> list:
    """The model's cross-attention blocks that carry the file's projections (its block selection), after checking
    the file was made for the model's family and has a projection of the right shape for each."""
    blocks = [b for b in transformer_blocks(model, node) if b.has_cross_attention]
    family = blocks[0].family
    if pva.weights.family != family:
        raise PVAFormatError(f"{node}: {pva.name} was trained for {pva.weights.family.name} models, but this MODEL "
                             f"({type(model.model).__name__}) is a {family.name} model; use a PVA file trained for "
                             f"{family.name}.")
    try:
        keys = set(selected_blocks(pva.weights.block_selection, [b.key for b in blocks]))
    except ValueError as error:
        raise PVAFormatError(f"{node}: {pva.name}: {error}") from None
    blocks = [b for b in blocks if b.key in keys]
    names = {block_name(b.key) for b in blocks}
    if names != set(pva.weights.parallel):
        raise PVAFormatError(
            f"{node}: {pva.name} was trained for a model with the cross-attention blocks "
            f"{sorted(pva.weights.parallel)} (block selection {pva.weights.block_selection!r}), but this model has "
            f"{sorted(names)} there; use a PVA file trained on this model family.")
    diffusion_model = model.get_model_object("diffusion_model")
    for block in blocks:
        projection = pva.weights.parallel[block_name(block.key)]
        for name, shape in _needed_shapes(diffusion_model, block).items():
            if _shape(getattr(projection, name)) != shape:
                raise PVAFormatError(
                    f"{node}: {pva.name} does not fit this model: block {block.label} needs {name} of shape "
                    f"{tuple(shape)} but the file's is {tuple(_shape(getattr(projection, name)))} (another model "
                    "family or size?).")
    return blocks


def _shape(layer: torch.nn.Module) -> torch.Size:
    """(out, in) of a full-rank projection's weight or of a low-rank change's matrix."""
    if isinstance(layer, LowRankChange):
        return torch.Size((layer.out_features, layer.in_features))
    return layer.weight.shape


def _needed_shapes(diffusion_model, block: TransformerBlock) -> dict[str, torch.Size]:
    """The weight shape of each parallel projection (to_visual_q/k/v) of ``block``."""
    if block.projections is None:
        attn2 = diffusion_model.get_submodule(block.module_path).attn2
        return {"to_visual_q": attn2.to_q.weight.shape, "to_visual_k": attn2.to_k.weight.shape,
                "to_visual_v": attn2.to_v.weight.shape}
    hidden = diffusion_model.get_submodule(block.projections.image_query.path).weight.shape[1]
    return dict.fromkeys(("to_visual_q", "to_visual_k", "to_visual_v"), torch.Size((block.channels, hidden)))


def reference_features(pva: LoadedPVA, references: torch.Tensor, clip_vision=None) -> torch.Tensor:
    """One feature vector per reference image ``(R, F)`` from the encoder the PVA file was trained with."""
    if pva.weights.encoder == "clip_vision":
        if clip_vision is None:
            raise ValueError(f"ParallelVisualAttention: {pva.name} was trained on CLIP vision features; connect the "
                             "same CLIP vision model (Load CLIP Vision) to clip_vision.")
        return clip_vision.encode_image(references).image_embeds.float()
    if clip_vision is not None:
        raise ValueError(f"ParallelVisualAttention: {pva.name} uses the ArcFace face encoder; disconnect clip_vision "
                         "(it would be ignored).")
    if references.shape[1] != references.shape[2]:
        raise ValueError(f"ParallelVisualAttention: reference faces must be square, aligned face crops (CelebA-HQ "
                         f"style, as the paper's encoder expects); got {references.shape[2]}x{references.shape[1]}.")
    comfy.model_management.load_models_gpu([pva.patcher])
    encoder = pva.weights.face_encoder.train(False)
    parameter = next(encoder.parameters())
    faces = arcface_crop(references[..., :3].movedim(-1, 1).to(parameter) * 2 - 1)
    return encoder(faces).float()


def identity_tokens(pva: LoadedPVA, references, images_per_identity: int, clip_vision=None) -> torch.Tensor:
    """``(G, N, context_dim)`` tokens: references grouped ``images_per_identity`` at a time (0 = one identity)."""
    if references is None or references.shape[0] == 0:
        raise ValueError("ParallelVisualAttention: no reference image; connect one or more photos of the person "
                         "(aligned face crops) to references.")
    require_finite("ParallelVisualAttention", "references", references)
    count = references.shape[0]
    per_identity = images_per_identity or count
    if count % per_identity != 0:
        raise ValueError(f"ParallelVisualAttention: {count} reference images cannot be split into identities of "
                         f"{per_identity} images each; images_per_identity must divide the number of references.")
    with torch.no_grad():
        features = reference_features(pva, references, clip_vision)
        comfy.model_management.load_models_gpu([pva.patcher])
        tokens = pva.weights.identity_tokens(features.view(count // per_identity, per_identity, -1))
    return tokens.float().to(comfy.model_management.intermediate_device())


def _check_batch(identities: int):
    def check(executor, noise, *args, **kwargs):
        if identities not in (1, noise.shape[0]):
            raise ValueError(f"ParallelVisualAttention: the references hold {identities} identities but the latent "
                             f"batch has {noise.shape[0]} images; use one identity for all images, or exactly one "
                             "per image.")
        return executor(noise, *args, **kwargs)
    return check


class ParallelVisualAttention(io.ComfyNode):
    """Parallel Visual Attention (Xu et al., WACV 2024): identity-preserving (face) inpainting.

    Reference photos of one person → identity encoder (ArcFace r50, or a CLIP vision model as a
    documented deviation) → token transformer → 10 identity tokens. In every cross-attention layer the
    parallel projections turn them into keys/values (with their own query projection) that join the
    text keys in ONE softmax. Use an inpainting model with InpaintModelConditioning or
    VAEEncodeForInpaint (paper: SD2-inpainting, CFG 1, DDIM), or plain text-to-image; write the identity
    word with PVATextEncode ("photo of a <new1> person"). Families: SD1.5, SD2, SDXL, and (our extension)
    Flux and SD3/SD3.5, where the identity keys join each block's joint softmax of the image queries (text
    queries never see them) through projections copied from the block's image query and text key/value
    projections with their per-head norms; the PVA file must be trained for the model's family.

    Inputs (safe ranges):
    - pva: weights from PVALoader (trained for this model family; files record their family).
    - references: 1–5 square, aligned face crops of the person (paper: CelebA-HQ alignment).
    - strength: multiplies the identity keys' attention mass (not in the paper); 1 = paper, 0 = off,
      0.5–1.5 sensible.
    - uncond_identity: also give the identity to the negative pass (official extra_feat_neg, used for
      language-guided edits at CFG ~6); off = CFG also amplifies identity.
    - images_per_identity: 0 = all references are one person; otherwise consecutive groups of this
      many references are one identity each, image i of the latent batch gets identity i.
    - start_percent / end_percent: part of sampling during which the identity is attended to.
    - clip_vision: the CLIP vision model, only for PVA files trained on CLIP vision features.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelVisualAttention",
            display_name="PVA Face Identity Inpaint (personalization)",
            category=CATEGORY,
            description="PVA: reference faces become identity tokens that join every cross-attention softmax.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (paper: SD2 inpainting); the input model is left unchanged."),
                PVAType.Input("pva", tooltip="PVA weights from PVALoader, trained for this model family."),
                io.Image.Input("references", tooltip="Square, aligned face crops of the person (1-5 in the paper)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05,
                               tooltip="Multiplies the identity keys' share of attention; 1 = paper, 0 = off."),
                io.Boolean.Input("uncond_identity", default=False,
                                 tooltip="Give the identity to the negative pass too (paper's language-edit mode at CFG > 1)."),
                io.Int.Input("images_per_identity", default=0, min=0, max=64,
                             tooltip="0: all references are one person; N: every N references are the identity of the next image of the batch."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="Identity attention starts at this part of sampling."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="Identity attention ends at this part of sampling."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Only for PVA files trained on CLIP vision features (a deviation from the paper's ArcFace)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with parallel visual attention to the reference identity.")],
        )

    @classmethod
    def execute(cls, model, pva, references, strength, uncond_identity, images_per_identity, start_percent,
                end_percent, clip_vision=None) -> io.NodeOutput:
        blocks = _check_model_fits(pva, model)
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        tokens = identity_tokens(pva, references, images_per_identity, clip_vision)
        processor = ParallelVisualAttentionProcessor(pva.weights.parallel, tokens, strength=strength,
                                                     uncond_identity=uncond_identity, sigma_start=sigma_start,
                                                     sigma_end=sigma_end,
                                                     own_projections=own_projections(model, blocks))
        patched = model.clone()
        add_attention_processor(patched, processor, blocks)
        patched.set_additional_models(WRAPPER_KEY + ".pva", [pva.patcher])
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY + ".pva",
                                     _check_batch(tokens.shape[0]))
        return io.NodeOutput(patched)


def put_identity_word(chunks: list, occurrences, vector: torch.Tensor) -> list:
    """Token chunks with each occurrence of the placeholder replaced by ONE slot holding ``vector`` (the
    official ``<new1>`` is one token); the chunk keeps its length by repeating its last (pad) entry."""
    chunks = [list(chunk) for chunk in chunks]
    length = len(chunks[0])
    for occurrence in reversed(occurrences):
        index = occurrence[0] // length
        if any(position // length != index for position in occurrence):
            raise ValueError("PVATextEncode: the identity word straddles two 75-token windows of the prompt; move it "
                             "earlier in the prompt.")
        chunk = chunks[index]
        local = [position - index * length for position in occurrence]
        first = chunk[local[0]]
        chunk[local[0]] = (vector, *first[1:])
        for position in reversed(local[1:]):
            del chunk[position]
        chunk.extend([chunk[-1]] * (len(local) - 1))
    return chunks


class PVATextEncode(io.ComfyNode):
    """CLIPTextEncode with PVA's learned identity word (Xu et al., WACV 2024, the ``<new1>`` token).

    Every occurrence of ``identity_word`` in the text becomes ONE token slot holding the vector learned
    with the PVA weights (official prompt: "photo of a <new1> person"; negative: "photo of a person").
    - identity_word: the placeholder as written in the text; it must occur in it.
    """

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PVATextEncode",
            display_name="PVA Face Identity Prompt (personalization)",
            category=CATEGORY,
            description="Encode a prompt whose identity placeholder becomes PVA's learned identity word.",
            inputs=[
                io.Clip.Input("clip", tooltip="Text encoder of the model."),
                PVAType.Input("pva", tooltip="PVA weights holding the learned identity word."),
                io.String.Input("text", multiline=True, default="photo of a <new1> person",
                                tooltip="Prompt containing the identity word, e.g. 'photo of a <new1> person, smiling'."),
                io.String.Input("identity_word", default="<new1>", tooltip="The placeholder in the text that stands for the person."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The encoded prompt with the learned identity word.")],
        )

    @classmethod
    def execute(cls, clip, pva, text, identity_word) -> io.NodeOutput:
        clip = checked_clip("PVATextEncode", clip)
        found = occurrences_per_encoder(clip, text, identity_word, node_name="PVATextEncode")
        tokens = clip.tokenize(text)
        missing = sorted(set(tokens) - set(pva.weights.identity_word))
        if missing:
            raise PVAFormatError(f"PVATextEncode: {pva.name} has identity-word vectors for the text encoders "
                                 f"{sorted(pva.weights.identity_word)}, but this CLIP also uses {missing}; use the "
                                 "PVA file trained for this model.")
        for encoder, chunks in tokens.items():
            vector = pva.weights.identity_word[encoder].detach().float().reshape(-1)
            expected = token_embeddings(clip, encoder).shape[1]
            if vector.shape[0] != expected:
                raise PVAFormatError(f"PVATextEncode: {pva.name}'s identity word for encoder {encoder!r} is "
                                     f"{vector.shape[0]}-d but the encoder's tokens are {expected}-d.")
            tokens[encoder] = put_identity_word(chunks, found[encoder], vector)
        return io.NodeOutput(clip.encode_from_tokens_scheduled(tokens))


def token_embeddings(clip, encoder: str) -> torch.Tensor:
    """The vocabulary's embedding table of one text encoder (tokenizer key ``encoder``)."""
    model = getattr(clip.cond_stage_model, encoder_attribute(clip, encoder))
    return model.transformer.get_input_embeddings().weight


PVA_NODES = [PVALoader, ParallelVisualAttention, PVATextEncode]
