"""The pack's one attention dispatcher per patch point (DESIGN.md §3).

ComfyUI allows a single ``attn1`` and a single ``attn2`` *replace* per transformer block. The pack
installs one :class:`AttentionDispatcher` there (keys from :mod:`.blocks`), and every technique
adds a *processor* to an ordered :class:`ProcessorChain` kept in
``transformer_options["personalization"]``. ``ModelPatcher.clone()`` deep-copies model options,
so each clone carries its own chain; the chain is immutable, so copies are free and a patch never
leaks back into the model it was cloned from.

Processor interface (override what a technique needs; the rest are no-ops):

``active(call) -> bool``
    Whether the processor takes part in this call (block selection, sigma range).
``self_attention(q, k, v, call) -> Tensor``   (attn1 only)
    Computes the whole self-attention output (StyleAligned: AdaIN + reference K/V + score bias).
    At most one active processor per call may own self-attention.
``extra_key_values(q, call) -> (k, v) | JointKeys | None``   (attn2)
    Keys/values appended to the text keys so they join ONE joint softmax (PVA identity tokens).
    A :class:`JointKeys` may also bring its own queries for those keys (PVA's parallel query
    projection, best as :class:`~.joint_softmax.ProjectedQueries`), limit them to some batch rows (cond
    chunks only) and bias their logits; all of it stays one fused attention call per row group.
``edit_key_values(k, v, call) -> (k, v)``   (attn2)
    Edits of the projected text keys/values before anything else uses them (DisenDiff training
    detaches the start-of-text rows so they send no gradient into W_K/W_V).
``edit_logits(logits, call) -> logits``   (attn2)
    Edits of the ``(B, heads, Nq, Nk)`` logits before the softmax (DisenDiff calibration), returned as a new
    tensor; the argument stays as it is. The text
    context's tokens are the key columns ``call.text_keys``; the queries lie on ``call.query_grid``.
``survey_logits(logits, call) -> Tensor | None``   (attn2, with ``edit_logits``)
    What ``edit_logits`` must know of EVERY query row before it edits any (DisenDiff's class maps are
    normalised and smoothed over the whole query grid), as ``(B', rows, ...)``: one entry per query row of
    the given logits, or None when this call needs nothing (then it is not asked for the other rows).
``read_probs(probs, call) -> None``   (attn2)
    Reads the attention probabilities (RealCustom word mask, previews). Must keep only reduced
    maps, never the full tensor.

Query rows: a dispatcher may serve ``edit_logits`` and ``read_probs`` the logits/probabilities of a chunk of
the query rows at a time, in order: ``call.query_rows`` (a slice of the ``Nq`` queries on ``call.query_grid``)
names them, None when all rows come at once. The U-Net dispatcher serves all rows at once; the DiT cross view
serves chunks (:mod:`.joint`: its logits are several GB at 1024 px). A reader that needs the whole grid keeps
a per-row reduction and joins the chunks with :meth:`AttentionCall.gather_rows`. An editor that needs the
whole grid implements ``survey_logits``: a dispatcher serving chunks first passes over all chunks for it
(each with the edits of the processors before it) and then serves ``edit_logits`` the joined rows as
``call.surveys[processor.name]``; with all rows at once there is no entry and ``edit_logits`` surveys its own
argument.

On a DiT the cross-attention hooks get the *cross view* of the joint attention (see :mod:`.joint`):
the image-token queries against the joint keys ``[text | image]``, one softmax over all of them, the
text columns named by ``call.text_keys``; a processor that reads and edits columns ``call.text_keys``,
lays queries out on ``call.query_grid`` and honours ``call.query_rows`` runs on every family unchanged.
``parallel_output(q, call) -> Tensor | None``   (attn2)
    An output added to the attention output, already gated (RealCustom image branch).

Processors that need the layer's input before ``to_q`` (the normed hidden states) set
``needs_hidden_states``; the node glue then installs :func:`stash_hidden_states` as an ``attn2_patch``
and ``call.hidden_states`` returns them.

Logits are materialised only when an active processor edits or reads them; otherwise the call goes
through the fused attention function. When no processor is active the call is exactly ComfyUI's own
attention (or the wrapped foreign replace), so inactive steps and blocks are bit-identical to
unpatched sampling.

Other packs' attention patches:

- The additive attn2 protocol of IPAdapter_plus, InstantID and PuLID (their ``Attn2Replace``): such a
  pack calls ``.add(callback, **kwargs)`` on the replace it finds at a block, and expects
  ``callback(out, q, k, v, extra_options, **kwargs)`` to be added to the attention output while
  ``sigma_end <= sigma <= sigma_start``. The dispatcher speaks it (:meth:`AttentionDispatcher.add`), and
  adopts the callbacks of such a replace installed before ours, so both orders give the same result
  and compose with every technique. ``ModelPatcher.clone()`` deep-copies the dispatcher, so a callback
  stays with the clone the other pack made.
- Any other replace installed first is kept as ``inner``: its output is the base output and ours is
  added. Operations that cannot compose with a foreign attention (own self-attention, joint keys,
  logit edits) raise :class:`AttentionConflictError` naming both.
- A replace installed after ours overwrites our dispatcher; :func:`overwritten_dispatchers` finds
  those blocks so the node glue can refuse to sample instead of silently dropping our patch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .blocks import BlockKey
from .joint_softmax import ProjectedQueries, extra_key_logits, fused_joint_attention, merged_joint_attention
from .layout import chunk_count
from .sdpa import merge_heads, sdpa_with_logsumexp, split_heads

CHAIN_KEY = "personalization"
#: extra_options key under which stash_hidden_states leaves the attn2 query input of the block.
HIDDEN_STATES_KEY = "personalization.attn2_hidden_states"
SELF_ATTENTION = "attn1"
CROSS_ATTENTION = "attn2"

AttentionFn = Callable[..., torch.Tensor]
#: ``(attention function, options of the call) -> bool``: whether that function, called with those options,
#: computes exactly the plain softmax attention (so torch's kernel returning the log-sum-exp may stand in for it).
#: The node glue knows which of ComfyUI's functions do; without one, no function is taken for exact.
ExactAttentionCheck = Callable[[AttentionFn, dict], bool]


class AttentionConflictError(RuntimeError):
    """Two patches want the same attention call in ways that cannot be combined."""


class AttentionProcessor:
    """Base of every technique's processor; see the module docstring for the hooks."""

    #: technique id; a chain holds at most one processor per name (a later node replaces it).
    name: str = "processor"
    #: display name of the node that adds it, used in error messages.
    node_name: str = "personalization node"
    #: SELF_ATTENTION or CROSS_ATTENTION.
    patch_point: str = SELF_ATTENTION
    #: whether the processor reads ``call.hidden_states`` (the layer's input before ``to_q``).
    needs_hidden_states: bool = False
    #: whether its logit/probability hooks need the rows of uncond chunks; processors that read or edit only the
    #: cond rows say False, and a DiT's cross view then serves them the cond rows alone (``call`` describing those)
    #: while the other rows take the fused path
    views_uncond_rows: bool = True
    #: whether ``read_probs`` reads the text keys' columns only (``call.text_keys``); a DiT then serves such a reader
    #: (when it edits nothing) only the first columns of the joint keys, up to the text's, computed from the fused
    #: kernel's log-sum-exp of each query's joint softmax where that kernel serves (``attention_with_logsumexp``)
    reads_text_columns_only: bool = False

    def active(self, call: "AttentionCall") -> bool:
        return True

    def self_attention(self, q, k, v, call: "AttentionCall") -> torch.Tensor:
        raise NotImplementedError

    def extra_key_values(self, q, call: "AttentionCall"):
        return None

    def edit_key_values(self, k, v, call: "AttentionCall"):
        return k, v

    def edit_logits(self, logits, call: "AttentionCall"):
        return logits

    def survey_logits(self, logits, call: "AttentionCall"):
        return None

    def read_probs(self, probs, call: "AttentionCall") -> None:
        return None

    def parallel_output(self, q, call: "AttentionCall"):
        return None

    def overrides(self, hook: str) -> bool:
        """Whether this processor implements ``hook`` (so the dispatcher can pick its fast path)."""
        return getattr(type(self), hook) is not getattr(AttentionProcessor, hook)

    def __deepcopy__(self, memo):
        # Processors are immutable settings (heavy weights live in their own ModelPatcher), so the
        # deep copy ModelPatcher.clone() makes of model options can share them.
        return self


