"""RealCustom mask guidance math against slow reference formulations written here."""
import pytest
import torch
import torch.nn.functional as F
from personalization_nodes.attention.dispatcher import (
    CROSS_ATTENTION,
    AttentionDispatcher,
    ProcessorChain,
)
from personalization_nodes.attention.realcustom import (
    RUN_KEY,
    ImageBranchWeights,
    ImageTokens,
    MaskedImageBranch,
    MaskGuidanceRun,
    MaskSettings,
    TrainingRun,
    WordMapAccumulator,
    WordMapCapture,
    WordMapReader,
    cascaded_cond,
    keep_top,
    step_index,
    word_scores,
)
from personalization_nodes.attention.sdpa import sdpa_attention

HEADS, DIM_HEAD, TOKENS = 2, 4, 7
C = HEADS * DIM_HEAD
BLOCK = ("input", 1, 0)


def reference_mask(prob_list, indicator, size, strategy, scope, binary, selection="top-k"):
    """The released mask_generation, step by step, on fully materialised probabilities."""
    maps = []
    for probs, (h, w) in prob_list:  # probs: (B, heads, h*w, T)
        crossmap = probs.permute(0, 1, 3, 2).reshape(probs.shape[0], HEADS, TOKENS, h, w)  # b head n h w
        crossmap = crossmap.mean(dim=1)
        crossmap = (crossmap * indicator[None, :, None, None]).sum(dim=1, keepdim=True)
        maps.append(F.interpolate(crossmap, size=size, mode="bilinear"))
    maps = torch.cat(maps, dim=1).flatten(2)  # b layers (h w)
    if strategy == "max_norm":
        avg = maps.mean(dim=1, keepdim=True)
        avg = avg / (avg.flatten(1).max(dim=1).values[:, None, None] + 1e-6)
    elif strategy == "min_max_norm":
        avg = maps.mean(dim=1, keepdim=True)
        lo, hi = avg.flatten(1).min(1).values[:, None, None], avg.flatten(1).max(1).values[:, None, None]
        avg = (avg - lo) / (hi - lo + 1e-6)
    else:
        lo, hi = maps.min(-1, keepdim=True).values, maps.max(-1, keepdim=True).values
        avg = ((maps - lo) / (hi - lo + 1e-6)).mean(dim=1, keepdim=True)
        lo, hi = avg.flatten(1).min(1).values[:, None, None], avg.flatten(1).max(1).values[:, None, None]
        avg = (avg - lo) / (hi - lo + 1e-6)
    if selection == "threshold":
        avg = avg.clone()
        avg[avg < 1 - scope] = 0.0
        if binary:
            avg[avg > 1 - scope] = 1.0
        return avg.view(avg.shape[0], *size)
    order = avg.sort(descending=True, dim=-1).indices
    keep = int(avg.shape[-1] * scope)
    avg = avg.scatter(2, order[:, :, keep:], 0.0)
    if binary:
        avg = avg.scatter(2, order[:, :, :keep], 1.0)
    return avg.view(avg.shape[0], *size)


def word_map(probs, indicator, h, w):
    """The ``(B, 1, h, w)`` map of a layer's probabilities on its query grid."""
    return word_scores(probs, indicator).view(probs.shape[0], 1, h, w)


def random_probs(batch, h, w, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, h * w, DIM_HEAD, generator=gen)
    k = torch.randn(batch, HEADS, TOKENS, DIM_HEAD, generator=gen)
    return (q @ k.transpose(-1, -2) / DIM_HEAD ** 0.5).softmax(-1)


#: (layer map sizes in the order a pass reads them, the largest map's size = the paper's mask grid)
LAYER_LAYOUTS = {
    "SD1.5-like, maps at the latent and half of it": ([(8, 8), (4, 4), (8, 8)], (8, 8)),
    "largest map read last": ([(4, 4), (2, 2), (8, 8)], (8, 8)),
    "non-square, no map at the latent (SDXL-like)": ([(3, 4), (6, 8), (3, 4)], (6, 8)),
}


