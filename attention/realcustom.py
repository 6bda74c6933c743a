"""RealCustom adaptive mask guidance (Huang et al., CVPR 2024; released code bytedance/RealCustom).

Two cross-attention processors and the per-run state they share:

- :class:`WordMapReader` reads the text cross-attention probabilities of the *cond* rows and reduces
  them at once to the target word's map of the layer: mean over heads, sum over the word's tokens. The
  columns read are the text context's (``call.text_keys``): all keys of a U-Net's attn2, the text keys of a
  DiT's joint attention, whose probabilities are those of its one softmax over text and image keys.
  Only these ``(B, 1, h, w)`` layer maps are kept (h·w numbers per image and layer), never a layer's
  full probabilities; a DiT's cross view serves the probabilities in chunks of query rows, whose per-query
  scores are joined into the layer's map after the last chunk. When the pass is over the maps are resized
  (bilinear) to the mask grid, the size of the largest map (paper §3.3), and averaged: see :func:`mask_grid`.
- :class:`MaskedImageBranch` adds the visual cross-attention, the released code's
  ``AttnProcessor2_0_image_prompt``: ``softmax(Q K_iᵀ/√d) V_i`` with the layer's own query and new
  bias-free projections ``K_i = to_k_vision(tokens)``, ``V_i = to_v_vision(tokens)``, multiplied by
  the mask (bilinearly resized to the layer) and added to the text attention output before the
  layer's ``to_out``. Cond rows attend to the reference image's tokens, uncond rows to a black
  image's tokens (released code) or get no image branch.

:class:`MaskGuidanceRun` lives for one sampling run (created by the node's OUTER_SAMPLE wrapper and
found by the processors in ``transformer_options[RUN_KEY]``); it turns the captured maps into masks
(normalisation strategy, top ratio with soft values) and records the mask of every step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .blocks import BlockKey
from .dispatcher import CROSS_ATTENTION, AttentionCall, AttentionProcessor
from .layout import split_chunks
from .low_rank import LowRankChange

RUN_KEY = "personalization.realcustom_run"
COND = 0  # ComfyUI's cond_or_uncond value of the positive prompt's rows
UNCOND = 1  # ... and of the negative prompt's

#: normalisations of the layer-averaged word map (released code ``mask_mode``)
MASK_STRATEGIES = ("max_norm", "min_max_norm", "min_max_per_channel")
#: how ``scope`` selects the kept positions: the top ``scope`` fraction (paper eq. 11, released default),
#: or every normalised value ≥ 1 − scope (released ``threshold`` mode)
SCOPE_SELECTIONS = ("top-k", "threshold")
_EPS = 1e-6
#: how an image branch holds its visual keys/values (adapter file metadata ``branch_layout``; files without it,
#: the released model's and every file written before the layouts, are per-block): a full-rank pair per block
#: (:class:`ImageBranchWeights`, the released code's), or a shared pair plus a low-rank change per block
#: (:class:`SharedLowRankBranch`, the DiTs' default)
PER_BLOCK = "per-block"
SHARED_LOW_RANK = "shared + low-rank"
BRANCH_LAYOUTS = (PER_BLOCK, SHARED_LOW_RANK)


@dataclass(frozen=True)
class MaskSettings:
    strategy: str = "max_norm"
    #: fraction of mask positions kept (paper's γ_scope, released default 0.25)
    scope: float = 0.25
    #: kept positions become 1 instead of keeping their normalised score (paper ablation: worse)
    binary: bool = False
    selection: str = "top-k"

    def __post_init__(self):
        if self.strategy not in MASK_STRATEGIES:
            raise ValueError(f"unknown mask strategy {self.strategy!r}; use one of {', '.join(MASK_STRATEGIES)}")
        if self.selection not in SCOPE_SELECTIONS:
            raise ValueError(f"unknown scope selection {self.selection!r}; use one of {', '.join(SCOPE_SELECTIONS)}")
        if not 0.0 < self.scope <= 1.0:
            raise ValueError(f"mask scope must lie in (0, 1], got {self.scope}")


def word_scores(probs: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, T)`` probabilities → ``(B, N)``: mean over heads, summed over the word's tokens;
    ``indicator`` is ``(T,)`` for one prompt or ``(B, T)`` for a prompt (and word) per row."""
    mean = probs.mean(dim=1)
    indicator = indicator.to(mean)
    return mean @ indicator if indicator.ndim == 1 else (mean @ indicator[..., None]).squeeze(-1)


