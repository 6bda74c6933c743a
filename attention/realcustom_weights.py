"""RealCustom image-branch weights: the two adapter formats and the conversion of the released ones.

An adapter is a projector (image-encoder features → image tokens of the U-Net's context width) plus
the visual key/value projections of every cross-attention layer (:class:`ImageBranchWeights`).

- ``realcustom.official_sdxl``: the released ``RealCustom_highres`` model (SDXL). Projector =
  ``ProjectorHighResMinAttn`` (one cross-attention from 729 global to 2916 local SigLIP+DINOv2 tokens,
  an MLP and a linear base path, 2176 → 2048), parameter names kept from the released code so the
  conversion is a key rename. Diffusers block names map to ComfyUI block keys
  (``down_blocks.1.attentions.j`` → ``input 4+j``, ``down_blocks.2`` → ``input 7+j``,
  ``mid_block`` → ``middle 0``, ``up_blocks.0`` → ``output 0+j``, ``up_blocks.1`` → ``output 3+j``).
- ``realcustom.clip_vision``: this pack's own format for any U-Net (SD1.5 first), trained in the
  graph: projector = Linear + LayerNorm over a ComfyUI CLIP_VISION's penultimate hidden states, and,
  when trained with it, the paper's adaptive scoring module (``scoring.*`` keys) that picks and weights
  the image tokens before the projector at every step.

Both are stored as safetensors with the adapter's ``state_dict()`` keys, the format and the model family
(:attr:`~.blocks.Family.file_tag`: ``unet``, ``flux``, ``flux2``, ``chroma``, ``sd3``, ``zimage``; files without it
are U-Net adapters, as every file written before the DiT families and the released SDXL model are) in metadata.
On a DiT the visual projections are per joint block (``double_3_0``, ``single_12_0``, ``joint_7_0``), from the
token width to the block's attention width.

The branch's layout (:data:`~.realcustom.BRANCH_LAYOUTS`) is metadata too (``branch_layout``, with ``branch_rank``
and the trainer's ``branch_blocks`` selection): ``per-block`` (a full-rank key/value pair per block, keys
``branch.to_k_vision.<block>.weight``; every file without the entry, the released one included) or
``shared + low-rank`` (``branch.shared_k.<width>.weight``, ``branch.k_change.<block>.down/up`` and the same for
V), the trainer's default on the DiTs, whose per-block pairs would be 1.43 B numbers on Flux.1 dev.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .blocks import UNET, BlockKey, Family
from .realcustom import (PER_BLOCK, SHARED_LOW_RANK, BRANCH_LAYOUTS, ImageBranchWeights, SharedLowRankBranch,
                         block_name, parse_block_name)
from .realcustom_scoring import AdaptiveScoring

OFFICIAL_FORMAT = "realcustom.official_sdxl"
CLIP_VISION_FORMAT = "realcustom.clip_vision"
FORMAT_KEY = "format"
FAMILY_KEY = "family"
BRANCH_LAYOUT_KEY = "branch_layout"
BRANCH_RANK_KEY = "branch_rank"
BRANCH_BLOCKS_KEY = "branch_blocks"
#: the rank of a new shared + low-rank branch (the trainer's default; bench/realcustom_branch.py). Which blocks a
#: new branch serves is PVA's block selection (``attention.blocks.BLOCK_SELECTIONS``: all, the two-stream blocks,
#: every 2nd / 4th in layer order), recorded as ``branch_blocks``
DEFAULT_RANK = 16
#: the most numbers a per-block branch may hold where the trainer picks the layout: 300 MB as fp32
PER_BLOCK_LIMIT = 75_000_000

#: released model: SigLIP-so400m (1152) + DINOv2-L (1024) channels, SDXL context width
OFFICIAL_VISION_DIM, OFFICIAL_TOKEN_DIM = 2176, 2048
_OFFICIAL_PROJECTION = "encoder_hidden_states_vision_projection."
_DIFFUSERS_BLOCK = re.compile(
    r"^(?:(down|up)_blocks\.(\d+)\.attentions\.(\d+)|mid_block\.attentions\.0)\.transformer_blocks\.(\d+)\.attn2\.(to_[kv]_vision)\.weight$")
_SDXL_LAYERS_PER_BLOCK = 2  # res blocks per U-Net level: input ids advance by 3 per level, output ids too


def official_block_key(diffusers_key: str) -> tuple[BlockKey, str] | None:
    """``down_blocks.1.attentions.0.transformer_blocks.3.attn2.to_k_vision.weight`` → (("input", 4, 3), "to_k_vision")."""
    match = _DIFFUSERS_BLOCK.match(diffusers_key)
    if match is None:
        return None
    direction, level, attention, index, projection = match.groups()
    if direction is None:
        return ("middle", 0, int(index)), projection
    per_level = _SDXL_LAYERS_PER_BLOCK + 1
    if direction == "down":
        return ("input", 1 + int(level) * per_level + int(attention), int(index)), projection
    return ("output", int(level) * per_level + int(attention), int(index)), projection


def convert_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys (U-Net state dict, possibly with the whole U-Net) → adapter keys.

    Raises ValueError when the checkpoint has no visual projections (not a RealCustom model).
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.startswith(_OFFICIAL_PROJECTION):
            out["projector." + key[len(_OFFICIAL_PROJECTION):]] = tensor
            continue
        found = official_block_key(key)
        if found is not None:
            block, projection = found
            out[f"branch.{projection}.{block_name(block)}.weight"] = tensor
    if not any(k.startswith("branch.") for k in out) or not any(k.startswith("projector.") for k in out):
        raise ValueError("this file has no RealCustom visual projections (…attn2.to_k_vision.weight and "
                         "encoder_hidden_states_vision_projection.*); is it RealCustom_highres?")
    return out


class MinAttention(torch.nn.Module):
    """Released ``MinAttention``: global tokens attend to local tokens (LayerNorm both, no out projection)."""

    def __init__(self, dim: int, dim_head: int = 64):
        super().__init__()
        self.heads = dim // dim_head
        self.norm1 = torch.nn.LayerNorm(dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(dim, dim, bias=False)
        self.to_v = torch.nn.Linear(dim, dim, bias=False)

    def forward(self, local_tokens, global_tokens):
        q = self.to_q(self.norm1(global_tokens))
        local_tokens = self.norm2(local_tokens)
        k, v = self.to_k(local_tokens), self.to_v(local_tokens)
        b = q.shape[0]
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, self.heads * q.shape[-1])


class HighResMinAttnProjector(torch.nn.Module):
    """Released ``ProjectorHighResMinAttn``: ``base(global) + MLP(MinAttention(local, global))``."""

    def __init__(self, vision_dim: int = OFFICIAL_VISION_DIM, token_dim: int = OFFICIAL_TOKEN_DIM):
        super().__init__()
        self.min_attention = MinAttention(vision_dim)
        self.projector = torch.nn.Sequential(
            torch.nn.Linear(vision_dim, 4 * vision_dim), torch.nn.GELU(),
            torch.nn.Linear(4 * vision_dim, token_dim), torch.nn.GELU(),
            torch.nn.Linear(token_dim, token_dim), torch.nn.LayerNorm(token_dim))
        self.projector_base = torch.nn.Linear(vision_dim, token_dim)

    def forward(self, global_tokens, local_tokens):
        return self.projector_base(global_tokens) + self.projector(self.min_attention(local_tokens, global_tokens))


class LinearProjector(torch.nn.Module):
    """This pack's projector: CLIP-vision hidden states → context-width tokens."""

    def __init__(self, vision_dim: int, token_dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(vision_dim, token_dim)
        self.norm = torch.nn.LayerNorm(token_dim)

    def forward(self, features):
        return self.norm(self.proj(features))


def default_layout(family: Family, shapes: dict[BlockKey, tuple[int, int]]) -> str:
    """The trainer's branch layout for the blocks ``shapes`` of a ``family`` model: shared + low-rank on the DiTs
    (per-block: 1.43 B numbers on Flux.1 dev, 0.76 B on SD3.5 Large) and on U-Nets whose per-block branch would
    pass :data:`PER_BLOCK_LIMIT` (SDXL: 0.34 B); per-block, the released layout, on the smaller U-Nets (SD1.5: 19 M)."""
    if family is not UNET:
        return SHARED_LOW_RANK
    per_block = sum(2 * inner * token_dim for inner, token_dim in shapes.values())
    return PER_BLOCK if per_block <= PER_BLOCK_LIMIT else SHARED_LOW_RANK


def branch_metadata(branch: ImageBranchWeights | SharedLowRankBranch, selection: str) -> dict[str, str]:
    """The file metadata that records a branch's layout, rank (shared + low-rank) and block selection."""
    rank = {BRANCH_RANK_KEY: str(branch.rank)} if branch.layout == SHARED_LOW_RANK else {}
    return {BRANCH_LAYOUT_KEY: branch.layout, BRANCH_BLOCKS_KEY: selection, **rank}


def new_branch(shapes: dict[BlockKey, tuple[int, int]], layout: str,
               rank: int = DEFAULT_RANK) -> ImageBranchWeights | SharedLowRankBranch:
    if layout == PER_BLOCK:
        return ImageBranchWeights(shapes)
    if layout == SHARED_LOW_RANK:
        return SharedLowRankBranch(shapes, rank)
    raise ValueError(f"unknown RealCustom branch layout {layout!r}; use one of {', '.join(BRANCH_LAYOUTS)}")


class RealCustomAdapter(torch.nn.Module):
    """Projector + per-layer visual K/V, in one of the two formats (+ optional adaptive scoring)."""

    def __init__(self, format_name: str, projector: torch.nn.Module, branch: ImageBranchWeights | SharedLowRankBranch,
                 scoring: AdaptiveScoring | None = None, family: Family = UNET):
        super().__init__()
        self.format_name = format_name
        #: the model family the branch was made for (its blocks and widths are that family's)
        self.family = family
        self.projector = projector
        self.branch = branch
        self.scoring = scoring

    @property
    def vision_dim(self) -> int:
        first = self.projector.proj if isinstance(self.projector, LinearProjector) else self.projector.projector_base
        return first.in_features


def _branch_shapes(state_dict, layout: str) -> dict[BlockKey, tuple[int, int]]:
    """``{block: (attention width, token width)}`` of the branch held by ``state_dict``."""
    if layout == PER_BLOCK:
        prefix, suffix = "branch.to_k_vision.", ".weight"
        return {parse_block_name(k[len(prefix):-len(suffix)]): tuple(v.shape)
                for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(suffix)}
    prefix, suffix = "branch.k_change.", ".down"
    return {parse_block_name(k[len(prefix):-len(suffix)]): (state_dict[k[:-len(suffix)] + ".up"].shape[0], v.shape[1])
            for k, v in state_dict.items() if k.startswith(prefix) and k.endswith(suffix)}


def _branch_from_state_dict(state_dict, layout: str) -> ImageBranchWeights | SharedLowRankBranch:
    """An empty branch of ``layout`` shaped as the one ``state_dict`` holds."""
    if layout not in BRANCH_LAYOUTS:
        raise ValueError(f"unknown RealCustom branch layout {layout!r}; use one of {', '.join(BRANCH_LAYOUTS)}")
    shapes = _branch_shapes(state_dict, layout)
    if not shapes:
        raise ValueError(f"the file records a {layout!r} image branch but holds none")
    if layout == PER_BLOCK:
        return new_branch(shapes, layout)
    first = block_name(next(iter(shapes)))
    return new_branch(shapes, layout, rank=state_dict[f"branch.k_change.{first}.down"].shape[0])


def adapter_from_state_dict(state_dict: dict[str, torch.Tensor], format_name: str,
                            family: Family = UNET, layout: str = PER_BLOCK) -> RealCustomAdapter:
    """Build the adapter of ``format_name`` for ``family`` with a branch of ``layout`` and load ``state_dict``
    strictly (every key, right shapes)."""
    if format_name == OFFICIAL_FORMAT and family is not UNET:
        raise ValueError(f"the released RealCustom model is an SDXL adapter, but its file records the {family.name} family")
    if format_name == OFFICIAL_FORMAT and layout != PER_BLOCK:
        raise ValueError(f"the released RealCustom model has a per-block branch, but its file records {layout!r}")
    if format_name == OFFICIAL_FORMAT:
        base = state_dict["projector.projector_base.weight"]
        projector = HighResMinAttnProjector(base.shape[1], base.shape[0])
    elif format_name == CLIP_VISION_FORMAT:
        proj = state_dict["projector.proj.weight"]
        projector = LinearProjector(proj.shape[1], proj.shape[0])
    else:
        raise ValueError(f"unknown RealCustom adapter format {format_name!r}")
    scoring = None
    if "scoring.text_pool.weight" in state_dict:
        scoring = AdaptiveScoring(vision_dim=projector.proj.in_features,
                                  text_dim=state_dict["scoring.text_pool.weight"].shape[1],
                                  latent_channels=state_dict["scoring.latent_pool.weight"].shape[1])
    adapter = RealCustomAdapter(format_name, projector, _branch_from_state_dict(state_dict, layout), scoring, family)
    adapter.load_state_dict(state_dict, strict=True)
    return adapter.train(False).requires_grad_(False)


def new_clip_vision_adapter(vision_dim: int, shapes: dict[BlockKey, tuple[int, int]], seed: int,
                            scoring: bool = False, latent_channels: int = 4, family: Family = UNET,
                            layout: str = PER_BLOCK, rank: int = DEFAULT_RANK) -> RealCustomAdapter:
    """A fresh adapter of this pack's format (trainer start) for ``family``'s blocks ``shapes`` with a branch of
    ``layout`` (and ``rank``), initialised from ``seed`` (so a resumed run starts from the same weights), with the
    adaptive scoring module when ``scoring``. The visual values start at zero, so the untrained branch adds nothing
    and training starts from the frozen model."""
    token_dim = next(iter(shapes.values()))[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = RealCustomAdapter(CLIP_VISION_FORMAT, LinearProjector(vision_dim, token_dim),
                                    new_branch(shapes, layout, rank),
                                    AdaptiveScoring(vision_dim, token_dim, latent_channels) if scoring else None, family)
    adapter.branch.zero_values()
    return adapter