@pytest.mark.parametrize("strategy", ["max_norm", "min_max_norm", "min_max_per_channel"])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("selection", ["top-k", "threshold"])
@pytest.mark.parametrize("layout", list(LAYER_LAYOUTS))
def test_mask_equals_reference_at_the_largest_maps_size(strategy, binary, selection, layout):
    """Paper §3.3: every layer's map is resized to the largest map's size (64 × 64 on SD1.5 at 512 px)."""
    sizes, grid = LAYER_LAYOUTS[layout]
    indicator = torch.zeros(TOKENS)
    indicator[[2, 3]] = 1.0  # a two-token word
    layers = [(random_probs(3, h, w, seed), (h, w)) for seed, (h, w) in enumerate(sizes)]
    settings = MaskSettings(strategy=strategy, scope=0.3, binary=binary, selection=selection)
    collected = WordMapAccumulator(settings)
    for probs, (h, w) in layers:
        collected.add(word_map(probs, indicator, h, w))
    expected = reference_mask(layers, indicator, grid, strategy, 0.3, binary, selection)
    assert collected.mask().shape == (3, *grid)
    assert (collected.mask() - expected).abs().max() <= 1e-5
    if selection == "threshold":
        assert 0 < int((collected.mask() > 0).sum()) < collected.mask().numel(), "the threshold keeps some, not all"


def test_per_row_words_equal_one_word_per_call():
    """Training reads a different caption's word in every row: ``(B, T)`` indicators."""
    probs = random_probs(3, 4, 4, 5)
    indicators = torch.zeros(3, TOKENS)
    indicators[0, 1], indicators[1, [2, 3]], indicators[2, 6] = 1.0, 1.0, 1.0
    batched = word_map(probs, indicators, 4, 4)
    for row in range(3):
        assert torch.allclose(batched[row:row + 1], word_map(probs[row:row + 1], indicators[row], 4, 4), atol=1e-7)


def test_training_capture_gives_each_row_the_reference_mask_of_its_own_word(qkv):
    """The text-only training pass through the real dispatcher: per-row words, every layer, the released mask."""
    q, k, v = qkv
    indicators = torch.zeros(4, TOKENS)
    for row, tokens in enumerate([[1], [2, 3], [6], [1, 6]]):
        indicators[row, tokens] = 1.0
    capture = WordMapCapture(indicators, MaskSettings())
    chain = ProcessorChain().with_processor(WordMapReader())
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)
    out = dispatcher(q, k, v, call_options(capture, chain, (0,), h=4, w=4))
    assert (out - sdpa_attention(q, k, v, HEADS)).abs().max() <= 1e-5, "capturing leaves the attention output alone"
    probs = (q.view(4, 16, HEADS, DIM_HEAD).transpose(1, 2) @ k.view(4, TOKENS, HEADS, DIM_HEAD).permute(0, 2, 3, 1)
             / DIM_HEAD ** 0.5).softmax(-1)
    for row in range(4):
        expected = reference_mask([(probs[row:row + 1], (4, 4))], indicators[row], (4, 4), "max_norm", 0.25, False)
        assert (capture.mask()[row:row + 1] - expected).abs().max() <= 1e-5
    with pytest.raises(RuntimeError, match="word-map reader"):
        WordMapCapture(indicators, MaskSettings()).mask()


def test_top_ratio_keeps_exactly_that_many_soft_values():
    scores = torch.rand(2, 10, 10)
    kept = keep_top(scores, 0.25, binary=False)
    assert ((kept > 0).flatten(1).sum(1) == 25).all()
    for b in range(2):
        threshold = scores[b].flatten().sort(descending=True).values[24]
        assert torch.equal(kept[b], torch.where(scores[b] >= threshold, scores[b], torch.zeros(())))
    assert set(keep_top(scores, 0.25, binary=True).unique().tolist()) == {0.0, 1.0}


def test_mask_settings_reject_bad_values():
    with pytest.raises(ValueError, match="strategy"):
        MaskSettings(strategy="threshold")
    with pytest.raises(ValueError, match="selection"):
        MaskSettings(selection="top-p")
    with pytest.raises(ValueError, match="scope"):
        MaskSettings(scope=0.0)


def test_step_index_counts_extra_calls_with_their_step():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    assert [step_index(sigmas, s) for s in (10.0, 7.0, 5.0, 2.0, 1.0)] == [0, 0, 1, 2, 2]


