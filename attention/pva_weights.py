"""Everything a PVA file holds, and its safetensors format.

Keys (``.safetensors``; no pickle is ever read):

- ``parallel.<block>.to_visual_{q,k,v}.{weight,bias}``: the full-rank parallel projections of every selected
  cross-attention layer, ``<block>`` = ``input_1_0``-style block key (see ``attention.pva.block_name``);
  or (low rank, pva-v2) ``parallel.<block>.to_visual_{q,k,v}.{down,up}``: the trained change ``up · down`` of the
  block's own projection, which is read from the model at run time and never stored (``attention.low_rank``);
  on a DiT (``double_3_0``, ``single_12_0``, ``joint_7_0``) also ``parallel.<block>.{query,key}_norm.weight``
  (``.bias`` for a layer norm), the copies of the block's per-head norms;
- ``token_transformer.*``: the identity token transformer (``IdentityTokenTransformer``; with ``project.*``
  when it runs narrower than the block width);
- ``identity_word.<encoder>``: ``[1, width]`` learned vector of the identity word per text encoder
  (``l`` for SD1.5, ``h`` for SD2, ``l`` and ``g`` for SDXL: ComfyUI's tokenizer keys);
- ``face_encoder.*`` (optional): an ArcFace iresnet trained with the pathway (the paper's stage 2);
  without it the stock ``ms1mv3_arcface_r50`` backbone is used (and never copied into the file).

Metadata: ``format`` = ``pva-v2`` (``pva-v1`` files, all full rank on every block, still load), ``rank`` = the
low-rank changes' rank or ``full``, ``blocks`` = the block selection (``attention.blocks.BLOCK_SELECTIONS``; v1: all),
``encoder`` = ``arcface`` or ``clip_vision`` (which features the token
transformer was trained on), ``heads`` of the token transformer, ``family`` the model family's file tag
(its adapter's ``file_tag``: ``unet``, ``flux``, ``flux2``, ``chroma``, ``sd3``, ``zimage``; files without it
are U-Net files). Every other size is read from shapes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
from safetensors import safe_open
from torch import nn

from .blocks import BLOCK_SELECTIONS, UNET, Family, family_of_tag
from .head_norm import HeadNorm
from .low_rank import LowRankChange
from .pva import JointParallelProjection, LowRankJointProjection, LowRankParallelProjection, ParallelProjection
from .pva_identity import IdentityTokenTransformer, IResNet

FORMAT = "pva-v2"
#: the first format: full-rank projections on every block, no rank or block selection recorded
FORMAT_V1 = "pva-v1"
FULL_RANK = "full"
ENCODERS = ("arcface", "clip_vision")


class PVAFormatError(ValueError):
    """A file that is not a PVA weights file of this pack, or one that does not fit the model."""


class PVAWeights(nn.Module):
    """Parallel projections + identity token transformer + identity word (+ optional face encoder)."""

    def __init__(self, parallel: Mapping[str, nn.Module], token_transformer: IdentityTokenTransformer,
                 identity_word: Mapping[str, torch.Tensor], encoder: str, face_encoder: Optional[IResNet] = None,
                 family: Family = UNET, block_selection: str = "all"):
        super().__init__()
        #: the model family the projections were made for
        self.family = family
        if block_selection not in BLOCK_SELECTIONS:
            raise PVAFormatError(f"unknown PVA block selection {block_selection!r}; expected one of {BLOCK_SELECTIONS}")
        #: which of the model's blocks carry projections (attention.blocks.selected_blocks)
        self.block_selection = block_selection
        if encoder not in ENCODERS:
            raise PVAFormatError(f"unknown PVA encoder {encoder!r}; expected one of {ENCODERS}")
        self.parallel = nn.ModuleDict(dict(parallel))
        self.token_transformer = token_transformer
        self.identity_word = nn.ParameterDict({k: nn.Parameter(v.detach().clone().float()) for k, v in identity_word.items()})
        self.encoder = encoder
        self.face_encoder = face_encoder
        #: the face encoder is the stock backbone attached at load time: not written back to files.
        self.stock_face_encoder = False

    @classmethod
    def initial(cls, parallel: Mapping[str, nn.Module] | Callable[[], Mapping[str, nn.Module]], encoder: str,
                feature_dim: int, identity_word: Mapping[str, torch.Tensor], family: Family = UNET, seed: int = 0,
                block_selection: str = "all", inner_width: Optional[int] = None, **transformer_args) -> "PVAWeights":
        """The state training starts from (official stage 1): the ``parallel`` projections copied from each
        block's own (``ParallelProjection.copy_of`` / ``JointParallelProjection.copy_of``) or their low-rank form
        (no change yet; given as a function making them, so that their random ``down`` matrices are seeded too),
        a randomly initialised token transformer (seeded) giving tokens of the projections' context width, run at
        ``inner_width`` (default: that width) with a final projection to it when narrower."""
        def seeded(make):
            with torch.random.fork_rng(devices=[]):  # each part from the seed: the transformer as before low rank
                torch.manual_seed(seed)
                return make()
        parallel = seeded(parallel) if callable(parallel) else parallel
        width = next(iter(parallel.values())).context_dim
        transformer = seeded(lambda: IdentityTokenTransformer(feature_dim=feature_dim, width=inner_width or width,
                                                              output_width=width, **transformer_args))
        return cls(parallel, transformer, identity_word, encoder, family=family, block_selection=block_selection)

    @property
    def context_dim(self) -> int:
        return self.token_transformer.output_width

    @property
    def rank(self) -> Optional[int]:
        """The rank of the low-rank projections; None for full-rank copies."""
        projection = next(iter(self.parallel.values()))
        return projection.rank if isinstance(projection, LowRankParallelProjection) else None

    def identity_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """``(G, R, F)`` reference features → ``(G, N, context_dim)`` identity tokens (inference mode: dropout off)."""
        if features.shape[-1] != self.token_transformer.feature_dim:
            raise PVAFormatError(
                f"the identity encoder gives {features.shape[-1]}-d features but this PVA file's token transformer "
                f"takes {self.token_transformer.feature_dim}-d ones (it was trained with encoder "
                f"{self.encoder!r}); use the encoder it was trained with.")
        transformer = self.token_transformer.train(False)
        return transformer(features.to(transformer.lift.weight))

    def state_and_metadata(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()
                   if not (self.stock_face_encoder and k.startswith("face_encoder."))}
        return tensors, {"format": FORMAT, "encoder": self.encoder, "heads": str(self.token_transformer.heads),
                         "family": self.family.file_tag, "rank": FULL_RANK if self.rank is None else str(self.rank),
                         "blocks": self.block_selection}

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str = "") -> "PVAWeights":
        where = f" ({source})" if source else ""
        metadata = metadata or {}
        if metadata.get("format") not in (FORMAT, FORMAT_V1):
            raise PVAFormatError(f"not a PVA weights file of this pack{where}: metadata format is "
                                 f"{metadata.get('format')!r}, expected {FORMAT!r} (or the older {FORMAT_V1!r})")
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            group, _, rest = key.partition(".")
            groups.setdefault(group, {})[rest] = tensor
        missing = {"parallel", "token_transformer", "identity_word"} - set(groups)
        if missing:
            raise PVAFormatError(f"PVA weights file{where} lacks {sorted(missing)}")
        parallel = {}
        by_block: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in groups["parallel"].items():
            block, _, rest = key.partition(".")
            by_block.setdefault(block, {})[rest] = tensor
        try:
            family = family_of_tag(metadata.get("family", UNET.file_tag))
        except ValueError as error:
            raise PVAFormatError(f"PVA weights file{where}: {error}") from None
        for block, sd in by_block.items():
            parallel[block] = _projection_from_state(sd, family)
        config = IdentityTokenTransformer.config_from_state_dict(groups["token_transformer"], int(metadata["heads"]))
        transformer = IdentityTokenTransformer(**config)
        transformer.load_state_dict(groups["token_transformer"], strict=True)
        face_encoder = IResNet.from_state_dict(groups["face_encoder"]) if "face_encoder" in groups else None
        weights = cls(parallel, transformer, groups["identity_word"], metadata["encoder"], face_encoder, family,
                      metadata.get("blocks", "all"))
        ranks = {p.rank if isinstance(p, LowRankParallelProjection) else None for p in parallel.values()}
        recorded = metadata.get("rank", FULL_RANK)
        if ranks != {None if recorded == FULL_RANK else int(recorded)}:
            raise PVAFormatError(f"PVA weights file{where} records rank {recorded!r} but its projections have the "
                                 f"ranks {sorted(map(str, ranks))}; the file is damaged.")
        return weights


def _projection_from_state(sd: dict[str, torch.Tensor], family: Family) -> nn.Module:
    def part(name):
        state = {key.partition(".")[2]: t for key, t in sd.items() if key.startswith(name + ".")}
        return state or None

    def norm(name):
        state = part(name)
        return HeadNorm.from_state(state) if state else None

    if "to_visual_q.down" in sd:
        q, k = LowRankChange.from_state(part("to_visual_q")), LowRankChange.from_state(part("to_visual_k"))
        if not family.joint:
            projection = LowRankParallelProjection(q.in_features, k.in_features, q.out_features, q.rank)
        else:
            projection = LowRankJointProjection(q.in_features, q.out_features, q.rank, norm("query_norm"),
                                                norm("key_norm"))
    elif not family.joint:
        q, k = sd["to_visual_q.weight"], sd["to_visual_k.weight"]
        projection = ParallelProjection(q.shape[1], k.shape[1], q.shape[0], bias="to_visual_q.bias" in sd)
    else:
        q = sd["to_visual_q.weight"]
        projection = JointParallelProjection(q.shape[1], q.shape[0], "to_visual_q.bias" in sd, norm("query_norm"),
                                             norm("key_norm"))
    projection.load_state_dict(sd, strict=True)
    return projection


def save_pva(path: str | Path, weights: PVAWeights, extra_metadata: Optional[dict[str, str]] = None) -> None:
    """Write ``weights`` as a PVA safetensors file, atomically (with ``extra_metadata``, e.g. the training run)."""
    from ..training.checkpoint import save_atomic  # the pack's one atomic safetensors writer

    tensors, metadata = weights.state_and_metadata()
    save_atomic(path, tensors, {**metadata, **(extra_metadata or {})})


def load_pva(path: str | Path) -> PVAWeights:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PVAFormatError(f"{path.name}: only .safetensors PVA files are read (no pickle)")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return PVAWeights.from_state(tensors, metadata, source=path.name)