@dataclass(frozen=True)
class JointKeys:
    """Keys/values a processor adds to the joint cross-attention softmax.

    Logits of these keys are ``queries_h · keys_hᵀ / √d + logit_bias`` per head, where ``queries``
    defaults to the layer's own queries; batch rows outside ``rows`` give them probability 0 (they see
    plain cross-attention). All of it goes through the fused attention function (:mod:`.joint_softmax`)
    unless a processor edits or reads the logits.
    """

    keys: torch.Tensor  # (B, M, heads * d)
    values: torch.Tensor  # (B, M, heads * d)
    queries: Optional[torch.Tensor | ProjectedQueries] = None  # (B, Nq, heads * d)
    rows: Optional[torch.Tensor] = None  # (B,) bool
    logit_bias: float = 0.0

    @classmethod
    def of(cls, extra) -> "JointKeys":
        """What ``extra_key_values`` returned: a JointKeys, or plain ``(keys, values)``."""
        return extra if isinstance(extra, JointKeys) else cls(*extra)

    @property
    def shares_queries(self) -> bool:
        """True when these keys are plain extra keys of the layer's own softmax (concatenated to the text keys)."""
        return self.queries is None and self.rows is None and self.logit_bias == 0.0

    def of_rows(self, index) -> "JointKeys":
        """These keys for the batch rows ``index`` (a slice or index tensor), each row still seeing them or not."""
        queries = self.queries
        if queries is not None:
            queries = queries.take_rows(index) if isinstance(queries, ProjectedQueries) else queries[index]
        rows = self.rows
        if rows is not None:
            rows = rows[index if isinstance(index, slice) else index.to(rows.device)]
        return JointKeys(self.keys[index], self.values[index], queries, rows, self.logit_bias)

    def records_gradients(self) -> bool:
        """Whether autograd records the computation of these keys' logits and values (training)."""
        queries = self.queries
        own = (queries.inputs, queries.weight, queries.bias) if isinstance(queries, ProjectedQueries) else (queries,)
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (self.keys, self.values, *own))

    def take_rows(self, index) -> "JointKeys":
        """These keys for the batch rows ``index`` (a slice or index tensor), all of which see them."""
        queries = self.queries
        if queries is not None:
            queries = queries.take_rows(index) if isinstance(queries, ProjectedQueries) else queries[index]
        return JointKeys(self.keys[index], self.values[index], queries, None, self.logit_bias)


