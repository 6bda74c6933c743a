"""What every family adapter answers, and the blocks it finds.

A :class:`Family` is the one place that knows a model family: how ComfyUI's objects of that family are
recognised (its model classes, its text encoders), where its transformer blocks are and what users call them,
how the pack learns which block runs (ComfyUI names it, or a block marker must), how a model call lays out
its tokens (the text and image embedders and the streams the first block receives), where rotary positions
are applied and in which format, and how its joint attention projects its tokens. Technique code reads these
answers through blocks and attention calls and never asks which family it runs on.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

BlockKey = tuple[str, int, int]
#: (path, module) pairs of a diffusion model, as ``named_modules()`` yields them
NamedModules = Iterable[tuple[str, torch.nn.Module]]


class UnsupportedModelError(ValueError):
    """The model is not of a family this pack (or this node) can patch."""


@dataclass(frozen=True)
class ProjectionRows:
    """The output rows of a linear layer (path under the diffusion model) that project one role of a block's
    attention, its queries, keys or values: part ``part`` of ``parts`` equal slices (Flux's and SD3's fused qkv:
    parts 3), or all of them (Qwen-Image's separate projections)."""

    path: str
    part: int = 0
    parts: int = 1

    def rows(self, width: int) -> slice:
        """The rows of a role ``width`` wide."""
        return slice(self.part * width, (self.part + 1) * width)


@dataclass(frozen=True)
class JointProjections:
    """Where a DiT block projects the tokens of its joint attention: the image tokens' queries (normalised per head
    by ``query_norm``) and the text tokens' keys (normalised by ``key_norm``, an ``nn.Identity`` in SD3 models
    without such norms) and values. The image queries' layer takes the block's image-token input, with the text
    tokens in front when the block runs one stream over ``[text | image]`` (``one_stream``, Flux's single
    blocks)."""

    image_query: ProjectionRows
    query_norm: str
    text_key: ProjectionRows
    text_value: ProjectionRows
    key_norm: str
    one_stream: bool = False

    @classmethod
    def fused(cls, image_qkv: str, query_norm: str, text_qkv: str, key_norm: str, one_stream: bool = False):
        """Projections of fused ``[q | k | v]`` layers, one per stream."""
        return cls(ProjectionRows(image_qkv, 0, 3), query_norm, ProjectionRows(text_qkv, 1, 3),
                   ProjectionRows(text_qkv, 2, 3), key_norm, one_stream)


@dataclass(frozen=True)
class ConditioningPlacement:
    """Where a prompt's conditioning of ``tokens`` tokens sits in the token conditioning the model receives, which
    ComfyUI's ``extra_conds`` may pad (Flux.2 left-pads it to 512 tokens with zeros): ``total`` tokens, the
    prompt's starting at ``offset``, the others zero."""

    tokens: int
    total: int
    offset: int = 0

    def place(self, conditioning: torch.Tensor) -> torch.Tensor:
        """``(B, tokens, ...)`` conditioning (or its attention mask) as the model receives it."""
        if self.total == self.tokens:
            return conditioning
        after = self.total - self.offset - self.tokens
        return torch.nn.functional.pad(conditioning, (0, 0) * (conditioning.ndim - 2) + (self.offset, after))

    def shift(self, positions: Iterable[int]) -> tuple[int, ...]:
        """Token positions of the prompt's conditioning as positions of the model's."""
        return tuple(self.offset + p for p in positions)


@dataclass(frozen=True)
class Family:
    """A model family's adapter. The base answers for a family with nothing of its own: subclasses override
    :meth:`recognises`, :meth:`find_blocks` and, where they have them, the rest."""

    name: str
    #: how files made for one family (RealCustom adapters, PVA files) record it; never renamed
    file_tag: str
    #: the family's block names in layer order (the order StyleAligned's layer fraction counts them in)
    block_names: tuple[str, ...]
    #: attention reaches the pack through ComfyUI's attention override on joint text+image sequences (DiT),
    #: not through per-block attn1/attn2 replaces (U-Net)
    joint: bool = False
    #: ComfyUI's model classes (comfy.model_base) of the family, matched by name along the model's MRO, nearest
    #: first: families that subclass another's class (Chroma and Flux.2 subclass Flux) are told apart by them
    model_classes: tuple[str, ...] = ()
    #: ComfyUI itself puts the running block into transformer_options (Flux); else a block marker must: in
    #: ComfyUI's ``dit`` block replace (:meth:`marker_key`, SD3) or, where ComfyUI offers none (Z-Image), by hooks
    #: on the blocks for the duration of each model call (``marked_by_call_hooks``)
    comfy_marks_blocks: bool = True
    marked_by_call_hooks: bool = False
    #: the module (under the diffusion model) whose output is the rotary position embedding of a model call's
    #: tokens, in sequence order; None without RoPE
    position_embedder: Optional[str] = None
    #: the module whose output is the prompt's conditioning as text tokens (a DiT's text embedder); the dispatcher
    #: finds those rows in the text stream the first block receives (see attention.joint.read_joint_layout)
    text_embedder: Optional[str] = None
    #: the module whose output starts with the sampled latent's image tokens as the first block receives them;
    #: None where positions are added in between (SD3), so only their count can be checked
    image_embedder: Optional[str] = None
    #: the first transformer block, and where it takes its (text, image) streams: a keyword's name, or a position
    first_block: Optional[str] = None
    first_block_streams: tuple = ()
    #: for a first block that takes ONE stream ``[text | image]`` (``first_block_streams`` names it alone): the
    #: module whose output is its text part (of a ModuleList: its last module's), the prompt's tokens first,
    #: refined in place (Z-Image's context refiners), so they are found by their count, not by their values
    text_stream: Optional[str] = None
    #: ComfyUI's text-encoder combination (a class of comfy.text_encoders, matched along the CLIP model's MRO) that
    #: is this family's own; None where the family's text encoder is no combination of its own
    text_encoder_class: Optional[str] = None

    def recognises(self, tops: set[str], model_classes: Optional[list[str]]) -> bool:
        """Whether a model whose top-level modules are ``tops`` and whose ComfyUI class has ``model_classes`` along
        its MRO (None: not known, a model call's hooks) is of this family."""
        raise NotImplementedError

    def find_blocks(self, modules: list) -> list["TransformerBlock"]:
        """The family's transformer blocks among ``(path, module)`` pairs, in any order."""
        raise NotImplementedError

    def marker_key(self, block: "TransformerBlock") -> Optional[tuple]:
        """ComfyUI's ``dit`` block-replace key of ``block``, for families whose forward does not name the running
        block (``comfy_marks_blocks`` False)."""
        return None

    def query_placement(self, positions: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """How the attention function gets image queries ``(B, N, heads * d)`` of tokens whose rotary embedding is
        ``positions`` (what the position embedder made, sliced to those tokens): a function, or None without
        RoPE."""
        return None

    def context_stretches(self, encoders, tokens: dict) -> Optional[list[tuple[str, ...]]]:
        """Which tokenizer keys of ``tokens`` fill the conditioning's token axis, one tuple per stretch in token
        order, when ``encoders`` (a CLIP's ``cond_stage_model``) is this family's own combination of text
        encoders; None for any other."""
        return None

    def encodes_with(self, encoders) -> bool:
        """Whether ``encoders`` (a CLIP's ``cond_stage_model``) is this family's own combination of text encoders."""
        return self.text_encoder_class is not None and self.text_encoder_class in class_names(encoders)

    def batched_prompts(self, per_prompt: list[torch.Tensor]) -> torch.Tensor:
        """Per-prompt token tensors (``(1, tokens, ...)``: contexts, attention masks) of this family's text encoders
        as one batch. Those of different lengths are repeated up to a common length, as ComfyUI batches U-Net conds
        (a cross-attention over a repeated context is the same attention)."""
        length = math.lcm(*(t.shape[1] for t in per_prompt))
        return torch.cat([t.repeat(1, length // t.shape[1], *(1,) * (t.ndim - 2)) for t in per_prompt])

    def reads_pooled(self, adm_channels: int) -> bool:
        """Whether the model reads the pooled text vector (through ComfyUI's ``encode_adm``) besides the token
        conditioning, given its ADM input width: what a trainer must give each training call."""
        return True

    def training_guidance(self, diffusion_model) -> Optional[float]:
        """The guidance input a trainer gives ``diffusion_model`` (a guidance-distilled model's), or None."""
        return None

    def training_inputs(self, context_tokens: int) -> dict:
        """Model keyword arguments a trainer gives each training call besides the conditioning, the pooled vector and
        the guidance, as ComfyUI's ``extra_conds`` gives them in sampling for a conditioning of ``context_tokens``."""
        return {}

    def training_refusal(self, model_classes: list[str], adm_channels: int) -> Optional[str]:
        """Why a trainer cannot give this model the extra conditioning it reads, or None."""
        return None

    def dropped_template_tokens(self, token_ids: list) -> int:
        """How many of the first tokens of a prompt as the family's text encoder tokenizes it (``token_ids``, in
        order) the encoder leaves out of the conditioning (Qwen-Image's drops its template's system prompt); 0 where
        it encodes every token."""
        return 0

    def conditioning_placement(self, tokens: int) -> ConditioningPlacement:
        """Where a conditioning of ``tokens`` tokens sits in what the model receives: unchanged, unless the family's
        model pads it."""
        return ConditioningPlacement(tokens, tokens)

    def checkpoint_units(self, modules: list, blocks: list["TransformerBlock"]) -> list[str]:
        """Paths of the modules a trainer checkpoints one at a time (gradient checkpointing), among the model's
        ``(path, module)`` pairs: the family's repeated blocks."""
        return [block.module_path for block in blocks]

    def order(self, key: BlockKey) -> tuple[int, int, int]:
        return self.block_names.index(key[0]), key[1], key[2]


@dataclass(frozen=True)
class TransformerBlock:
    key: BlockKey
    module_path: str
    heads: int
    dim_head: int
    #: image features attend to text: a U-Net attn2, or the image-query x text-key part of a DiT's joint attention
    has_cross_attention: bool
    family: Family
    #: the only transformer of its spatial transformer (SD1.x): other packs may key its replace by (name, id)
    alone_in_block: bool = False
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


def prompts_of_one_length(per_prompt: list[torch.Tensor], why: str) -> torch.Tensor:
    """Per-prompt token tensors ``(1, tokens, ...)`` as one batch, for a family whose model sees a prompt repeated or
    padded as another prompt; ValueError starting with ``why`` where their lengths differ."""
    lengths = sorted({t.shape[1] for t in per_prompt})
    if len(lengths) > 1:
        raise ValueError(
            f"{why}: these prompts encode to {lengths} tokens, and any padding or repetition would change what each "
            "image sees. Give every prompt the same number of tokens (reword them, or sample them one by one).")
    return torch.cat(per_prompt)


def matching_paths(modules, pattern: re.Pattern) -> Iterator[tuple[str, torch.nn.Module, re.Match]]:
    """``(path, module, match)`` of the ``(path, module)`` pairs whose path ``pattern`` matches."""
    for path, module in modules:
        match = pattern.match(path)
        if match is not None:
            yield path, module, match


def class_names(obj) -> list[str]:
    """The names along the MRO of ``obj``'s class, nearest first: how adapters recognise ComfyUI's objects
    without importing ComfyUI."""
    return [cls.__name__ for cls in type(obj).__mro__]


def nearest_of(names: Optional[list[str]], candidates) -> Optional[str]:
    """The first of ``names`` (an MRO, nearest first) that is one of ``candidates``."""
    return next((name for name in names or () if name in candidates), None)
