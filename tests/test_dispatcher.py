"""The attention dispatcher's hooks against explicit formulations, with toy processors."""
import copy

import pytest
import torch

from personalization_nodes.attention.dispatcher import (
    CHAIN_KEY, CROSS_ATTENTION, SELF_ATTENTION, AttentionConflictError, AttentionDispatcher, AttentionProcessor,
    ProcessorChain, install_dispatcher)
from personalization_nodes.attention.sdpa import sdpa_attention

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