def stash_hidden_states(n, context, value, extra_options):
    """``attn2_patch`` keeping the block's attn2 query input for ``AttentionCall.hidden_states``.

    ComfyUI passes the same ``extra_options`` dict to the attn2 patches and then to the attn2 replace of
    the block, and builds a new dict per block call, so nothing outlives the call.
    """
    extra_options[HIDDEN_STATES_KEY] = n
    return n, context, value


@dataclass(frozen=True)
class ProcessorChain:
    """Ordered, immutable list of processors carried in transformer_options."""

    processors: tuple[AttentionProcessor, ...] = ()
    #: (patch point, key) of every entry our patches were installed at: U-Net attn1/attn2 replaces (block
    #: keys, and the (name, id) aliases of one-transformer blocks); a DiT's attention override and block markers
    served: frozenset[tuple[str, tuple]] = frozenset()

    def with_processor(self, processor: AttentionProcessor, served=()) -> "ProcessorChain":
        """This chain plus ``processor`` (replacing one of the same name), our patches now also at the
        ``(patch point, key)`` entries ``served``."""
        kept = tuple(p for p in self.processors if p.name != processor.name)
        return ProcessorChain(kept + (processor,), self.served | frozenset(served))

    def at(self, patch_point: str) -> tuple[AttentionProcessor, ...]:
        return tuple(p for p in self.processors if p.patch_point == patch_point)

    def __deepcopy__(self, memo):
        return self


