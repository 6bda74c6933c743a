"""DisenDiff attention calibration (Zhang et al., "Attention Calibration for Disentangled
Text-to-Image Personalization", CVPR 2024): token maps, the calibration losses and the processors.

Maps (spec §3.2 step 5): cross-attention probabilities of one token, averaged over the heads of the
map layers and over those layers, min-max normalised, smoothed by the 3×3 Attend-and-Excite Gaussian
(σ 0.5, whose exponent is ((x−μ)/(2σ))²), and squared for class tokens (the paper's f_m).

Losses (spec §3.2 steps 6–8): soft IoU with smoothing 1; binding ``1 − IoU(sg(C_i), M_i)`` per
concept and separation ``IoU(C_2, C_1)`` (mean over pairs for more than two concepts).

Map layers: the paper uses SD1.5's 16×16 layers at 512 px; ``token_maps.map_block_keys`` picks the
equivalent layers of any U-Net, and ``token_maps.MapRecorder`` captures the maps for the trainer and
the preview.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dispatcher import CROSS_ATTENTION, AttentionProcessor, sigma_in_range
from .layout import cond_row_indices
from .prompt_context import repeated_positions

IOU_SMOOTHING = 1.0
GAUSSIAN_SIGMA = 0.5


def gaussian_kernel(sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """The 3×3 Attend-and-Excite kernel: separable exp(−((x−μ)/(2σ))²), normalised to sum 1."""
    x = torch.arange(3, dtype=torch.float32) - 1.0
    g = torch.exp(-((x / (2 * sigma)) ** 2))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """Gaussian smoothing of ``(..., H, W)`` maps with reflect padding of 1 (replicate padding for a map one
    pixel high or wide, which has nothing to reflect: sampling-time maps of tiny images)."""
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    padded = F.pad(flat, (1, 1, 1, 1), mode="reflect" if min(shape[-2:]) > 1 else "replicate")
    return F.conv2d(padded, gaussian_kernel(sigma).to(maps)[None, None]).reshape(shape)


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map normalisation of ``(..., H, W)`` to [0, 1] (``absolute=False`` in the official code)."""
    flat = maps.flatten(-2)
    low, high = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - low) / (high - low + 1e-8)).reshape(maps.shape)


def process_maps(maps: torch.Tensor, suppress: bool) -> torch.Tensor:
    """mean-aggregated maps → min-max → Gaussian → square for class tokens (f_m)."""
    smoothed = smooth(min_max(maps))
    return smoothed * smoothed if suppress else smoothed


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(Σab + 1) / (Σa + Σb − Σab + 1)`` over the last two dims."""
    inter = (a * b).flatten(-2).sum(-1)
    return (inter + IOU_SMOOTHING) / (a.flatten(-2).sum(-1) + b.flatten(-2).sum(-1) - inter + IOU_SMOOTHING)


def calibration_loss(modifier_maps: torch.Tensor, class_maps: torch.Tensor) -> torch.Tensor:
    """Per-sample DisenDiff attention loss from aggregated maps of shape ``(B, S, H, W)``, S ≥ 2.

    Binding ``Σ_i 1 − IoU(sg(C_i), M_i)`` plus separation ``IoU(C_2, C_1)`` (two concepts) or its mean
    over all pairs (three or more, as the official 3-concept code).
    """
    concepts = modifier_maps.shape[1]
    if concepts < 2 or class_maps.shape != modifier_maps.shape:
        raise ValueError(f"need matching (B, S>=2, H, W) maps, got {tuple(modifier_maps.shape)}, {tuple(class_maps.shape)}")
    mods = process_maps(modifier_maps, suppress=False)
    classes = process_maps(class_maps, suppress=True)
    binding = (1 - soft_iou(classes.detach(), mods)).sum(1)
    pairs = [(j, i) for i in range(concepts) for j in range(i + 1, concepts)]
    separation = torch.stack([soft_iou(classes[:, j], classes[:, i]) for j, i in pairs], 1).mean(1)
    return binding + separation


@dataclass(frozen=True)
class Concept:
    """Context positions of one concept's modifier and class tokens in the cond prompt."""

    modifier: tuple[int, ...]
    word: tuple[int, ...]


#: transformer_options key: the number of text tokens of the call's context, set by CalibratedCrossAttn's
#: sampling wrapper once it has checked that the cond rows' context is the node's prompt
CONTEXT_TOKENS_KEY = "personalization.calibration_context_tokens"