# --- the processors through the real dispatcher --------------------------------------------------------

def branch_weights(token_dim=6):
    torch.manual_seed(0)
    weights = ImageBranchWeights({BLOCK: (C, token_dim)})
    for p in weights.parameters():
        torch.nn.init.normal_(p)
    return weights


def make_run(mask=None, text_only=True, tokens=None):
    run = MaskGuidanceRun(MaskSettings(), torch.eye(TOKENS)[3], total_steps=4,
                          update_fraction=1.0, text_only_pass=text_only, tokens=tokens)
    run.mask = mask
    return run


def call_options(run, chain, cond_or_uncond=(0, 1), h=4, w=4):
    return {"n_heads": HEADS, "dim_head": DIM_HEAD, "block": BLOCK[:2], "block_index": BLOCK[2],
            "cond_or_uncond": list(cond_or_uncond), "activations_shape": [1, C, h, w], RUN_KEY: run, "personalization": chain}


@pytest.fixture
def qkv():
    torch.manual_seed(1)
    return torch.randn(4, 16, C), torch.randn(4, TOKENS, C), torch.randn(4, TOKENS, C)


def image_only(q, weights, tokens):
    k, v = weights.project(BLOCK, tokens, q.dtype)
    return sdpa_attention(q, k.expand(q.shape[0], -1, -1), v.expand(q.shape[0], -1, -1), HEADS)


@pytest.mark.parametrize("layout", [(0, 1), (1, 0), (0,), (1,)])
def test_all_ones_mask_equals_ungated_branch_and_zeros_equal_text_only(qkv, layout):
    q, k, v = qkv
    rows = q.shape[0] // len(layout)
    q, k, v = q[: rows * len(layout)], k[: rows * len(layout)], v[: rows * len(layout)]
    weights = branch_weights()
    tokens = ImageTokens(reference=torch.randn(1, 5, 6), negative=torch.randn(1, 5, 6))
    chain = ProcessorChain().with_processor(MaskedImageBranch(weights))
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)
    text = sdpa_attention(q, k, v, HEADS)

    ones = dispatcher(q, k, v, call_options(make_run(torch.ones(rows, 4, 4), tokens=tokens), chain, layout))
    expected = text.clone()
    for i, chunk in enumerate(layout):
        sl = slice(i * rows, (i + 1) * rows)
        expected[sl] += image_only(q[sl], weights, tokens.reference if chunk == 0 else tokens.negative)
    assert (ones - expected).abs().max() <= 1e-5

    zeros = dispatcher(q, k, v, call_options(make_run(torch.zeros(rows, 4, 4), tokens=tokens), chain, layout))
    assert (zeros - text).abs().max() <= 1e-6


def test_mask_gates_per_pixel_and_per_image(qkv):
    q, k, v = qkv
    weights = branch_weights()
    tokens = ImageTokens(reference=torch.randn(1, 5, 6), negative=None)
    chain = ProcessorChain().with_processor(MaskedImageBranch(weights, strength=0.5))
    mask = torch.rand(2, 4, 4)
    out = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)(q, k, v, call_options(make_run(mask, tokens=tokens), chain, (1, 0)))
    expected = sdpa_attention(q, k, v, HEADS)
    expected[2:] += 0.5 * image_only(q[2:], weights, tokens.reference) * mask.flatten(1)[..., None]  # uncond: none
    assert (out - expected).abs().max() <= 1e-5


def test_reader_captures_cond_rows_only(qkv):
    q, k, v = qkv
    run = make_run()
    run.capturing = True
    chain = ProcessorChain().with_processor(WordMapReader())
    out = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)(q, k, v, call_options(run, chain, (1, 0), h=8, w=2))
    assert (out - sdpa_attention(q, k, v, HEADS)).abs().max() <= 1e-5
    run.finish_text_only_pass()
    probs = (q.view(4, 16, HEADS, DIM_HEAD).transpose(1, 2) @ k.view(4, TOKENS, HEADS, DIM_HEAD).permute(0, 2, 3, 1)
             / DIM_HEAD ** 0.5).softmax(-1)
    expected = WordMapAccumulator(MaskSettings())
    expected.add(word_map(probs[2:], torch.eye(TOKENS)[3], 8, 2))
    assert torch.equal(run.mask, expected.mask())