def add_word_map(maps: "WordMapAccumulator", probs: torch.Tensor, indicator: torch.Tensor, call: AttentionCall) -> None:
    """The word map of the text probabilities ``probs`` of the call's query rows (``call.query_rows``) into ``maps``,
    once the chunk with the last row has come (see :meth:`AttentionCall.gather_rows`)."""
    scores = call.gather_rows("realcustom_word_map", word_scores(probs, indicator))
    if scores is not None:
        maps.add(scores.view(scores.shape[0], 1, *call.query_grid))


def mask_grid(map_sizes) -> tuple[int, int]:
    """Size of the word mask: the largest of the ``(h, w)`` cross-attention maps of a pass (paper §3.3:
    every map is resized "to the largest map size, i.e. 64 × 64 in Stable Diffusion"). SD1.5 has maps at
    the latent's own size, so its mask has the latent's size; SDXL has no attention at full resolution,
    so its mask is half the latent, the size the released SDXL code hard-codes; a DiT's maps all have its
    image-token grid. Read from the maps themselves, so no family needs a rule of its own."""
    return max(map_sizes, key=lambda size: size[0] * size[1])


def min_max(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min–max normalisation of ``(B, ...)`` to [0, 1] (released code's epsilon)."""
    flat = x.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x - low.view(shape)) / (high - low + _EPS).view(shape)


def normalise(mean_map: torch.Tensor, strategy: str) -> torch.Tensor:
    """Normalise the layer-averaged map (per-layer normalisation of min_max_per_channel happens before)."""
    if strategy == "max_norm":
        return mean_map / (mean_map.flatten(1).max(dim=1).values.view(-1, *(1,) * (mean_map.ndim - 1)) + _EPS)
    return min_max(mean_map)


def keep_top(scores: torch.Tensor, scope: float, binary: bool) -> torch.Tensor:
    """Keep the ``int(n * scope)`` highest values of each sample (soft, or 1 when ``binary``), zero the rest."""
    flat = scores.flatten(1)
    keep = int(flat.shape[1] * scope)
    kept = torch.zeros_like(flat)
    if keep > 0:
        top = flat.topk(keep, dim=1)
        kept.scatter_(1, top.indices, 1.0 if binary else top.values)
    return kept.view_as(scores)


def keep_above(scores: torch.Tensor, scope: float, binary: bool) -> torch.Tensor:
    """Zero the normalised values below ``1 − scope``; with ``binary`` the ones above it become 1."""
    threshold = 1.0 - scope
    kept = scores.masked_fill(scores < threshold, 0.0)
    return kept.masked_fill(kept > threshold, 1.0) if binary else kept


def select_scope(scores: torch.Tensor, settings: MaskSettings) -> torch.Tensor:
    select = keep_top if settings.selection == "top-k" else keep_above
    return select(scores, settings.scope, settings.binary)


class WordMapAccumulator:
    """Collects the word maps of one pass, layer by layer, into the mask of the released ``mask_generation``.

    The layer maps are kept at their own size until the mask is made: the grid is the largest map's
    (:func:`mask_grid`), known only once every layer has been read, and ``min_max_per_channel`` normalises
    each layer after its resize, so no running sum could stand in for them."""

    def __init__(self, settings: MaskSettings):
        self.settings = settings
        self.layer_maps: list[torch.Tensor] = []

    def add(self, layer_map: torch.Tensor) -> None:
        """``(B, 1, h, w)`` map of one layer."""
        self.layer_maps.append(layer_map.float())

    @property
    def empty(self) -> bool:
        return not self.layer_maps

    @property
    def size(self) -> tuple[int, int]:
        return mask_grid(tuple(m.shape[-2:]) for m in self.layer_maps)

    def mask(self) -> torch.Tensor:
        """``(B, H', W')`` mask at :attr:`size`: the layers resized to it (bilinear, as the released code),
        normalised by the strategy, averaged, ``scope`` selected."""
        size = self.size
        resized = [F.interpolate(m, size=size, mode="bilinear") for m in self.layer_maps]
        if self.settings.strategy == "min_max_per_channel":
            resized = [min_max(m) for m in resized]
        mean_map = normalise(torch.cat(resized, dim=1).mean(dim=1, keepdim=True), self.settings.strategy)
        return select_scope(mean_map, self.settings)[:, 0]


def resize_gate(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H', W')`` mask → ``(B, h*w, 1)`` gate of a layer (bilinear, as the released processor)."""
    gate = F.interpolate(mask[:, None].float(), size=(height, width), mode="bilinear")
    return gate.flatten(2).transpose(1, 2)


def step_index(sample_sigmas: torch.Tensor, sigma: float) -> int:
    """Index of the sampling step a model call belongs to (a multi-eval sampler's extra calls count
    with the step they are taken in), from the schedule's sigmas."""
    reached = int((sample_sigmas >= sigma * (1 - 1e-4)).sum().item())
    return max(reached - 1, 0)


@dataclass(frozen=True)
class ImageTokens:
    """Projected reference tokens ``(1 or B, T, D)`` and the negative ones (black image) or None."""

    reference: torch.Tensor
    negative: torch.Tensor | None

    def to(self, device) -> ImageTokens:
        return ImageTokens(self.reference.to(device), None if self.negative is None else self.negative.to(device))


def cascaded_cond(text: torch.Tensor, text_image: torch.Tensor, cfg_scale: float, image_scale: float) -> torch.Tensor:
    """The cond prediction ``c`` for which ComfyUI's CFG ``u + w (c − u)`` is the paper's cascaded eq. 13,
    ``ε(∅) + ω_t (ε_T2I − ε(∅)) + ω_i (ε_TI2I − ε_T2I)`` with ``ω_t = w``:
    ``c = ε_T2I + (ω_i / ω_t)(ε_TI2I − ε_T2I)``. Eq. 13 is an affine combination (weights sum to 1), so it
    holds for denoised predictions too, and at ``w = 1`` it needs no uncond pass."""
    if cfg_scale <= 0:
        raise ValueError(f"AdaptiveMaskGuidance: cascaded guidance needs a CFG scale > 0 (it is ω_t), got {cfg_scale}")
    return text + (image_scale / cfg_scale) * (text_image - text)


class MaskGuidanceRun:
    """State of one sampling run: which pass is running, the map being captured, the masks per step.

    ``text_only_pass`` selects the released code's schedule (a text-only forward of the cond rows
    before each updating step, whose map gates that same step); otherwise the map is read from the
    cond rows of the guided pass itself and gates the next step (one text-only forward at step 0).
    ``cascaded`` (paper eq. 13) needs the text-only prediction ε_T2I of every model call, so the
    text-only forward runs at every call (and serves the map on the released schedule); the call's
    prediction waits in the run until the guidance takes it.
    """

    def __init__(self, settings: MaskSettings, indicator: torch.Tensor, total_steps: int, update_fraction: float,
                 text_only_pass: bool, tokens: ImageTokens, cascaded: bool = False, token_scorer=None):
        self.settings = settings
        self.tokens = tokens  # on the sampling device for the whole run
        self.indicator = indicator
        self.update_steps = max(1, round(update_fraction * total_steps))
        self.text_only_pass = text_only_pass or cascaded
        self.cascaded = cascaded
        #: ``(x, context, cond_or_uncond, mask, sigmas) -> ImageTokens`` of a model call (the adaptive scoring
        #: module of adapters that have one), else None: ``tokens`` serve every call
        self.token_scorer = token_scorer
        self.mask: torch.Tensor | None = None  # (B, H', W') gating the current step
        self.history: list[torch.Tensor] = []  # mask of every step, in order
        self.capturing = False  # WordMapReader active
        self.injecting = True   # MaskedImageBranch active
        self._pending = WordMapAccumulator(settings)
        self._step = -1
        self._text_prediction: tuple[float, torch.Tensor] | None = None  # (sigma, ε_T2I) of the current call

    def updating(self, step: int) -> bool:
        return step < self.update_steps

    def start_call(self, step: int) -> None:
        """Called before every model call: a new step adopts the map captured during the previous one."""
        if step != self._step and not self._pending.empty:
            self.mask = self._pending.mask()
            self._pending = WordMapAccumulator(self.settings)
        self._step = step

    def needs_text_only_pass(self, step: int) -> bool:
        if self.cascaded:
            return True
        if self.text_only_pass:
            return self.updating(step) and len(self.history) <= step
        return self.mask is None and self._pending.empty

    def captures_in_text_only_pass(self, step: int) -> bool:
        """Whether the text-only pass of this call reads the word map (the first call of an updating step)."""
        return self.mask is None or (self.updating(step) and len(self.history) <= step)

    def finish_text_only_pass(self, sigma: float | None = None, prediction: torch.Tensor | None = None) -> None:
        if not self._pending.empty:
            self.mask = self._pending.mask()
            self._pending = WordMapAccumulator(self.settings)
        if self.cascaded:
            if self._text_prediction is not None:
                raise ValueError("AdaptiveMaskGuidance: cascaded guidance needs the positive conditioning in one model "
                                 "call per step; combined, area or timestep-split positive conds are not supported.")
            self._text_prediction = (sigma, prediction)

    def take_text_prediction(self, sigma: float) -> torch.Tensor:
        """ε_T2I of the model call at ``sigma`` (cascaded guidance), removed from the run."""
        if self._text_prediction is None or not math.isclose(self._text_prediction[0], sigma, rel_tol=1e-5):
            raise RuntimeError("AdaptiveMaskGuidance: no text-only prediction for this model call; the cascaded "
                               "guidance needs the positive prompt in every call of the sampler.")
        prediction, self._text_prediction = self._text_prediction[1], None
        return prediction

    def capture_in_guided_pass(self, step: int) -> bool:
        return not self.text_only_pass and self.updating(step + 1)

    def record(self, step: int) -> None:
        """Remember the mask gating ``step`` (once per step)."""
        while len(self.history) <= step and self.mask is not None:
            self.history.append(self.mask.detach().to("cpu", torch.float32))

    def token_indicator(self, tokens: int) -> torch.Tensor:
        """The word's indicator for a context of ``tokens`` tokens; ComfyUI repeats a shorter cond to
        the length of the batch's longest one, and every repeat holds the word."""
        length = self.indicator.shape[0]
        if tokens % length != 0:
            raise ValueError(f"AdaptiveMaskGuidance: the positive conditioning has {tokens} tokens, but the prompt given "
                             f"to the node encodes to {length}; give the node the same prompt text as the positive "
                             "CLIPTextEncode (convert its text widget to an input and share one string).")
        return self.indicator.repeat(tokens // length)

    def capture(self, probs: torch.Tensor, call: AttentionCall) -> None:
        rows = cond_rows(call.cond_or_uncond, probs.shape[0])
        if rows is None:
            return
        text = probs[rows][..., call.text_keys]
        add_word_map(self._pending, text, self.token_indicator(text.shape[-1]).to(probs.device), call)


def cond_rows(cond_or_uncond, batch: int) -> slice | None:
    """Rows of the first cond chunk of a call (the one whose word map is read), or None."""
    layout = list(cond_or_uncond or ()) or [COND]
    if COND not in layout:
        return None
    size = batch // len(layout)
    start = layout.index(COND) * size
    return slice(start, start + size)


@dataclass(frozen=True)
class WordMapReader(AttentionProcessor):
    """Reads the target word's text cross-attention map while the run is capturing."""

    views_uncond_rows = False  # cond rows only
    reads_text_columns_only = True
    name = "realcustom_word_map"
    node_name = "AdaptiveMaskGuidance"
    patch_point = CROSS_ATTENTION

    def active(self, call: AttentionCall) -> bool:
        run = call.options.get(RUN_KEY)
        return run is not None and run.capturing

    def read_probs(self, probs, call: AttentionCall) -> None:
        call.options[RUN_KEY].capture(probs, call)


class ImageBranchWeights(torch.nn.Module):
    """Visual key/value projections per transformer block (released code: ``attn2.to_k_vision`` /
    ``attn2.to_v_vision``, bias-free, from the image-token width to the layer's inner width)."""

    def __init__(self, shapes: dict[BlockKey, tuple[int, int]]):
        super().__init__()
        self.to_k_vision = torch.nn.ModuleDict()
        self.to_v_vision = torch.nn.ModuleDict()
        for block, (inner, token_dim) in shapes.items():
            self.to_k_vision[block_name(block)] = torch.nn.Linear(token_dim, inner, bias=False)
            self.to_v_vision[block_name(block)] = torch.nn.Linear(token_dim, inner, bias=False)

    layout = PER_BLOCK

    def blocks(self) -> list[BlockKey]:
        return [parse_block_name(name) for name in self.to_k_vision]

    def widths(self) -> dict[BlockKey, int]:
        """The attention width each served block's keys and values have."""
        return {parse_block_name(name): linear.out_features for name, linear in self.to_k_vision.items()}

    def serves(self, block: BlockKey | None) -> bool:
        return block is not None and block_name(block) in self.to_k_vision

    def zero_values(self) -> None:
        """Every value projection zero: the branch adds exactly nothing (a fresh adapter's start)."""
        for linear in self.to_v_vision.values():
            torch.nn.init.zeros_(linear.weight)

    def project(self, block: BlockKey, tokens: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        name = block_name(block)
        to_k, to_v = self.to_k_vision[name], self.to_v_vision[name]
        tokens = tokens.to(to_k.weight)
        return to_k(tokens).to(dtype), to_v(tokens).to(dtype)


class SharedLowRankBranch(torch.nn.Module):
    """Visual key/value projections at real DiT scale: one key and one value projection per attention width,
    shared by every served block (a DiT's blocks all have one width), plus a trained low-rank change per block
    (:class:`~.low_rank.LowRankChange`, zero at the start), ``K_b = W_K t + B_K,b A_K,b t`` and the same for V.

    Flux.1 dev at rank 16, all 57 blocks: 25.2 M shared + 13.1 M per-block numbers instead of the 1.43 B of
    :class:`ImageBranchWeights` (bench/adapter_sizes.py). Made fresh, its value projection is zero (the changes
    start at zero too), so the untrained branch adds exactly nothing, as the per-block layout's."""

    layout = SHARED_LOW_RANK

    def __init__(self, shapes: dict[BlockKey, tuple[int, int]], rank: int):
        super().__init__()
        self.shared_k = torch.nn.ModuleDict()
        self.shared_v = torch.nn.ModuleDict()
        for inner, token_dim in sorted(set(shapes.values())):
            self.shared_k[str(inner)] = torch.nn.Linear(token_dim, inner, bias=False)
            self.shared_v[str(inner)] = torch.nn.Linear(token_dim, inner, bias=False)
        self.k_change = torch.nn.ModuleDict()
        self.v_change = torch.nn.ModuleDict()
        for block, (inner, token_dim) in shapes.items():
            self.k_change[block_name(block)] = LowRankChange(token_dim, inner, rank)
            self.v_change[block_name(block)] = LowRankChange(token_dim, inner, rank)

    @property
    def rank(self) -> int:
        return next(iter(self.k_change.values())).rank

    def blocks(self) -> list[BlockKey]:
        return [parse_block_name(name) for name in self.k_change]

    def widths(self) -> dict[BlockKey, int]:
        return {parse_block_name(name): change.out_features for name, change in self.k_change.items()}

    def serves(self, block: BlockKey | None) -> bool:
        return block is not None and block_name(block) in self.k_change

    def zero_values(self) -> None:
        for linear in self.shared_v.values():
            torch.nn.init.zeros_(linear.weight)
        for change in self.v_change.values():
            torch.nn.init.zeros_(change.up)

    def project(self, block: BlockKey, tokens: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        name = block_name(block)
        k_change, v_change = self.k_change[name], self.v_change[name]
        width = str(k_change.out_features)
        tokens = tokens.to(self.shared_k[width].weight)
        keys = k_change.added_to(self.shared_k[width](tokens), tokens)
        values = v_change.added_to(self.shared_v[width](tokens), tokens)
        return keys.to(dtype), values.to(dtype)


def block_name(block: BlockKey) -> str:
    """``("input", 4, 1)`` → ``"input_4_1"`` (module and state-dict name of a block's projections)."""
    return "_".join(map(str, block))


def parse_block_name(name: str) -> BlockKey:
    kind, block_id, index = name.split("_")
    return kind, int(block_id), int(index)


def image_branch_output(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, gate: torch.Tensor | None,
                        attention) -> torch.Tensor:
    """``softmax(Q K_iᵀ/√d) V_i`` (shared query, own keys/values) times the ``(B, N, 1)`` gate."""
    out = attention(q, keys, values)
    return out if gate is None else out * gate.to(out.dtype)


@dataclass
class TrainingRun:
    """The run state of a training forward: the branch sees every row's own ``tokens`` through ``mask``,
    all ones for the paper's ungated eq. 4, or the rows' word masks (``(B, H', W')``) in word-mask training."""

    tokens: ImageTokens
    mask: torch.Tensor
    injecting: bool = True
    capturing: bool = False


class WordMapCapture:
    """The run state of a text-only training forward (no image branch) that reads each row's own word
    map (``indicators (B, T)``: a caption and target word per row) into masks of ``settings``."""

    injecting = False
    capturing = True

    def __init__(self, indicators: torch.Tensor, settings: MaskSettings):
        self.indicators = indicators
        self._maps = WordMapAccumulator(settings)

    def capture(self, probs: torch.Tensor, call: AttentionCall) -> None:
        add_word_map(self._maps, probs[..., call.text_keys], self.indicators.to(probs.device), call)

    def mask(self) -> torch.Tensor:
        """``(B, H', W')`` masks of the captured pass."""
        if self._maps.empty:
            raise RuntimeError("no cross-attention layer read the word maps; the model has no word-map reader")
        return self._maps.mask()


@dataclass(frozen=True, eq=False)
class MaskedImageBranch(AttentionProcessor):
    """The released code's visual cross-attention branch, gated by the run's word mask; the image
    tokens come from the run (a :class:`MaskGuidanceRun` or a :class:`TrainingRun`)."""

    weights: ImageBranchWeights | SharedLowRankBranch
    strength: float = 1.0

    name = "realcustom_image_branch"
    node_name = "AdaptiveMaskGuidance"
    patch_point = CROSS_ATTENTION

    def active(self, call: AttentionCall) -> bool:
        run = call.options.get(RUN_KEY)
        return (run is not None and run.injecting and self.strength != 0.0
                and self.weights.serves(call.block))

    def parallel_output(self, q, call: AttentionCall):
        run: MaskGuidanceRun | TrainingRun = call.options[RUN_KEY]
        if run.mask is None:
            return None  # no map yet (a call without cond rows before the first capture)
        chunks = list(call.cond_or_uncond) or [COND]
        rows = q.shape[0] // len(chunks)
        gate = resize_gate(run.mask.to(q.device), *call.query_grid)
        if gate.shape[0] != rows:
            raise ValueError(f"AdaptiveMaskGuidance: the mask holds {gate.shape[0]} images but the batch has {rows}.")
        tokens: ImageTokens = run.tokens
        pos_k, pos_v = self.weights.project(call.block, tokens.reference, q.dtype)
        neg_k = neg_v = None
        if tokens.negative is not None:
            neg_k, neg_v = self.weights.project(call.block, tokens.negative, q.dtype)
        with_image = [i for i, c in enumerate(chunks) if c == COND or neg_k is not None]
        if not with_image:
            return None
        q_chunks = split_chunks(q, len(chunks))
        keys = torch.cat([(pos_k if chunks[i] == COND else neg_k).expand(rows, -1, -1) for i in with_image])
        values = torch.cat([(pos_v if chunks[i] == COND else neg_v).expand(rows, -1, -1) for i in with_image])
        branch = image_branch_output(q_chunks[with_image].flatten(0, 1), keys, values,
                                     gate.repeat(len(with_image), 1, 1), call.attention)
        out = torch.zeros_like(q_chunks)
        out[with_image] = branch.view(len(with_image), rows, *branch.shape[1:])
        return out.flatten(0, 1) * self.strength
