"""StyleAligned processor vs. a slow, obvious formulation of the paper's equations (spec §2)."""
import math

import pytest
import torch

from personalization_nodes.attention.sdpa import sdpa_attention
from personalization_nodes.attention.style_aligned import StyleAlignedSettings, shared_self_attention

HEADS, DIM_HEAD, TOKENS = 2, 8, 12


def slow_adain(x, ref, eps=1e-5):
    """x, ref: (N tokens, C channels); statistics per channel over tokens, unbiased variance."""
    n = x.shape[0]
    mu_x = x.sum(0) / n
    mu_r = ref.sum(0) / n
    sd_x = (((x - mu_x) ** 2).sum(0) / (n - 1) + eps).sqrt()
    sd_r = (((ref - mu_r) ** 2).sum(0) / (n - 1) + eps).sqrt()
    return (x - mu_x) / sd_x * sd_r + mu_r


def slow_attention_rows(q, keys, values, bias):
    """q: (N, C); keys/values: (M, C); bias: (M,) added to every row of logits; heads handled one by one."""
    out = torch.zeros_like(q)
    for h in range(HEADS):
        sl = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
        logits = q[:, sl] @ keys[:, sl].T / math.sqrt(DIM_HEAD) + bias
        out[:, sl] = torch.softmax(logits, dim=-1) @ values[:, sl]
    return out


def slow_style_aligned(q, k, v, n_chunks, s: StyleAlignedSettings):
    """Paper/official formulation: every image i of a chunk (reference included) attends to
    [AdaIN(k_i); scale·AdaIN(k_ref)] with shift on the reference half (scale is 1 for the reference row)."""
    batch = q.shape[0] // n_chunks
    out = torch.zeros_like(q)
    for c in range(n_chunks):
        r = c * batch
        for j in range(batch):
            i = r + j
            if s.full_attention_share:
                keys = torch.cat([k[r + m] for m in range(batch)])
                values = torch.cat([v[r + m] for m in range(batch)])
                out[i] = slow_attention_rows(q[i], keys, values, torch.zeros(keys.shape[0]))
                continue
            qi = slow_adain(q[i], q[r]) if s.adain_queries else q[i]
            ki = slow_adain(k[i], k[r]) if s.adain_keys else k[i]
            kr = slow_adain(k[r], k[r]) if s.adain_keys else k[r]
            vi = slow_adain(v[i], v[r]) if s.adain_values else v[i]
            vr = slow_adain(v[r], v[r]) if s.adain_values else v[r]
            scale = 1.0 if j == 0 else s.score_scale
            keys = torch.cat([ki, scale * kr])
            values = torch.cat([vi, vr])
            bias = torch.cat([torch.zeros(TOKENS), torch.full((TOKENS,), s.score_shift)])
            out[i] = slow_attention_rows(qi, keys, values, bias) if batch > 1 else slow_attention_rows(q[i], k[i], v[i], torch.zeros(TOKENS))
    return out


def attention(q, k, v, mask=None):
    return sdpa_attention(q, k, v, HEADS, mask=mask)


SETTINGS = {
    "paper_default": StyleAlignedSettings(),
    "transfer_shift_ln2": StyleAlignedSettings(score_shift=math.log(2.0)),
    "weakened_reference": StyleAlignedSettings(score_scale=0.5, score_shift=-0.3),
    "adain_values": StyleAlignedSettings(adain_values=True),
    "no_adain": StyleAlignedSettings(adain_queries=False, adain_keys=False),
    "full_attention_share": StyleAlignedSettings(full_attention_share=True),
}
# cond only (cfg=1), uncond only (split passes), [cond, uncond], [uncond, cond], three chunks (area conds)
LAYOUTS = {"cond": 1, "uncond": 1, "cond_uncond": 2, "uncond_cond": 2, "three": 3}