def test_reader_is_inactive_without_capture_so_attention_stays_fused(qkv):
    q, k, v = qkv
    run = make_run()
    chain = ProcessorChain().with_processor(WordMapReader())
    dispatcher = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)
    assert torch.equal(dispatcher(q, k, v, call_options(run, chain)), sdpa_attention(q, k, v, HEADS))
    assert run._pending.empty


def test_fast_schedule_uses_previous_steps_map_and_freezes():
    run = MaskGuidanceRun(MaskSettings(), torch.eye(TOKENS)[3], total_steps=4,
                          update_fraction=0.5, text_only_pass=False, tokens=None)
    first, second = torch.rand(1, 1, 2, 2), torch.rand(1, 1, 2, 2)
    run.start_call(0)
    assert run.needs_text_only_pass(0)
    run._pending.add(first)
    run.finish_text_only_pass()
    assert not run.needs_text_only_pass(0) and run.capture_in_guided_pass(0)
    run.record(0)
    run._pending.add(second)  # captured in step 0's guided pass
    run.start_call(1)
    run.record(1)
    assert not run.capture_in_guided_pass(1)  # update_steps = 2: step 2 reuses step 1's mask
    run.start_call(2)
    run.record(2)
    assert len(run.history) == 3 and torch.equal(run.history[1], run.history[2])
    assert not torch.equal(run.history[0], run.history[1])


def test_text_only_schedule_runs_one_pass_per_updating_step():
    run = MaskGuidanceRun(MaskSettings(), torch.eye(TOKENS)[3], total_steps=4,
                          update_fraction=0.5, text_only_pass=True, tokens=None)
    passes = []
    for step in (0, 0, 1, 2, 3):  # step 0 called twice (a multi-eval sampler)
        run.start_call(step)
        if run.needs_text_only_pass(step):
            passes.append(step)
            run._pending.add(torch.rand(1, 1, 2, 2))
            run.finish_text_only_pass()
        run.record(step)
    assert passes == [0, 1] and len(run.history) == 4


@pytest.mark.parametrize("cfg", [1.0, 3.5, 7.5])
def test_cascaded_cond_makes_comfy_cfg_compute_paper_eq13(cfg):
    gen = torch.Generator().manual_seed(4)
    uncond, text, text_image = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    image_scale = 12.5
    eq13 = uncond + cfg * (text - uncond) + image_scale * (text_image - text)
    comfy_cfg = uncond + cfg * (cascaded_cond(text, text_image, cfg, image_scale) - uncond)
    assert (comfy_cfg - eq13).abs().max() <= 1e-4
    if cfg == 1.0:  # ComfyUI skips the uncond pass at CFG 1: the cond alone must be eq. 13
        assert (cascaded_cond(text, text_image, cfg, image_scale) - eq13).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="CFG scale > 0"):
        cascaded_cond(text, text_image, 0.0, image_scale)


def test_cascaded_schedule_runs_the_text_pass_every_call_and_maps_on_updating_steps():
    run = MaskGuidanceRun(MaskSettings(), torch.eye(TOKENS)[3], total_steps=4,
                          update_fraction=0.5, text_only_pass=False, tokens=None, cascaded=True)
    captured, sigmas = [], {0: 9.0, 1: 5.0, 2: 2.0, 3: 1.0}
    for call, step in enumerate((0, 0, 1, 2, 3)):  # step 0 called twice (a multi-eval sampler)
        run.start_call(step)
        assert run.needs_text_only_pass(step)
        if run.captures_in_text_only_pass(step):
            captured.append(step)
            run._pending.add(torch.rand(1, 1, 2, 2))
        prediction = torch.full((1, 4, 4, 4), float(call))
        run.finish_text_only_pass(sigmas[step] - 0.1 * call, prediction)
        run.record(step)
        assert torch.equal(run.take_text_prediction(sigmas[step] - 0.1 * call), prediction)
    assert captured == [0, 1] and len(run.history) == 4
    with pytest.raises(RuntimeError, match="no text-only prediction"):
        run.take_text_prediction(1.0)
    run.finish_text_only_pass(1.0, prediction)
    with pytest.raises(ValueError, match="one model call per step"):
        run.finish_text_only_pass(1.0, prediction)


