"""The attention dispatcher's hooks against explicit formulations, with toy processors."""
import copy

import pytest
import torch

from personalization_nodes.attention.dispatcher import (
    CHAIN_KEY, CROSS_ATTENTION, SELF_ATTENTION, AttentionConflictError, AttentionDispatcher, AttentionProcessor,
    JointKeys, ProcessorChain, install_dispatcher, overwritten_dispatchers)
from personalization_nodes.attention.joint_softmax import ProjectedQueries
from personalization_nodes.attention.sdpa import sdpa_attention, sdpa_with_logsumexp

from harness.additive_replace import AdditiveAttn2Replace

HEADS, DIM_HEAD = 2, 4
C = HEADS * DIM_HEAD


def plain(q, k, v, heads=HEADS, mask=None, **_):
    return sdpa_attention(q, k, v, heads, mask=mask)


def options(chain=None, block=("input", 1), sigma=5.0, cond_or_uncond=(1, 0)):
    opts = {"n_heads": HEADS, "dim_head": DIM_HEAD, "block": block, "block_index": 0,
            "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([sigma])}
    if chain is not None:
        opts[CHAIN_KEY] = chain
    return opts


def explicit_attention(q, k, v, logit_edit=lambda x: x):
    qh = q.view(q.shape[0], q.shape[1], HEADS, DIM_HEAD).transpose(1, 2)
    kh = k.view(k.shape[0], k.shape[1], HEADS, DIM_HEAD).transpose(1, 2)
    vh = v.view(v.shape[0], v.shape[1], HEADS, DIM_HEAD).transpose(1, 2)
    probs = logit_edit(qh @ kh.transpose(-1, -2) / DIM_HEAD ** 0.5).softmax(-1)
    return (probs @ vh).transpose(1, 2).reshape(q.shape[0], q.shape[1], C), probs


class JointTokens(AttentionProcessor):
    name, patch_point = "joint", CROSS_ATTENTION

    def __init__(self, k_extra, v_extra):
        self.k_extra, self.v_extra = k_extra, v_extra

    def extra_key_values(self, q, call):
        return self.k_extra.expand(q.shape[0], -1, -1), self.v_extra.expand(q.shape[0], -1, -1)


class DampFirstToken(AttentionProcessor):
    name, patch_point = "damp", CROSS_ATTENTION

    def edit_logits(self, logits, call):
        logits = logits.clone()
        logits[..., 0] -= 2.0
        return logits


class Recorder(AttentionProcessor):
    name, patch_point = "recorder", CROSS_ATTENTION

    def __init__(self):
        self.seen = []

    def read_probs(self, probs, call):
        self.seen.append(probs.mean(dim=1))


class GatedBranch(AttentionProcessor):
    name, patch_point = "branch", CROSS_ATTENTION

    def __init__(self, gate):
        self.gate = gate

    def parallel_output(self, q, call):
        return self.gate * torch.tanh(q)


class OnlyMiddle(AttentionProcessor):
    name, patch_point = "middle_only", SELF_ATTENTION

    def active(self, call):
        return call.block[0] == "middle"

    def self_attention(self, q, k, v, call):
        return torch.zeros_like(q)


@pytest.fixture
def qkv():
    torch.manual_seed(0)
    return torch.randn(4, 6, C), torch.randn(4, 5, C), torch.randn(4, 5, C)


def test_no_processor_is_exactly_the_base_attention(qkv):
    q, k, v = qkv
    for chain in (None, ProcessorChain()):
        out = AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(chain))
        assert torch.equal(out, plain(q, k, v))


def test_inactive_processor_is_exactly_the_base_attention(qkv):
    q, k, v = qkv
    dispatcher = AttentionDispatcher(SELF_ATTENTION, plain)
    chain = ProcessorChain().with_processor(OnlyMiddle())
    assert torch.equal(dispatcher(q, k, v, options(chain, block=("input", 1))), plain(q, k, v))
    assert torch.equal(dispatcher(q, k, v, options(chain, block=("middle", 0))), torch.zeros_like(q))


def test_joint_tokens_equal_explicit_concatenation(qkv):
    q, k, v = qkv
    k_extra, v_extra = torch.randn(1, 3, C), torch.randn(1, 3, C)
    chain = ProcessorChain().with_processor(JointTokens(k_extra, v_extra))
    out = AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(chain))
    expected, _ = explicit_attention(q, torch.cat([k, k_extra.expand(4, -1, -1)], 1), torch.cat([v, v_extra.expand(4, -1, -1)], 1))
    assert (out - expected).abs().max() <= 1e-5


