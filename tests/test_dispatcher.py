"""The attention dispatcher's hooks against explicit formulations, with toy processors."""
import copy

import pytest
import torch

from personalization_nodes.attention.dispatcher import (
    CHAIN_KEY, CROSS_ATTENTION, SELF_ATTENTION, AttentionConflictError, AttentionDispatcher, AttentionProcessor,
    ProcessorChain, install_dispatcher, overwritten_dispatchers)
from personalization_nodes.attention.sdpa import sdpa_attention

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