@dataclass(eq=False)
class CalibratedCrossAttention(AttentionProcessor):
    """Sampling-time calibration (goes beyond the paper, which is prompt-only at inference).

    In cond rows of every cross-attention layer in the sigma range, with ``P`` the softmax of the
    logits and ``Ĉ_i`` concept i's class map of the layer (head mean of ``P`` on its class word's
    tokens) processed as training processes class maps (min-max, 3×3 Gaussian, squared: f_m(G(·))):
    - binding: ``logits[m_i] += strength · (2Ĉ_i − 1)``, raising the modifier where its class attends;
    - separation: ``logits[m_i ∪ c_i] −= strength · relu(Ĉ_j − Ĉ_i)`` for every other concept j,
      lowering concept i where concept j dominates.
    Training averages the maps of the deepest layers (16×16 on SD1.5 at 512 px) before processing them;
    here each layer's edit needs a map within the same forward pass, before those layers have run, so
    it uses its own.

    Concept positions are tokens of the node's prompt (``prompt_length`` tokens); the text keys of a call
    (from column ``call.text_keys.start`` on) are that prompt, repeated when ComfyUI padded the cond to a
    longer one, and their count comes from ``CONTEXT_TOKENS_KEY``, set by the node's prompt check. A call
    whose text cannot hold the positions is an error, never a silent no-op.

    On a DiT the logits are the cross view of the joint attention (``attention.joint``): the latent's image
    queries against ``[text | image]`` keys with one softmax, so the maps are the probabilities on the
    words' text columns within it, and only text columns are edited. The cross view serves the logits in chunks
    of query rows; the class maps of the whole grid are then made from :meth:`survey_logits` of every chunk.
    ``strength`` 0 makes the processor inactive, so sampling is exactly the plain one.
    """

    concepts: tuple[Concept, ...]
    strength: float
    sigma_start: float
    sigma_end: float
    prompt_length: int
    views_uncond_rows = False  # cond rows only
    name = "disendiff_calibration"
    node_name = "CalibratedCrossAttn"
    patch_point = CROSS_ATTENTION

    def active(self, call):
        return self.strength != 0 and sigma_in_range(call.sigma, self.sigma_start, self.sigma_end)

    def text_repeats(self, call) -> int:
        """How many times the prompt fills the call's text keys (ComfyUI repeats a shorter cond)."""
        text_tokens = call.options.get(CONTEXT_TOKENS_KEY)
        if text_tokens is None:
            raise RuntimeError(f"{self.node_name}: this cross-attention call came without the length of its text "
                               "context; the node's sampling wrapper did not run (sample the MODEL with a sampler "
                               "node).")
        text_keys = call.text_keys.stop - call.text_keys.start
        last = max(p for c in self.concepts for p in c.modifier + c.word)
        if last >= self.prompt_length or text_tokens % self.prompt_length or text_tokens > text_keys:
            raise ValueError(f"{self.node_name}: the concepts sit at tokens up to {last} of the node's prompt "
                             f"({self.prompt_length} tokens), but this attention call has {text_tokens} text "
                             f"tokens among {text_keys} keys; give the node the prompt of the positive conditioning.")
        return text_tokens // self.prompt_length

    def concept_columns(self, call):
        """(modifier columns, class word columns) per concept, the columns whose probabilities make the class maps,
        and the columns edited, of the call's logits."""
        repeats = self.text_repeats(call)
        first = call.text_keys.start
        keys = [([first + p for p in repeated_positions(c.modifier, self.prompt_length, repeats)],
                 [first + p for p in repeated_positions(c.word, self.prompt_length, repeats)]) for c in self.concepts]
        read = sorted({k for _modifier, word in keys for k in word})
        written = sorted({k for modifier, word in keys for k in modifier + word})
        return keys, read, written

    def survey_logits(self, logits, call):
        """``(cond rows, query rows, read columns)``: the head mean of the softmax of the cond rows' logits on the
        class words' columns, from which the class maps of the whole query grid are made; None without cond rows."""
        cond_rows = cond_row_indices(call.cond_or_uncond, logits.shape[0])
        if not cond_rows:
            return None
        _keys, read, _written = self.concept_columns(call)
        heads = logits.shape[1]
        rows = torch.tensor(cond_rows, device=logits.device)
        # Only the class words' columns are kept: a DiT's joint logits hold thousands of image keys, so the softmax
        # goes one head at a time.
        return sum(logits[rows, head].softmax(-1)[..., read] for head in range(heads)) / heads

    def edit_logits(self, logits, call):
        cond_rows = cond_row_indices(call.cond_or_uncond, logits.shape[0])
        if not cond_rows:
            return logits
        keys, read, written = self.concept_columns(call)
        # the class maps need every query row: surveyed by the dispatcher when it serves the rows in chunks
        word_probs = call.surveys.get(self.name)
        if word_probs is None:
            word_probs = self.survey_logits(logits, call)
        queries = word_probs.shape[1]
        height, width = call.query_grid
        if height * width != queries:
            raise ValueError(f"{self.node_name}: cannot lay {queries} queries out on the layer's {height}x{width} grid")
        query_rows = slice(None) if call.query_rows is None else call.query_rows
        class_maps = [process_maps(word_probs[..., [read.index(k) for k in word]].mean(-1).view(-1, height, width),
                                   suppress=True).flatten(1)[:, query_rows] for _modifier, word in keys]
        edit = word_probs.new_zeros(len(cond_rows), logits.shape[2], len(written))
        for i, (modifier, word) in enumerate(keys):
            edit[..., [written.index(k) for k in modifier]] += (self.strength * (2 * class_maps[i] - 1))[..., None]
            for j, other in enumerate(class_maps):
                if j != i:
                    penalty = (self.strength * (other - class_maps[i]).clamp_min(0))[..., None]
                    edit[..., [written.index(k) for k in modifier + word]] -= penalty
        # Nothing else of the logits' size is made but the edited copy.
        edited = logits.clone()
        columns = torch.tensor(written, device=logits.device)
        heads = logits.shape[1]
        for row, row_edit in zip(cond_rows, edit):
            edited[row].index_add_(-1, columns, row_edit.to(edited.dtype).expand(heads, -1, -1))
        return edited