class AttentionCall:
    """What a processor knows about the attention call it is part of."""

    def __init__(self, options: dict, attention: AttentionFn, batch: int, heads: int, dim_head: int,
                 block: Optional[BlockKey], context: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 attn_precision=None, query_grid: Optional[tuple[int, int]] = None,
                 is_exact_attention: Optional[ExactAttentionCheck] = None):
        self.options = options
        self.heads, self.dim_head, self.block = heads, dim_head, block
        self.cond_or_uncond: tuple[int, ...] = tuple(options.get("cond_or_uncond") or ())
        self.n_chunks: int = chunk_count(list(self.cond_or_uncond), batch)
        #: (keys, values) every query of a self-attention view also attends to, unshared (a DiT's text
        #: tokens of the same sample); None on a U-Net
        self.context = context
        #: ``(B, heads, Nq, T)`` logits a self-attention view adds to its queries' logits of the ``context`` keys:
        #: the edits of cross-attention processors sharing the joint call of a DiT (see :mod:`.joint`); else None
        self.context_bias: Optional[torch.Tensor] = None
        #: key columns of the text context's tokens in the logits/probabilities a cross-attention processor
        #: gets (U-Net: all text keys, before any extra keys; DiT: the conditioning's tokens of the joint keys)
        self.text_keys: Optional[slice] = None
        #: the query rows (of the ``Nq`` on ``query_grid``) whose logits/probabilities a cross-attention processor
        #: gets in this hook call, when the dispatcher serves them in chunks (a DiT's cross view); None: all rows
        self.query_rows: Optional[slice] = None
        #: ``survey_logits`` of every query row, joined, by processor name (only while chunks are served)
        self.surveys: dict[str, torch.Tensor] = {}
        #: (rows, columns) of the query tokens when the dispatcher knows them (DiT), else read from ComfyUI
        self._query_grid = query_grid
        #: the layer's input before ``to_q`` when the dispatcher has it (DiT), else read from ComfyUI's stash
        self._hidden_states: Optional[torch.Tensor] = None
        #: ``(B, N, heads * d) -> same``: what the family does to its image queries after projecting and
        #: normalising them (Flux: rotary position embedding); None: nothing
        self._image_query_placement: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._gathering: dict = {}
        self._attention = attention
        self._is_exact_attention = is_exact_attention
        self._attn_precision = attn_precision
        self._sigma: Optional[float] = None

    @classmethod
    def of_unet_block(cls, extra_options: dict, attention: AttentionFn, batch: int,
                      is_exact_attention: Optional[ExactAttentionCheck] = None) -> "AttentionCall":
        """The call of an attn1/attn2 replace, from the ``extra_options`` ComfyUI gives it."""
        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0)) if block else None
        return cls(extra_options, attention, batch, extra_options["n_heads"], extra_options["dim_head"], key,
                   attn_precision=extra_options.get("attn_precision"), is_exact_attention=is_exact_attention)

    def of_cond_rows(self) -> "AttentionCall":
        """This call as its cond chunks alone see it (for hooks served only the cond rows)."""
        view = copy.copy(self)
        view.cond_or_uncond = tuple(c for c in self.cond_or_uncond if c == 0)
        view.n_chunks = len(view.cond_or_uncond)
        view.surveys, view._gathering = {}, {}
        return view

    @property
    def sigma(self) -> Optional[float]:
        """The noise level of this call (largest in the batch), or None outside sampling."""
        if self._sigma is None and self.options.get("sigmas") is not None:
            self._sigma = float(self.options["sigmas"].max())
        return self._sigma

    @property
    def query_grid(self) -> tuple[int, int]:
        """(rows, columns) the queries of this call lie on, row-major: the latent's token grid of a DiT, the
        feature map of a U-Net layer."""
        if self._query_grid is not None:
            return self._query_grid
        height, width = self.options["activations_shape"][-2:]
        return int(height), int(width)

    def gather_rows(self, key, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """For a processor that reduces each query row it gets (``call.query_rows``) to ``rows`` ``(B', len(query_rows),
        ...)``: the rows of all chunks of this call joined in order ``(B', Nq, ...)`` once the chunk holding the last
        query has come, else None (nothing to finish yet). ``key`` names the reduction (one per processor and
        purpose). With all rows at once it is ``rows`` itself."""
        if self.query_rows is None:
            return rows
        pieces = self._gathering.setdefault(key, [])
        pieces.append(rows)
        if self.query_rows.stop < self.query_grid[0] * self.query_grid[1]:
            return None
        del self._gathering[key]
        return torch.cat(pieces, dim=1)

    @property
    def hidden_states(self) -> torch.Tensor:
        """The layer's input before ``to_q`` (normed hidden states), for processors with own projections; on a
        DiT the input of the image stream's query projection for the latent's image tokens."""
        if self._hidden_states is not None:
            return self._hidden_states
        states = self.options.get(HIDDEN_STATES_KEY)
        if states is None:
            raise RuntimeError("the attn2 hidden states were not stashed for this block; a processor with "
                               "needs_hidden_states must be added with nodes.patching.add_attention_processor")
        return states

    def place_image_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Projected, normalised image queries ``(B, N, heads * d)`` placed as the family places its own before
        attention (Flux rotates them by the tokens' positions; U-Nets and SD3 do nothing)."""
        return queries if self._image_query_placement is None else self._image_query_placement(queries)

    def attention(self, q, k, v, mask=None) -> torch.Tensor:
        """ComfyUI's attention (backends and overrides included) over ``(B, N, heads*d)`` tensors."""
        return self._attention(q, k, v, self.heads, mask=mask, attn_precision=self._attn_precision,
                               transformer_options=self.options)

    def attention_with_logsumexp(self, q, k, v) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`attention` and each query's log-sum-exp ``(B, heads, Nq)`` from torch's fused kernel
        (:func:`.sdpa.sdpa_with_logsumexp`), where the node glue found that this call's attention computes the
        same exact softmax; None where it does not, or where that kernel cannot serve."""
        if self._is_exact_attention is None or not self._is_exact_attention(self._attention, self.options):
            return None
        return sdpa_with_logsumexp(q, k, v, self.heads)


def sigma_in_range(sigma: Optional[float], sigma_start: float, sigma_end: float) -> bool:
    """Step gating shared by the techniques: active while ``sigma_end <= sigma <= sigma_start``."""
    return sigma is None or sigma_end <= sigma <= sigma_start


def origin_of(patch) -> tuple[str, str]:
    """(qualified name, module) of another pack's patch, a function or a callable object."""
    owner = getattr(patch, "__module__", None) or type(patch).__module__
    return getattr(patch, "__qualname__", type(patch).__qualname__), owner


def describe_foreign(inner) -> str:
    name, owner = origin_of(inner)
    return f"another node pack's attention patch ({name} from {owner})"


class AttentionDispatcher:
    """The single replace installed at one patch point of one block."""

    def __init__(self, patch_point: str, attention_fn: AttentionFn, inner: Optional[Callable] = None,
                 added: tuple[tuple[Callable, dict], ...] = (), is_exact_attention: Optional[ExactAttentionCheck] = None):
        self.patch_point = patch_point
        self.attention_fn = attention_fn
        self.is_exact_attention = is_exact_attention
        self.inner = inner
        self.added = list(added)

    def add(self, callback: Callable, **kwargs) -> None:
        """The additive attn2 protocol (IPAdapter_plus, InstantID, PuLID); see the module docstring."""
        self.added.append((callback, kwargs))

    def __call__(self, q, k, v, extra_options):
        chain: Optional[ProcessorChain] = extra_options.get(CHAIN_KEY)
        call = AttentionCall.of_unet_block(extra_options, self.attention_fn, q.shape[0], self.is_exact_attention)
        processors = [p for p in chain.at(self.patch_point) if p.active(call)] if chain else []
        if not processors:
            out = self._base(q, k, v, call)
        elif self.patch_point == SELF_ATTENTION:
            out = self._self_attention(q, k, v, call, processors)
        else:
            out = self._cross_attention(q, k, v, call, processors)
        return self._add_callbacks(out, q, k, v, call)

    def _add_callbacks(self, out, q, k, v, call):
        for callback, kwargs in self.added:
            if sigma_in_range(call.sigma, kwargs.get("sigma_start", float("inf")), kwargs.get("sigma_end", 0.0)):
                out = out + callback(out, q, k, v, call.options, **kwargs).to(out.dtype)
        return out

    def _base(self, q, k, v, call: AttentionCall):
        if self.inner is not None:
            return self.inner(q, k, v, call.options)
        return call.attention(q, k, v)

    def _self_attention(self, q, k, v, call, processors):
        owners = [p for p in processors if p.overrides("self_attention")]
        if len(owners) > 1:
            raise AttentionConflictError(
                f"{owners[0].node_name} and {owners[1].node_name} both replace self-attention in block "
                f"{call.block}; use one of them per model.")
        if owners and self.inner is not None:
            raise AttentionConflictError(
                f"{owners[0].node_name} replaces self-attention, but {describe_foreign(self.inner)} already "
                f"replaced it in block {call.block}; apply only one of them to this model.")
        return owners[0].self_attention(q, k, v, call) if owners else self._base(q, k, v, call)

    def _cross_attention(self, q, k, v, call, processors):
        call.text_keys = slice(0, k.shape[1])
        for processor in processors:
            if processor.overrides("edit_key_values"):
                k, v = processor.edit_key_values(k, v, call)
        joint = [p for p in processors if p.overrides("extra_key_values")]
        editors = [p for p in processors if p.overrides("edit_logits")]
        readers = [p for p in processors if p.overrides("read_probs")]
        if self.inner is not None and (joint or editors):
            offender = (joint or editors)[0]
            raise AttentionConflictError(
                f"{offender.node_name} changes the cross-attention softmax, which cannot be combined with "
                f"{describe_foreign(self.inner)} in block {call.block}; apply only one of them to this model.")
        own_queries = []
        for processor in joint:
            extra = processor.extra_key_values(q, call)
            if extra is None:
                continue
            extra = JointKeys.of(extra)
            if extra.shares_queries:
                k = torch.cat([k, extra.keys.to(k.dtype)], dim=1)
                v = torch.cat([v, extra.values.to(v.dtype)], dim=1)
            else:
                own_queries.append(extra)

        if self.inner is not None:
            out = self.inner(q, k, v, call.options)
            if readers:
                probs = attention_probs(q, k, call.heads)
                for processor in readers:
                    processor.read_probs(probs, call)
        elif editors or readers:
            out = self._materialised_attention(q, k, v, call, editors, readers, own_queries)
        elif own_queries:
            out = attention_with_extra_keys(q, k, v, call, own_queries)
        else:
            out = call.attention(q, k, v)

        for processor in processors:
            if processor.overrides("parallel_output"):
                extra_out = processor.parallel_output(q, call)
                if extra_out is not None:
                    out = out + extra_out.to(out.dtype)
        return out

    @staticmethod
    def _materialised_attention(q, k, v, call, editors, readers, own_queries=()):
        logits = attention_logits(q, k, call.heads)
        if own_queries:
            logits = torch.cat([logits, *(joint_logits(q, extra, call.heads) for extra in own_queries)], dim=-1)
            v = torch.cat([v, *(extra.values.to(v.dtype) for extra in own_queries)], dim=1)
        for processor in editors:
            logits = processor.edit_logits(logits, call)
        probs = logits.softmax(dim=-1)
        del logits
        for processor in readers:
            processor.read_probs(probs, call)
        return merge_heads(probs.to(v.dtype) @ split_heads(v, call.heads))

    def to(self, device):
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(device)
        return self

    def models(self):
        return self.inner.models() if hasattr(self.inner, "models") else []


def attention_with_extra_keys(q, k, v, call: AttentionCall, own_queries: list[JointKeys], with_logsumexp: bool = False):
    """``q`` against the keys ``k`` and the extra keys of ``own_queries`` (with their own queries, bias or rows) in
    one softmax, through fused attention: one call per group of batch rows that see the same extra keys; rows
    that see none get exactly the plain attention. The extra keys join the plain call's output by its
    log-sum-exp where the call has it, else they widen its heads (:mod:`.joint_softmax`).

    ``with_logsumexp``: ``(output, log-sum-exp)``, each query's log-sum-exp over every key it saw ``(B, heads,
    Nq)`` float32, or None where no kernel returning it serves the call."""
    batch = q.shape[0]
    # torch does not differentiate the kernel's log-sum-exp (sdpa_with_logsumexp refuses q/k/v that need it)
    by_logsumexp = not any(extra.records_gradients() for extra in own_queries)
    seen_by = [[True] * batch if extra.rows is None else extra.rows.tolist() for extra in own_queries]
    groups: dict[tuple[bool, ...], list[int]] = {}
    for row in range(batch):
        groups.setdefault(tuple(seen[row] for seen in seen_by), []).append(row)
    pieces = []
    for sees, rows in groups.items():
        index = row_index(rows, q.device)
        q_rows, k_rows, v_rows = q[index], k[index], v[index]
        extras = [extra.take_rows(index) for extra, seen in zip(own_queries, sees) if seen]
        wanted = by_logsumexp and (extras or with_logsumexp)
        plain = call.attention_with_logsumexp(q_rows, k_rows, v_rows) if wanted else None
        if with_logsumexp and plain is None:
            return None
        if not extras:
            pieces.append(plain if with_logsumexp else call.attention(q_rows, k_rows, v_rows))
            continue
        logits = torch.cat([extra_key_logits(q_rows if extra.queries is None else extra.queries, extra.keys,
                                             call.heads, extra.logit_bias) for extra in extras], dim=-2)
        values = torch.cat([extra.values for extra in extras], dim=1)
        if plain is not None:
            merged = merged_joint_attention(*plain, logits, values, call.heads)
            pieces.append(merged if with_logsumexp else merged[0])
        else:
            pieces.append(fused_joint_attention(q_rows, k_rows, v_rows, logits, values, call.heads, call.attention))
    order = [row for rows in groups.values() for row in rows]
    restore = None if order == list(range(batch)) else torch.tensor(order, device=q.device).argsort()

    def joined(parts):
        whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        return whole if restore is None else whole.index_select(0, restore.to(whole.device))
    if with_logsumexp:
        return joined([out for out, _ in pieces]), joined([logsumexp for _, logsumexp in pieces])
    return joined(pieces)


def attention_logits(q, k, heads) -> torch.Tensor:
    """``(B, heads, Nq, Nk)`` float32 logits with the standard ``1/sqrt(d)`` scale."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return (qh * qh.shape[-1] ** -0.5) @ kh.transpose(-1, -2)  # scaling the queries costs less than the logits


def row_index(rows: list[int], device):
    """Batch rows as a slice (a view) when consecutive, else as an index tensor."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return torch.tensor(rows, device=device)


def joint_logits(q, extra: JointKeys, heads) -> torch.Tensor:
    """``(B, heads, Nq, M)`` float32 logits of ``extra``'s keys against its own queries (or ``q``), biased,
    masked outside its rows."""
    logits = extra_key_logits(q if extra.queries is None else extra.queries, extra.keys.float(), heads,
                              extra.logit_bias).transpose(-1, -2)
    if extra.rows is not None:
        logits = logits.masked_fill(~extra.rows.to(logits.device).view(-1, 1, 1, 1), float("-inf"))
    return logits


def attention_probs(q, k, heads) -> torch.Tensor:
    return attention_logits(q, k, heads).softmax(dim=-1)


def install_dispatcher(existing: Optional[Callable], patch_point: str, attention_fn: AttentionFn,
                       is_exact_attention: Optional[ExactAttentionCheck] = None) -> AttentionDispatcher:
    """The dispatcher for a block: ours if already there, else a new one that adopts the callbacks of an
    additive-protocol replace or wraps any other foreign replace."""
    if isinstance(existing, AttentionDispatcher):
        return existing
    callbacks = additive_callbacks(existing)
    if callbacks is not None:
        return AttentionDispatcher(patch_point, attention_fn, added=callbacks, is_exact_attention=is_exact_attention)
    return AttentionDispatcher(patch_point, attention_fn, inner=existing, is_exact_attention=is_exact_attention)


def additive_callbacks(replace) -> Optional[tuple[tuple[Callable, dict], ...]]:
    """The (callback, kwargs) pairs of an ``Attn2Replace``-style replace (plain attention plus added
    callbacks: parallel ``callback`` and ``kwargs`` lists and an ``add`` method), else None."""
    callbacks, kwargs = getattr(replace, "callback", None), getattr(replace, "kwargs", None)
    if (callable(getattr(replace, "add", None)) and isinstance(callbacks, list) and isinstance(kwargs, list)
            and len(callbacks) == len(kwargs) and all(callable(c) for c in callbacks)):
        return tuple(zip(callbacks, (dict(k) for k in kwargs)))
    return None


def overwritten_dispatchers(transformer_options: dict) -> Iterator[tuple[str, tuple, Callable]]:
    """(patch point, key, replace) of every replace entry our chain is served at that is no longer our
    dispatcher: another pack replaced it after our nodes ran, so our processors (or its patch, hidden
    behind ours) would never run."""
    chain: Optional[ProcessorChain] = transformer_options.get(CHAIN_KEY)
    replaces = transformer_options.get("patches_replace", {})
    for point, key in sorted(chain.served) if chain else ():
        if point not in (SELF_ATTENTION, CROSS_ATTENTION):
            continue
        replace = replaces.get(point, {}).get(key)
        if not isinstance(replace, AttentionDispatcher):
            yield point, key, replace