class OwnQueryKeys(AttentionProcessor):
    """Extra keys scored by their own queries (PVA-like): projected from ``inputs`` or given, biased, some rows."""
    name, patch_point = "own_queries", CROSS_ATTENTION

    def __init__(self, keys, values, weight, bias, inputs, projected, rows, logit_bias):
        self.keys, self.values, self.weight, self.bias, self.inputs = keys, values, weight, bias, inputs
        self.projected, self.rows, self.logit_bias = projected, rows, logit_bias

    def extra_key_values(self, q, call):
        queries = ProjectedQueries(self.inputs, self.weight, self.bias)
        return JointKeys(self.keys, self.values, queries if self.projected else queries.project(), self.rows,
                         self.logit_bias)


def own_query_processor(projected=True, rows=None, logit_bias=0.0, extra=3, inputs_dim=5, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    return OwnQueryKeys(*(t.to(dtype) for t in (
        torch.randn(4, extra, C, generator=gen), torch.randn(4, extra, C, generator=gen),
        torch.randn(C, inputs_dim, generator=gen), torch.randn(C, generator=gen),
        torch.randn(4, 6, inputs_dim, generator=gen))), projected, rows, logit_bias)


def explicit_joint_attention(q, k, v, p):
    """One row and head at a time: [q kᵀ, q' k'ᵀ + bias] / √d in one softmax, q' = inputs Wᵀ + b."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        sees = p.rows is None or bool(p.rows[b])
        for h in range(HEADS):
            cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
            scores, values = [q[b, :, cols] @ k[b, :, cols].T / DIM_HEAD ** 0.5], [v[b, :, cols]]
            if sees:
                own = p.inputs[b] @ p.weight[cols].T + p.bias[cols]
                scores.append(own @ p.keys[b, :, cols].T / DIM_HEAD ** 0.5 + p.logit_bias)
                values.append(p.values[b, :, cols])
            out[b, :, cols] = torch.cat(scores, dim=1).softmax(dim=1) @ torch.cat(values, dim=0)
    return out


def always_exact(attention_fn, options):
    return True


#: the two exact formulations of a joint softmax: without an exact-attention check the extra keys widen the heads
#: of one call of the attention function; with one they join the plain call's output by its log-sum-exp
FORMULATIONS = {"widened heads": None, "merged by log-sum-exp": always_exact}


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("projected", [True, False])
@pytest.mark.parametrize("rows", [None, [True, False, True, False], [False, False, True, True], [False] * 4])
@pytest.mark.parametrize("logit_bias", [0.0, -0.9])
def test_keys_with_own_queries_equal_explicit_per_head_softmax(qkv, formulation, projected, rows, logit_bias):
    q, k, v = qkv
    processor = own_query_processor(projected, None if rows is None else torch.tensor(rows), logit_bias)
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, plain, is_exact_attention=FORMULATIONS[formulation])
    out = dispatcher(q, k, v, options(ProcessorChain().with_processor(processor)))
    assert (out - explicit_joint_attention(q, k, v, processor)).abs().max() <= 1e-5


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("logit_bias", [80.0, -80.0])
def test_keys_with_own_queries_stay_exact_at_logits_past_float32_exponent_range(qkv, formulation, logit_bias):
    """e^90 overflows float32: both formulations must shift by the largest logit, as a softmax does."""
    q, k, v = qkv
    q = q * 30  # text logits in the tens to hundreds
    processor = own_query_processor(logit_bias=logit_bias)
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, plain, is_exact_attention=FORMULATIONS[formulation])
    out = dispatcher(q, k, v, options(ProcessorChain().with_processor(processor)))
    expected = explicit_joint_attention(q.double(), k.double(), v.double(), own_query_processor(logit_bias=logit_bias,
                                                                                                 dtype=torch.double))
    assert torch.isfinite(out).all()
    assert (out.double() - expected).abs().max() <= 1e-4


def test_merged_formulation_calls_no_widened_attention_and_keeps_widening_where_gradients_flow(qkv):
    """The merged formulation is exact only in value: torch does not differentiate the kernel's log-sum-exp, so
    with a gradient to compute the dispatcher widens the heads of one attention call instead."""
    q, k, v = qkv
    widths = []

    def recording(q_, k_, v_, heads, **kwargs):
        widths.append(q_.shape[-1] // heads)
        return plain(q_, k_, v_, heads, **kwargs)

    processor = own_query_processor(rows=torch.tensor([False, True, False, True]))
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, recording, is_exact_attention=always_exact)
    with torch.no_grad():
        dispatcher(q, k, v, options(ProcessorChain().with_processor(processor)))
    assert widths == [DIM_HEAD]  # only the rows without the extra keys: plainly

    widths.clear()
    q_grad = q.clone().requires_grad_()
    out = dispatcher(q_grad, k, v, options(ProcessorChain().with_processor(processor)))
    assert sorted(widths) == [DIM_HEAD, 8]  # 4 + 3 extra logits rounded up to a multiple of 8
    q_ref = q.clone().requires_grad_()
    weights = torch.randn_like(q)
    (out * weights).sum().backward()
    (explicit_joint_attention(q_ref, k, v, processor) * weights).sum().backward()
    assert (q_grad.grad - q_ref.grad).abs().max() <= 1e-5

    widths.clear()  # only the extra keys are trained (PVA's projections before any trainable layer)
    trained = own_query_processor(rows=torch.tensor([False, True, False, True]))
    trained.keys.requires_grad_()
    out = dispatcher(q, k, v, options(ProcessorChain().with_processor(trained)))
    assert sorted(widths) == [DIM_HEAD, 8]
    (out * weights).sum().backward()
    reference = own_query_processor(rows=torch.tensor([False, True, False, True]))
    reference.keys.requires_grad_()
    (explicit_joint_attention(q, k, v, reference) * weights).sum().backward()
    assert (trained.keys.grad - reference.keys.grad).abs().max() <= 1e-5


def test_sdpa_with_logsumexp_returns_the_attention_and_each_querys_log_normaliser(qkv):
    q, k, v = qkv
    with torch.no_grad():
        out, logsumexp = sdpa_with_logsumexp(q, k, v, HEADS)
    expected, _ = explicit_attention(q, k, v)
    qh, kh = (t.view(t.shape[0], t.shape[1], HEADS, DIM_HEAD).transpose(1, 2) for t in (q, k))
    assert (out - expected).abs().max() <= 1e-6
    assert (logsumexp - (qh @ kh.transpose(-1, -2) / DIM_HEAD ** 0.5).logsumexp(-1)).abs().max() <= 1e-5
    assert sdpa_with_logsumexp(q.clone().requires_grad_(), k, v, HEADS) is None


def test_keys_with_own_queries_take_one_fused_call_per_row_group(qkv):
    """No logits materialised: rows without the keys get the plain call, the others one widened call."""
    q, k, v = qkv
    calls = []

    def recording(q_, k_, v_, heads, **kwargs):
        calls.append((q_.shape[0], q_.shape[-1] // heads, k_.shape[1]))
        return plain(q_, k_, v_, heads, **kwargs)

    processor = own_query_processor(rows=torch.tensor([False, True, False, True]), extra=7)
    shared = JointTokens(torch.randn(1, 2, C), torch.randn(1, 2, C))
    chain = ProcessorChain().with_processor(processor).with_processor(shared)
    out = AttentionDispatcher(CROSS_ATTENTION, recording)(q, k, v, options(chain))
    keys = torch.cat([k, shared.k_extra.expand(4, -1, -1)], 1)
    values = torch.cat([v, shared.v_extra.expand(4, -1, -1)], 1)
    assert (out - explicit_joint_attention(q, keys, values, processor)).abs().max() <= 1e-5
    # widened heads: 4 + 7 rounded up to a multiple of 8; the shared extra keys join the text keys
    assert sorted(calls) == [(2, DIM_HEAD, 7), (2, 16, 14)]


def test_keys_with_own_queries_and_a_probability_reader_use_the_materialised_softmax(qkv):
    q, k, v = qkv
    recorder = Recorder()
    processor = own_query_processor(rows=torch.tensor([True, False, True, False]), logit_bias=0.5)
    chain = ProcessorChain().with_processor(processor).with_processor(recorder)
    out = AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(chain))
    assert (out - explicit_joint_attention(q, k, v, processor)).abs().max() <= 1e-5
    probs = recorder.seen[0]  # head mean over the 5 text + 3 extra keys; rows 1 and 3 give the extra keys 0
    assert probs.shape == (4, 6, 8) and (probs.sum(-1) - 1).abs().max() <= 1e-6
    assert probs[1::2, :, 5:].abs().max() == 0 and probs[::2, :, 5:].min() > 0


def test_logit_edit_and_map_reading_use_the_materialised_softmax(qkv):
    q, k, v = qkv
    recorder = Recorder()
    chain = ProcessorChain().with_processor(DampFirstToken()).with_processor(recorder)
    out = AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(chain))

    def damp(logits):
        logits = logits.clone()
        logits[..., 0] -= 2.0
        return logits
    expected, probs = explicit_attention(q, k, v, damp)
    assert (out - expected).abs().max() <= 1e-5
    assert (recorder.seen[0] - probs.mean(dim=1)).abs().max() <= 1e-6


def test_gated_parallel_output_is_added(qkv):
    q, k, v = qkv
    chain = ProcessorChain().with_processor(GatedBranch(0.5))
    out = AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(chain))
    assert (out - (plain(q, k, v) + 0.5 * torch.tanh(q))).abs().max() <= 1e-6


def test_foreign_replace_is_wrapped_and_composes_with_additive_processors(qkv):
    q, k, v = qkv
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return plain(q, k, v) * 2.0

    dispatcher = install_dispatcher(foreign, CROSS_ATTENTION, plain)
    assert install_dispatcher(dispatcher, CROSS_ATTENTION, plain) is dispatcher
    assert torch.equal(dispatcher(q, k, v, options()), foreign(q, k, v, options()))
    chain = ProcessorChain().with_processor(GatedBranch(1.0))
    out = dispatcher(q, k, v, options(chain))
    assert (out - (plain(q, k, v) * 2.0 + torch.tanh(q))).abs().max() <= 1e-6
    assert calls


def test_foreign_replace_with_softmax_edit_is_a_clear_error(qkv):
    q, k, v = qkv

    def foreign(q, k, v, extra_options):
        return plain(q, k, v)

    dispatcher = install_dispatcher(foreign, CROSS_ATTENTION, plain)
    with pytest.raises(AttentionConflictError, match="another node pack's attention patch"):
        dispatcher(q, k, v, options(ProcessorChain().with_processor(DampFirstToken())))


def test_two_self_attention_owners_conflict(qkv):
    q, k, v = qkv

    class Other(OnlyMiddle):
        name = "other"
        node_name = "OtherNode"

    chain = ProcessorChain().with_processor(OnlyMiddle()).with_processor(Other())
    with pytest.raises(AttentionConflictError, match="OtherNode"):
        AttentionDispatcher(SELF_ATTENTION, plain)(q, k, v, options(chain, block=("middle", 0)))


def test_chain_replaces_same_technique_and_survives_deepcopy():
    first, second = OnlyMiddle(), OnlyMiddle()
    chain = ProcessorChain().with_processor(first).with_processor(GatedBranch(1.0)).with_processor(second)
    assert chain.at(SELF_ATTENTION) == (second,)
    assert len(chain.processors) == 2
    assert copy.deepcopy({"c": chain})["c"] is chain


def test_uneven_chunks_are_rejected(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="3 equal cond/uncond chunks"):
        AttentionDispatcher(CROSS_ATTENTION, plain)(q, k, v, options(ProcessorChain(), cond_or_uncond=(0, 1, 0)))


def image_attention(out, q, k, v, extra_options, weight=1.0, image_tokens=None, **_):
    """An IPAdapter-style callback: attention of the layer's queries to its own image tokens."""
    keys = image_tokens.expand(q.shape[0], -1, -1)
    return weight * plain(q, keys, keys)


@pytest.fixture
def image_kwargs():
    return {"weight": 0.7, "image_tokens": torch.randn(1, 3, C, generator=torch.Generator().manual_seed(3)),
            "sigma_start": 10.0, "sigma_end": 1.0}


def test_additive_protocol_callbacks_are_added_in_their_sigma_range(qkv, image_kwargs):
    q, k, v = qkv
    dispatcher = install_dispatcher(None, CROSS_ATTENTION, plain)
    dispatcher.add(image_attention, **image_kwargs)
    image = image_attention(None, q, k, v, {}, **image_kwargs)
    assert (dispatcher(q, k, v, options(sigma=5.0)) - (plain(q, k, v) + image)).abs().max() <= 1e-6
    assert torch.equal(dispatcher(q, k, v, options(sigma=0.5)), plain(q, k, v))
    expected, _ = explicit_attention(q, k, v, lambda logits: DampFirstToken().edit_logits(logits, None))
    out = dispatcher(q, k, v, options(ProcessorChain().with_processor(DampFirstToken())))
    assert (out - (expected + image)).abs().max() <= 1e-5


def test_additive_replace_installed_first_is_adopted_so_both_orders_agree(qkv, image_kwargs):
    q, k, v = qkv
    chain = ProcessorChain().with_processor(DampFirstToken())
    foreign_first = install_dispatcher(AdditiveAttn2Replace(plain, image_attention, **image_kwargs), CROSS_ATTENTION, plain)
    assert foreign_first.inner is None
    ours_first = install_dispatcher(None, CROSS_ATTENTION, plain)
    ours_first.add(image_attention, **image_kwargs)
    assert torch.equal(foreign_first(q, k, v, options(chain)), ours_first(q, k, v, options(chain)))
    theirs = AdditiveAttn2Replace(plain, image_attention, **image_kwargs)
    assert (foreign_first(q, k, v, options()) - theirs(q, k, v, options())).abs().max() <= 1e-6


def test_callbacks_added_to_a_clone_stay_with_the_clone(qkv, image_kwargs):
    q, k, v = qkv
    original = install_dispatcher(None, CROSS_ATTENTION, plain)
    copy.deepcopy({"replace": original})["replace"].add(image_attention, **image_kwargs)
    assert original.added == []
    assert torch.equal(original(q, k, v, options()), plain(q, k, v))


def test_blocks_whose_dispatcher_was_overwritten_are_found():
    key = ("input", 1, 0)
    chain = ProcessorChain().with_processor(DampFirstToken(), [(CROSS_ATTENTION, key)])

    def foreign(q, k, v, extra_options):
        return plain(q, k, v)

    ours = {CHAIN_KEY: chain, "patches_replace": {CROSS_ATTENTION: {key: install_dispatcher(None, CROSS_ATTENTION, plain)}}}
    assert list(overwritten_dispatchers(ours)) == []
    theirs = {CHAIN_KEY: chain, "patches_replace": {CROSS_ATTENTION: {key: foreign}}}
    assert list(overwritten_dispatchers(theirs)) == [(CROSS_ATTENTION, key, foreign)]
    assert list(overwritten_dispatchers({CHAIN_KEY: chain})) == [(CROSS_ATTENTION, key, None)]


def test_keys_with_own_queries_keep_the_accuracy_of_plain_attention_in_bfloat16():
    """The extra logits ride in the widened queries in the attention dtype: bf16 costs no more accuracy
    than plain bf16 attention does."""
    heads, dim_head, extra, batch = 2, 32, 10, 2
    channels = heads * dim_head
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, n, channels, generator=gen) for n in (64, 77, 77))
    p = OwnQueryKeys(torch.randn(batch, extra, channels, generator=gen), torch.randn(batch, extra, channels, generator=gen),
                     torch.randn(channels, 48, generator=gen) * 0.2, torch.zeros(channels),
                     torch.randn(batch, 64, 48, generator=gen), True, None, -0.3)

    def dispatched(dtype):
        chain = ProcessorChain().with_processor(OwnQueryKeys(p.keys.to(dtype), p.values.to(dtype), p.weight.to(dtype),
                                                             p.bias.to(dtype), p.inputs.to(dtype), True, None, -0.3))
        opts = dict(options(chain, cond_or_uncond=(0,)), n_heads=heads, dim_head=dim_head)
        return AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)(q.to(dtype), k.to(dtype), v.to(dtype), opts).float()

    def own_heads(t):
        return t.unflatten(-1, (heads, dim_head)).transpose(1, 2)
    own = own_heads(p.inputs @ p.weight.T)
    logits = torch.cat([own_heads(q) @ own_heads(k).transpose(-1, -2),
                        own @ own_heads(p.keys).transpose(-1, -2) + p.logit_bias * dim_head ** 0.5], -1) / dim_head ** 0.5
    expected = (logits.softmax(-1) @ torch.cat([own_heads(v), own_heads(p.values)], 2)).transpose(1, 2).flatten(2)
    assert (dispatched(torch.float32) - expected).abs().max() <= 1e-5
    plain_error = (sdpa_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), heads).float()
                   - sdpa_attention(q, k, v, heads)).abs().max()
    assert (dispatched(torch.bfloat16) - expected).abs().max() <= 3 * plain_error