def test_context_length_mismatch_is_explained():
    run = make_run()
    assert run.token_indicator(2 * TOKENS).sum() == 2
    with pytest.raises(ValueError, match="same prompt"):
        run.token_indicator(TOKENS + 1)


def test_per_sample_tokens_of_training_equal_separate_calls(qkv):
    """Training gives every row its own reference (B, T, D) through a TrainingRun (paper eq. 4: an all-ones mask)."""
    q, k, v = qkv
    weights = branch_weights()
    references = torch.randn(4, 5, 6)
    run = TrainingRun(ImageTokens(references, None), mask=torch.ones(4, 4, 4))
    chain = ProcessorChain().with_processor(MaskedImageBranch(weights))
    out = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)(q, k, v, call_options(run, chain, (0,)))
    expected = sdpa_attention(q, k, v, HEADS)
    for row in range(4):
        expected[row:row + 1] += image_only(q[row:row + 1], weights, references[row:row + 1])
    assert (out - expected).abs().max() <= 1e-5


# --- adaptive scoring (paper §3.2, not in the released code) -----------------------------------------------

def slow_scoring(module, features, text, latent, alpha, keep):
    """Spec §3 step by step, one sample and one token at a time."""
    out = []
    for b in range(features.shape[0]):
        a_text = torch.stack([module.text_pool(t) for t in text[b]]).squeeze(-1).softmax(0)
        c_text = sum(a * t for a, t in zip(a_text, text[b]))
        z = latent[b].flatten(1).T
        a_vis = torch.stack([module.latent_pool(p) for p in z]).squeeze(-1).softmax(0)
        c_vis = sum(a * p for a, p in zip(a_vis, z))
        s_text = torch.stack([module.text_score(torch.cat([f, c_text])) for f in features[b]]).squeeze(-1)
        s_vis = torch.stack([module.visual_score(torch.cat([f, c_vis])) for f in features[b]]).squeeze(-1)
        s = ((1 - alpha[b]) * s_text + alpha[b] * s_vis).softmax(0)
        count = max(1, round(keep * features.shape[1]))
        kept = sorted(s.argsort(descending=True)[:count].tolist())
        out.append(torch.stack([features[b, i] * (1 + s[i]) for i in kept]))
    return torch.stack(out)


def test_adaptive_scoring_matches_the_spec_step_by_step():
    from personalization_nodes.attention.realcustom_scoring import AdaptiveScoring
    torch.manual_seed(0)
    module = AdaptiveScoring(vision_dim=12, text_dim=8)
    features, text, latent = torch.randn(2, 10, 12), torch.randn(2, 6, 8), torch.randn(2, 4, 3, 3)
    alpha = torch.tensor([0.1, 0.9])
    got = module(features, text, latent, alpha, keep=0.8)
    assert got.shape == (2, 8, 12)
    assert (got - slow_scoring(module, features, text, latent, alpha, 0.8)).abs().max() <= 1e-5
    assert module(features, text, latent, alpha, keep=0.01).shape == (2, 1, 12)


def test_adaptive_scoring_gets_gradients_through_the_weighting():
    from personalization_nodes.attention.realcustom_scoring import AdaptiveScoring
    torch.manual_seed(1)
    module = AdaptiveScoring(vision_dim=12, text_dim=8)
    module(torch.randn(1, 10, 12), torch.randn(1, 6, 8), torch.randn(1, 4, 3, 3), torch.tensor([0.5]), 0.6).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_model_input_is_the_vp_form_of_comfys_noisy_latent():
    from personalization_nodes.attention.realcustom_scoring import alpha_bar, model_input
    x0, eps, sigma = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([0.3, 4.0])
    a = alpha_bar(sigma).view(-1, 1, 1, 1)
    vp = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert (model_input(x0 + sigma.view(-1, 1, 1, 1) * eps, sigma) - vp).abs().max() <= 1e-5