@pytest.mark.parametrize("settings_name", SETTINGS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
def test_processor_matches_slow_paper_formulation(settings_name, layout, batch):
    torch.manual_seed(batch * 31 + len(layout))
    n_chunks = LAYOUTS[layout]
    shape = (n_chunks * batch, TOKENS, HEADS * DIM_HEAD)
    # offsets and scales per sample make AdaIN do real work
    q, k, v = (torch.randn(shape) * torch.rand(shape[0], 1, 1) * 3 + torch.randn(shape[0], 1, shape[2]) for _ in range(3))
    settings = SETTINGS[settings_name]
    ours = shared_self_attention(q, k, v, n_chunks, settings, attention)
    expected = slow_style_aligned(q, k, v, n_chunks, settings)
    assert ours.shape == q.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def test_reference_rows_are_plain_attention_bitwise():
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, TOKENS, HEADS * DIM_HEAD) for _ in range(3))
    out = shared_self_attention(q, k, v, 2, StyleAlignedSettings(score_shift=0.7, score_scale=0.5), attention)
    for row in (0, 3):
        plain = attention(q[row:row + 1], k[row:row + 1], v[row:row + 1])
        assert torch.equal(out[row:row + 1], plain)


def test_targets_change_and_follow_reference_statistics():
    """What the targets attend with: their queries and own keys carry the reference's per-channel token
    mean and standard deviation (computed here from the definition), their shared keys and values are the
    reference's own, their values are untouched (adain_values off); the reference attends as plain."""
    torch.manual_seed(1)
    shape = (3, TOKENS, HEADS * DIM_HEAD)
    # each image its own per-channel offsets and scales, far from the reference's
    q, k, v = (torch.randn(shape) * (1 + 3 * torch.rand(3, 1, shape[2])) + 4 * torch.randn(3, 1, shape[2])
               for _ in range(3))
    calls = []

    def recording_attention(q_, k_, v_, mask=None):
        calls.append((q_, k_, v_))
        return attention(q_, k_, v_, mask=mask)

    out = shared_self_attention(q, k, v, 1, StyleAlignedSettings(), recording_attention)

    def statistics(x):  # per channel over the tokens: mean and unbiased standard deviation
        n = x.shape[0]
        mean = x.sum(0) / n
        return mean, (((x - mean) ** 2).sum(0) / (n - 1)).sqrt()

    (ref_q, ref_k, ref_v), (tgt_q, tgt_k, tgt_v) = calls
    assert torch.equal(ref_q, q[:1]) and torch.equal(ref_k, k[:1]) and torch.equal(ref_v, v[:1])
    assert tgt_q.shape == (2, TOKENS, shape[2]) and tgt_k.shape == tgt_v.shape == (2, 2 * TOKENS, shape[2])
    q_mean, q_std = statistics(q[0])
    k_mean, k_std = statistics(k[0])
    for target in range(2):
        for ours, (mean, std) in ((tgt_q[target], (q_mean, q_std)), (tgt_k[target, :TOKENS], (k_mean, k_std))):
            got_mean, got_std = statistics(ours)
            torch.testing.assert_close(got_mean, mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got_std, std, rtol=1e-4, atol=1e-4)
        image = target + 1
        assert not torch.allclose(statistics(q[image])[0], q_mean, atol=0.5), "the target's own statistics differed"
        assert torch.equal(tgt_k[target, TOKENS:], k[0]) and torch.equal(tgt_v[target, TOKENS:], v[0])
        assert torch.equal(tgt_v[target, :TOKENS], v[image])
    assert torch.equal(out[:1], attention(q[:1], k[:1], v[:1]))
    assert not torch.allclose(out[1:], attention(q, k, v)[1:], atol=1e-3)


def test_batch_that_does_not_split_into_chunks_is_rejected():
    q = torch.randn(3, TOKENS, HEADS * DIM_HEAD)
    with pytest.raises(ValueError, match="cannot be split into 2"):
        shared_self_attention(q, q, q, 2, StyleAlignedSettings(), attention)
