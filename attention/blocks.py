"""Finds the transformer blocks of a diffusion model by scanning its modules, never from hard-coded tables.

This module and the joint-attention dispatcher's views (:mod:`.joint`) are the only places that know model
families; technique code sees blocks and attention calls, not families.

Keys are ``(block_name, block_id, transformer_index)``:
- U-Nets (SD1.5/SD2/SDXL) follow ComfyUI's attn1/attn2 patch addressing: ``block_name`` is ``"input"``,
  ``"middle"`` or ``"output"``; the middle block is ``("middle", 0)``.
- DiTs name their blocks as ComfyUI's models do, index 0: Flux ``("double", i, 0)`` and ``("single", i, 0)``,
  SD3/SD3.5 (MMDiT) ``("joint", i, 0)``. Users select them as ``double:3``, ``single:12``, ``joint:7``.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, Optional

import torch

BlockKey = tuple[str, int, int]
#: (path, module) pairs of a diffusion model, as ``named_modules()`` yields them
NamedModules = Iterable[tuple[str, torch.nn.Module]]

_TRANSFORMER_PATH = re.compile(
    r"^(?:(input|output)_blocks\.(\d+)|(middle)_block)\.\d+\.transformer_blocks\.(\d+)$"
)
_DIT_BLOCK_PATH = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.(\d+)$")


class UnsupportedModelError(ValueError):
    """The model is not of a family this pack (or this node) can patch."""


@dataclass(frozen=True)
class Family:
    """What the dispatcher must know of a model family."""

    name: str
    #: how files made for one family (RealCustom adapters) record it; never renamed
    file_tag: str = "unet"
    #: attention reaches the pack through ComfyUI's attention override on joint text+image sequences (DiT),
    #: not through per-block attn1/attn2 replaces (U-Net)
    joint: bool = False
    #: ComfyUI itself puts the running block into transformer_options (Flux); else the dispatcher marks it
    comfy_marks_blocks: bool = False
    #: queries and keys reach the attention function with rotary position embedding already applied
    rope_applied: bool = False
    #: the module (under the diffusion model) whose output is the rotary position embedding of a model call's
    #: tokens, in sequence order (Flux: ``pe_embedder`` on the ids of ``[text | image]``); None without RoPE
    position_embedder: Optional[str] = None
    #: the module whose output is the prompt's conditioning as text tokens (a DiT's text embedder); the dispatcher
    #: finds those rows in the text stream the first block receives (see :func:`.joint.read_joint_layout`)
    text_embedder: Optional[str] = None
    #: the module whose output starts with the sampled latent's image tokens as the first block receives them;
    #: None where positions are added in between (SD3), so only their count can be checked
    image_embedder: Optional[str] = None
    #: the first transformer block, and where it takes its (text, image) streams: a keyword's name, or a position
    first_block: Optional[str] = None
    first_block_streams: tuple = ()


UNET = Family("U-Net (SD1.5/SD2/SDXL)")
FLUX = Family("Flux", file_tag="flux", joint=True, comfy_marks_blocks=True, rope_applied=True,
              position_embedder="pe_embedder", text_embedder="txt_in", image_embedder="img_in",
              first_block="double_blocks.0", first_block_streams=("txt", "img"))
MMDIT = Family("SD3/SD3.5 (MMDiT)", file_tag="sd3", joint=True, text_embedder="context_embedder",
               first_block="joint_blocks.0", first_block_streams=(0, 1))
#: the block names each DiT family's blocks go by, and the family
_DIT_BLOCKS = {"double_blocks": ("double", FLUX), "single_blocks": ("single", FLUX), "joint_blocks": ("joint", MMDIT)}
ALL_FAMILIES = (UNET, FLUX, MMDIT)


#: ComfyUI's model classes (comfy.model_base) of the DiT families the pack patches. A DiT is recognised by its
#: class, nearest first along its MRO, before its block names: Flux.2 and Chroma subclass Flux and keep its block
#: names, HunyuanVideo and Hunyuan3D use them too, and each differs in what a technique relies on (text
#: encoders, modulation, token layout), so none may pass for Flux.1.
DIT_MODEL_CLASSES = {"Flux": "Flux", "SD3": "SD3/SD3.5 (MMDiT)"}
#: the families ComfyUI ships that the pack does not patch yet, by their model class, as users call them
OTHER_FAMILIES = {"Flux2": "Flux.2", "Chroma": "Chroma", "ChromaRadiance": "Chroma Radiance",
                  "QwenImage": "Qwen-Image", "Lumina2": "Lumina 2 / Z-Image", "HiDream": "HiDream",
                  "HunyuanImage21": "HunyuanImage 2.1", "HunyuanVideo": "HunyuanVideo", "AuraFlow": "AuraFlow"}


def family_of_tag(tag: str) -> Family:
    """The family a file records as ``tag`` (:attr:`Family.file_tag`); ValueError for an unknown one."""
    for family in ALL_FAMILIES:
        if family.file_tag == tag:
            return family
    raise ValueError(f"unknown model family {tag!r} (known: {', '.join(f.file_tag for f in ALL_FAMILIES)})")


@dataclass(frozen=True)
class JointProjections:
    """Where a DiT block projects the tokens of its joint attention (module paths under the diffusion model).

    The image queries are the first ``width`` outputs of ``image_qkv`` (then ``[keys | values]``), normalised per
    head by ``query_norm``; the text keys and values are outputs ``width .. 3 width`` of ``text_qkv``, the keys
    normalised per head by ``key_norm`` (an ``nn.Identity`` in SD3 models without such norms). ``image_qkv``'s
    input holds the text tokens first when the block runs one stream over ``[text | image]`` (Flux's single
    blocks)."""

    image_qkv: str
    query_norm: str
    text_qkv: str
    key_norm: str
    one_stream: bool = False


def _joint_projections(path: str, name: str) -> JointProjections:
    if name == "double":
        return JointProjections(f"{path}.img_attn.qkv", f"{path}.img_attn.norm.query_norm", f"{path}.txt_attn.qkv",
                                f"{path}.txt_attn.norm.key_norm")
    if name == "single":
        return JointProjections(f"{path}.linear1", f"{path}.norm.query_norm", f"{path}.linear1",
                                f"{path}.norm.key_norm", one_stream=True)
    return JointProjections(f"{path}.x_block.attn.qkv", f"{path}.x_block.attn.ln_q", f"{path}.context_block.attn.qkv",
                            f"{path}.context_block.attn.ln_k")


@dataclass(frozen=True)
class TransformerBlock:
    key: BlockKey
    module_path: str
    heads: int
    dim_head: int
    #: image features attend to text: a U-Net attn2, or the image-query x text-key part of a DiT's joint attention
    has_cross_attention: bool
    #: the only transformer of its spatial transformer (SD1.x): other packs may key its replace by (name, id)
    alone_in_block: bool = False
    family: Family = UNET
    #: the projections of a DiT block's joint attention; None on a U-Net
    projections: Optional[JointProjections] = None

    @property
    def channels(self) -> int:
        return self.heads * self.dim_head

    @property
    def label(self) -> str:
        """The block as users select it: ``input:4.0``, ``double:3``."""
        name, block_id, index = self.key
        return f"{name}:{block_id}" if self.family.joint else f"{name}:{block_id}.{index}"


_ORDER = {"input": 0, "output": 1, "middle": 2, "double": 0, "single": 1, "joint": 0}


def _order(key: BlockKey) -> tuple[int, int, int]:
    # Diffusers registers down blocks, then up blocks, then the middle block; the paper's
    # layer-fraction control (StyleAligned `only_self_level`) indexes layers in that order. DiTs run in
    # their forward order: Flux's double blocks, then its single blocks.
    return _ORDER[key[0]], key[1], key[2]


def discover_transformer_blocks(modules: NamedModules, model_name: str = "model",
                                model_classes: Optional[list[str]] = None) -> list[TransformerBlock]:
    """All transformer blocks of a U-Net (SD1.x/SD2/SDXL) or DiT (Flux.1, SD3/SD3.5), in layer order, from the
    ``(path, module)`` pairs of its module tree (the tree as loaded: see nodes.patching). ``model_classes``: the
    names along the MRO of ComfyUI's model object, which a DiT must be recognised by (:data:`DIT_MODEL_CLASSES`);
    None where the model was recognised before (a model call's hooks).

    Raises UnsupportedModelError for any other architecture, naming the family where ComfyUI's class tells it
    and the families that are supported.
    """
    modules = list(modules)
    tops = {path for path, _ in modules if path and "." not in path}
    supported = ", ".join(f.name for f in ALL_FAMILIES)
    if {"input_blocks", "output_blocks"} <= tops:
        blocks = _unet_blocks(modules)
    else:
        known = next((name for name in model_classes or () if name in DIT_MODEL_CLASSES or name in OTHER_FAMILIES),
                     None)
        if known in OTHER_FAMILIES:
            raise UnsupportedModelError(
                f"{model_name} is a {OTHER_FAMILIES[known]} model, which the personalization nodes do not patch "
                f"yet; supported families: {supported}.")
        blocks = _dit_blocks(modules) if model_classes is None or known is not None else []
    if not blocks:
        root = type(modules[0][1]).__name__ if modules else "empty model"
        raise UnsupportedModelError(
            f"{model_name} is a {root}, which the personalization nodes cannot patch; supported families: "
            f"{supported}.")
    return sorted(blocks, key=lambda b: _order(b.key))


def _unet_blocks(modules) -> list[TransformerBlock]:
    blocks = []
    for path, module in modules:
        match = _TRANSFORMER_PATH.match(path)
        if match is None:
            continue
        name, block_id, middle, index = match.groups()
        key = ("middle", 0, int(index)) if middle else (name, int(block_id), int(index))
        attn1 = module.attn1
        blocks.append(TransformerBlock(
            key=key,
            module_path=path,
            heads=attn1.heads,
            dim_head=attn1.dim_head,
            has_cross_attention=getattr(module, "attn2", None) is not None,
        ))
    depth = Counter(b.key[:2] for b in blocks)
    return [replace(b, alone_in_block=depth[b.key[:2]] == 1) for b in blocks]


def _dit_blocks(modules) -> list[TransformerBlock]:
    blocks = []
    for path, module in modules:
        match = _DIT_BLOCK_PATH.match(path)
        if match is None:
            continue
        name, family = _DIT_BLOCKS[match.group(1)]
        attention = module.x_block.attn if family is MMDIT else module
        heads = attention.num_heads
        width = module.x_block.attn.qkv.weight.shape[1] if family is MMDIT else module.hidden_size
        blocks.append(TransformerBlock(key=(name, int(match.group(2)), 0), module_path=path, heads=heads,
                                       dim_head=width // heads, has_cross_attention=True, family=family,
                                       projections=_joint_projections(path, name)))
    return blocks


def group_norms(modules: NamedModules) -> list[tuple[str, torch.nn.GroupNorm]]:
    """``(path, module)`` of every GroupNorm in the U-Net (ResBlocks and transformer input norms)."""
    return [(path, module) for path, module in modules if isinstance(module, torch.nn.GroupNorm)]


def parse_block_selection(text: str, blocks: list[TransformerBlock]) -> frozenset[BlockKey]:
    """Turns a user selector like ``"input, middle, output:3, output:4.1"`` or ``"double, single:0"`` into
    block keys.

    Each comma-separated item is ``name``, ``name:id`` or ``name:id.index`` with a block name of the model
    (U-Net: input, middle, output; Flux: double, single; SD3: joint); empty text selects all. Unknown names
    or items matching no block raise ValueError listing what exists.
    """
    keys = [b.key for b in blocks]
    names = sorted({k[0] for k in keys}, key=lambda n: _ORDER[n])
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return frozenset(keys)
    selected = set()
    for item in items:
        match = re.fullmatch(r"([a-z]+)(?::(\d+)(?:\.(\d+))?)?", item)
        if match is None or match.group(1) not in names:
            raise ValueError(f"block selector {item!r} is not of the form name, name:id or name:id.index "
                             f"(name is {', '.join(names)} for this model)")
        name, block_id, index = match.groups()
        hits = [k for k in keys if k[0] == name
                and (block_id is None or k[1] == int(block_id))
                and (index is None or k[2] == int(index))]
        if not hits:
            available = ", ".join(b.label for b in blocks)
            raise ValueError(f"block selector {item!r} matches no transformer block; this model has: {available}")
        selected.update(hits)
    return frozenset(selected)


def evenly_skipped(keys: list[BlockKey], skip_fraction: float) -> frozenset[BlockKey]:
    """The keys that keep sharing when a fraction of layers is switched off at even spacing.

    Mirrors StyleAligned's ``only_self_level`` switch vector: with ``count = int(level * layers)``
    every ``layers // count``-th layer is switched off; above one half the complement pattern is
    used, so the switched-off layers stay spread over the network.
    """
    if not 0.0 <= skip_fraction <= 1.0:
        raise ValueError(f"skip fraction must lie in [0, 1], got {skip_fraction}")
    if skip_fraction == 1.0:
        return frozenset()
    flipped = skip_fraction > 0.5
    switched = int((1.0 - skip_fraction if flipped else skip_fraction) * len(keys))
    if switched == 0:
        return frozenset() if flipped else frozenset(keys)
    period = len(keys) // switched
    on_grid = {i for i in range(len(keys)) if i % period == 0}
    return frozenset(k for i, k in enumerate(keys) if (i in on_grid) == flipped)
