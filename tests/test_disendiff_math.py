"""DisenDiff maps and losses vs a slow, obvious formulation of the spec (§3.2 steps 5–8)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from personalization_nodes.attention import disendiff, token_maps
from personalization_nodes.attention.custom_diffusion import StartTokenDetach
from personalization_nodes.attention.blocks import UNET, TransformerBlock
from personalization_nodes.attention.dispatcher import AttentionCall
from personalization_nodes.training import disendiff as recipe


def slow_gaussian_smooth(m, padding="reflect"):
    """Pad by 1 (reflect, or replicate), then the 3×3 Attend-and-Excite kernel with exponent ((x−μ)/(2σ))², σ 0.5."""
    g = [math.exp(-(((x - 1) / (2 * 0.5)) ** 2)) for x in range(3)]
    kernel = [[g[i] * g[j] for j in range(3)] for i in range(3)]
    total = sum(sum(r) for r in kernel)
    h, w = m.shape

    def at(y, x):
        if padding == "replicate":
            return m[min(max(y, 0), h - 1), min(max(x, 0), w - 1)]
        y = -y if y < 0 else (2 * (h - 1) - y if y >= h else y)
        x = -x if x < 0 else (2 * (w - 1) - x if x >= w else x)
        return m[y, x]
    out = torch.zeros_like(m)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(kernel[i][j] * at(y + i - 1, x + j - 1) for i in range(3) for j in range(3)) / total
    return out


def slow_process(m, square, padding="reflect"):
    m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    m = slow_gaussian_smooth(m, padding)
    return m * m if square else m


def slow_iou(a, b):
    inter = (a * b).sum()
    return (inter + 1) / (a.sum() + b.sum() - inter + 1)


def slow_loss(mods, classes):
    s = mods.shape[0]
    m = [slow_process(mods[i], False) for i in range(s)]
    c = [slow_process(classes[i], True) for i in range(s)]
    bind = sum(1 - slow_iou(c[i], m[i]) for i in range(s))
    pairs = [(j, i) for i in range(s) for j in range(i + 1, s)]
    return bind + sum(slow_iou(c[j], c[i]) for j, i in pairs) / len(pairs)


def test_kernel_values_from_the_spec():
    k = disendiff.gaussian_kernel()
    assert torch.allclose(k[0, 0], torch.tensor(0.0449), atol=1e-4)
    assert torch.allclose(k[0, 1], torch.tensor(0.1221), atol=1e-4)
    assert torch.allclose(k[1, 1], torch.tensor(0.3319), atol=1e-4)


@pytest.mark.parametrize("concepts", [2, 3])
def test_calibration_loss_matches_slow_reference(concepts):
    gen = torch.Generator().manual_seed(concepts)
    mods, classes = torch.rand(2, concepts, 6, 6, generator=gen), torch.rand(2, concepts, 6, 6, generator=gen)
    fast = disendiff.calibration_loss(mods, classes)
    for b in range(2):
        assert torch.allclose(fast[b], slow_loss(mods[b], classes[b]), atol=1e-5)


def slow_softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def slow_calibrated_logits(logits, cond_rows, concepts, strength, height, width, prompt_length, text_tokens):
    """CalibratedCrossAttn as its docs state it, one row, head, query and key at a time: P the softmax of a
    head's logits over all keys; the class map of concept i is the head mean of P on its class word's keys
    (every repeat of the prompt among the text keys), min-max normalised, Gaussian smoothed and squared
    like training's class maps; a modifier key gains strength·(2Ĉ_i − 1), and concept i's modifier and
    class keys lose strength·relu(Ĉ_j − Ĉ_i) for every other concept j. Uncond rows are left alone."""
    rows, heads, queries, n_keys = logits.shape
    repeats = text_tokens // prompt_length

    def keys_of(positions):
        return [p + r * prompt_length for r in range(repeats) for p in positions]
    out = logits.clone().double()
    for b in cond_rows:
        mean = [[0.0] * n_keys for _ in range(queries)]
        for head in range(heads):
            for q in range(queries):
                for k, p in enumerate(slow_softmax(logits[b, head, q].tolist())):
                    mean[q][k] += p / heads
        maps = []
        for modifier, word in concepts:
            raw = [sum(mean[q][k] for k in keys_of(word)) / len(keys_of(word)) for q in range(queries)]
            maps.append(slow_process(torch.tensor(raw, dtype=torch.float64).view(height, width), True).flatten())
        for head in range(heads):
            for q in range(queries):
                for k in range(n_keys):
                    delta = 0.0
                    for i, (modifier, word) in enumerate(concepts):
                        if k in keys_of(modifier):
                            delta += strength * (2 * float(maps[i][q]) - 1)
                        for j in range(len(concepts)):
                            if j != i and k in keys_of(modifier) + keys_of(word):
                                delta -= strength * max(float(maps[j][q]) - float(maps[i][q]), 0.0)
                    out[b, head, q, k] += delta
    return out


def calibration_call(cond_or_uncond, text_tokens, height, width, text_keys=None):
    """A U-Net attn2 call as the dispatcher hands it to the processor: ``text_keys`` text keys (default
    ``text_tokens``) in front of the logits' other keys, queries on the layer's height x width map."""
    options = {"activations_shape": [4, 8, height, width], "cond_or_uncond": list(cond_or_uncond)}
    if text_tokens is not None:
        options[disendiff.CONTEXT_TOKENS_KEY] = text_tokens
    call = AttentionCall(options, None, batch=2 * len(cond_or_uncond), heads=2, dim_head=4, block=("input", 1, 0))
    call.text_keys = slice(0, text_keys if text_keys is not None else text_tokens or 0)
    return call


CONCEPTS = {2: (((1,), (2,)), ((4,), (5, 6))), 3: (((1,), (2,)), ((3,), (4, 5)), ((6,), (7,)))}


@pytest.mark.parametrize("concepts", [2, 3])
@pytest.mark.parametrize("repeats", [1, 2])
def test_calibrated_logits_match_the_written_out_formula(concepts, repeats):
    """Cond rows of a call with uncond rows first; the prompt (8 tokens) repeated ``repeats`` times as ComfyUI
    pads a cond to a longer negative; two more keys after the text (another technique's joint keys)."""
    prompt_length, height, width = 8, 3, 4
    text_tokens = prompt_length * repeats
    pairs = CONCEPTS[concepts]
    processor = disendiff.CalibratedCrossAttention(tuple(disendiff.Concept(m, w) for m, w in pairs), 1.5,
                                                   float("inf"), 0.0, prompt_length)
    logits = 2 * torch.randn(4, 2, height * width, text_tokens + 2, generator=torch.Generator().manual_seed(concepts))
    edited = processor.edit_logits(logits, calibration_call((1, 0), text_tokens, height, width))
    expected = slow_calibrated_logits(logits, [2, 3], pairs, 1.5, height, width, prompt_length, text_tokens)
    assert torch.equal(edited[:2], logits[:2]), "uncond rows are left alone"
    assert (edited.double() - expected).abs().max() <= 1e-5
    assert (edited[2:] - logits[2:]).abs().max() > 0.1


def test_calibration_refuses_calls_that_cannot_hold_its_tokens():
    """Positions beyond the text of the call were skipped silently; they are an error naming the node."""
    processor = disendiff.CalibratedCrossAttention((disendiff.Concept((1,), (2,)), disendiff.Concept((4,), (5,))),
                                                   1.0, float("inf"), 0.0, prompt_length=8)
    logits = torch.randn(2, 2, 4, 10)
    with pytest.raises(ValueError, match="CalibratedCrossAttn: the concepts sit at tokens up to 5 .* 4 text tokens"):
        processor.edit_logits(logits[..., :4], calibration_call((0, 1), 4, 2, 2))
    with pytest.raises(ValueError, match="CalibratedCrossAttn: .* 12 text tokens among 10 keys"):
        processor.edit_logits(logits, calibration_call((0, 1), 12, 2, 2, text_keys=10))
    with pytest.raises(RuntimeError, match="CalibratedCrossAttn: .*without the length of its text"):
        processor.edit_logits(logits, calibration_call((0, 1), None, 2, 2))
    assert torch.equal(processor.edit_logits(logits, calibration_call((1, 1), None, 2, 2)), logits)  # no cond rows


def test_smoothing_replicates_the_edge_of_a_map_one_pixel_high():
    """Reflection needs two pixels; a 1×w map (a tiny image's deepest layer) is padded by replication."""
    m = torch.rand(1, 5, dtype=torch.float64)
    torch.testing.assert_close(disendiff.smooth(m), slow_gaussian_smooth(m, "replicate"))


def test_binding_sends_no_gradient_through_the_class_map():
    """With one concept pair separated, the class maps get gradient only from the separation term."""
    gen = torch.Generator().manual_seed(5)
    mods = torch.rand(1, 2, 4, 4, generator=gen, requires_grad=True)
    classes = torch.rand(1, 2, 4, 4, generator=gen, requires_grad=True)
    disendiff.calibration_loss(mods, classes).sum().backward()
    only_separation = classes.detach().clone().requires_grad_(True)
    c = disendiff.process_maps(only_separation, suppress=True)
    disendiff.soft_iou(c[:, 1], c[:, 0]).sum().backward()
    assert torch.allclose(classes.grad, only_separation.grad, atol=1e-7)
    assert mods.grad.abs().sum() > 0


def test_map_blocks_are_the_deepest_level_outside_the_middle():
    def block(name, i, channels):
        return TransformerBlock((name, i, 0), f"{name}.{i}", 8, channels // 8, True, UNET)
    sd15 = [block("input", 1, 320), block("input", 4, 640), block("input", 7, 1280), block("input", 8, 1280),
            block("middle", 0, 1280), block("output", 3, 1280), block("output", 6, 640)]
    assert token_maps.map_block_keys(sd15) == {("input", 7, 0), ("input", 8, 0), ("output", 3, 0)}


def test_map_recorder_keeps_head_mean_maps_of_cond_rows_with_their_graph():
    """One recorder for the trainers (every row is cond, maps keep their graph) and the preview (cond
    chunks of a sampling call only)."""
    recorder = token_maps.MapRecorder(frozenset({("input", 7, 0)}))
    probs = torch.rand(4, 2, 6, 3, requires_grad=True)  # (batch, heads, 2x3 queries, tokens)

    def call(block, cond_or_uncond):
        made = AttentionCall({"cond_or_uncond": list(cond_or_uncond)}, None, batch=4, heads=2, dim_head=4, block=block,
                             query_grid=(2, 3))
        made.text_keys = slice(0, 3)
        return made
    assert recorder.active(call(("input", 7, 0), ())) and not recorder.active(call(("input", 1, 0), ()))
    recorder.read_probs(probs, call(("input", 7, 0), ()))
    recorder.read_probs(probs * 3, call(("input", 7, 0), ()))
    expected = torch.stack([probs[b].mean(0).T.reshape(3, 2, 3) for b in range(4)]) * 2  # mean of 1x and 3x
    torch.testing.assert_close(recorder.layer_mean(), expected)
    recorder.layer_mean().sum().backward()
    assert probs.grad.abs().min() > 0
    recorder.maps.clear()
    recorder.read_probs(probs.detach(), call(("input", 7, 0), (1, 0)))  # uncond chunk first, then cond
    torch.testing.assert_close(recorder.layer_mean(), expected[2:] / 2)
    recorder.maps.clear()
    recorder.read_probs(probs.detach(), call(("input", 7, 0), (1, 1)))
    with pytest.raises(RuntimeError, match="no cross-attention maps"):
        recorder.layer_mean()


def test_map_recorder_joins_the_query_rows_of_a_call_served_in_chunks():
    """A DiT's cross view serves the probabilities a few query rows at a time (call.query_rows): the map is
    recorded once, from the chunk with the last row, equal to the map of all rows at once."""
    recorder = token_maps.MapRecorder(frozenset({("input", 7, 0)}))
    probs = torch.rand(4, 2, 6, 3, generator=torch.Generator().manual_seed(2))
    call = AttentionCall({"cond_or_uncond": [1, 0]}, None, batch=4, heads=2, dim_head=4, block=("input", 7, 0),
                         query_grid=(2, 3))
    call.text_keys = slice(0, 3)
    recorder.read_probs(probs, call)
    whole = recorder.layer_mean()
    recorder.maps.clear()
    for rows in (slice(0, 4), slice(4, 5), slice(5, 6)):
        call.query_rows = rows
        recorder.read_probs(probs[:, :, rows], call)
        assert len(recorder.maps) == (1 if rows.stop == 6 else 0)
    assert torch.equal(recorder.layer_mean(), whole)


def test_sot_detach_stops_gradient_of_row_zero_only():
    k = torch.randn(1, 3, 4, requires_grad=True)
    v = torch.randn(1, 3, 4, requires_grad=True)
    k2, v2 = StartTokenDetach().edit_key_values(k, v, None)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    (k2.sum() + v2.sum()).backward()
    assert k.grad[0, 0].abs().sum() == 0 and k.grad[0, 1:].abs().min() == 1
    assert v.grad[0, 0].abs().sum() == 0


def test_token_initialisation_rule():
    assert recipe.init_token_ids(1) == [42170]
    assert recipe.init_token_ids(2) == [47629, 42170]
    assert recipe.init_token_ids(3) == [43514, 47629, 42170]


def test_training_caption():
    assert recipe.training_caption(["a1", "a2"], ["cat", "dog"], "close up ") == \
        "close up photo of a embedding:a1 cat and embedding:a2 dog"


def test_dispatcher_applies_key_value_edits_before_attention():
    from personalization_nodes.attention.dispatcher import CHAIN_KEY, CROSS_ATTENTION, AttentionDispatcher, ProcessorChain
    from personalization_nodes.attention.sdpa import sdpa_attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 8, generator=gen, requires_grad=True) for n in (6, 5, 5))
    options = {"n_heads": 2, "dim_head": 4, CHAIN_KEY: ProcessorChain().with_processor(StartTokenDetach())}
    out = AttentionDispatcher(CROSS_ATTENTION, sdpa_attention)(q, k, v, options)
    assert torch.allclose(out, sdpa_attention(q, k, v, 2), atol=1e-6)
    out.square().sum().backward()
    assert k.grad[:, 0].abs().sum() == 0 and v.grad[:, 0].abs().sum() == 0
    assert k.grad[:, 1:].abs().sum() > 0


def test_step_loss_uses_custom_diffusions_mask_normalisation():
    """Official base loss: Σ_{c,h,w} (ε̂ − ε)²·M / Σ_{h,w} M per sample (M one channel), so the ε error counts
    summed over the latent channels; it sets the balance with the 0.01 calibration term."""
    from personalization_nodes.training.disendiff import DisenDiffSettings, DisenDiffStep, TargetSample
    from personalization_nodes.training.loop import MicroStep, micro_step_generator

    gen = torch.Generator().manual_seed(5)
    latent, eps_hat = torch.randn(4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 1:7] = 1
    seen = {}

    def denoise(x_t, sigma, context, pooled):  # an ε-model predicting eps_hat, as ComfyUI's denoised
        seen.update(x_t=x_t, sigma=sigma)
        return x_t - sigma.view(-1, 1, 1, 1) * eps_hat

    one_view = SimpleNamespace(draw=lambda generator, count: [TargetSample(latent, mask, "")] * count)
    step = DisenDiffStep(targets=one_view, regs=[], encode_target=lambda p: (torch.zeros(1, 77, 8), None, ()),
                         denoise=denoise, recorder=type("R", (), {"maps": []})(), sigmas=torch.linspace(0.1, 10, 1000),
                         kind="eps", settings=DisenDiffSettings(micro_batch=1, attention_weight=0.0))
    loss = step(MicroStep(0, 0, micro_step_generator(1, 0, 0)))
    noise = (seen["x_t"] - latent) / seen["sigma"].view(-1, 1, 1, 1)
    official = (((eps_hat - noise) ** 2) * mask).sum() / mask.sum()
    assert loss.item() == pytest.approx(official.item(), rel=1e-5)


def test_every_target_sample_gets_a_fresh_augmented_view():
    """The official MaskBase draws a new flip, scale and offset for every target sample (about 1,000 in 250
    steps), never a fixed pool (of 16 before): the rescaled views among 80 target samples are more than 16
    and all different, every caption prefix and both flips occur, and the same micro-step generator draws
    the same views again (exact resume)."""
    from personalization_nodes.training.loop import micro_step_generator

    pixels = torch.rand(128, 128, 3, generator=torch.Generator().manual_seed(0))
    pixels[:, :64] *= 0.5  # the left half darker: a mirrored view is told apart by its brightness
    encoded = []

    def encode(batch):  # stands in for the VAE: one latent pixel per 8×8 block
        encoded.append(batch)
        return torch.nn.functional.avg_pool2d(batch.movedim(-1, 1), 8)

    views = recipe.TargetViews(pixels, encode)
    samples = [s for m in range(40) for s in views.draw(micro_step_generator(1, m, 0), 2)]
    images = torch.cat(encoded)
    assert images.shape == (80, 128, 128, 3) and len(samples) == 80
    rescaled = [image.numpy().tobytes() for image, s in zip(images, samples) if s.prefix]
    assert len(rescaled) > 16 and len(set(rescaled)) == len(rescaled)
    assert {s.prefix for s in samples} == set(recipe.PREFIXES)
    unscaled = [image for image, s in zip(images, samples) if s.prefix == "" and s.mask.all()]
    left_darker = {bool(image[:, :64].mean() < image[:, 64:].mean()) for image in unscaled}
    assert left_darker == {True, False}, "both orientations"
    for sample, latent in zip(samples, torch.cat([encode(image[None]) for image in images])):
        assert torch.equal(sample.latent, latent) and sample.mask.shape == (1, 16, 16)
    again = views.draw(micro_step_generator(1, 7, 0), 2)
    for first, second in zip(samples[14:16], again):
        assert torch.equal(first.latent, second.latent) and torch.equal(first.mask, second.mask)
        assert first.prefix == second.prefix
    plain = recipe.TargetViews(pixels, encode, augment=False).draw(micro_step_generator(2, 0, 0), 30)
    assert all(s.prefix == "" and s.mask.all() for s in plain)
    assert {bool(torch.equal(i, pixels)) for i in encoded[-1]} == {True, False}, "without augmentation: flips only"


def test_regularisation_images_are_mirrored_half_of_the_time():
    """MaskBase flips every image, regularisation images included, with p 1/2."""
    from personalization_nodes.training.disendiff import DisenDiffSettings, DisenDiffStep, RegularisationSample
    from personalization_nodes.training.loop import MicroStep, micro_step_generator

    seen = []

    def denoise(x_t, sigma, context, pooled):
        seen.append(x_t.detach())
        return x_t

    from personalization_nodes.training.disendiff import TargetSample

    target = TargetSample(torch.zeros(4, 2, 2), torch.ones(1, 2, 2), "")
    zero_target = SimpleNamespace(draw=lambda generator, count: [target] * count)
    reg = RegularisationSample(torch.ones(4, 2, 2), -torch.ones(4, 2, 2), torch.zeros(1, 77, 8))
    step = DisenDiffStep(targets=zero_target, regs=[reg], encode_target=lambda prefix: (torch.zeros(1, 77, 8), None, ()),
                         denoise=denoise,
                         recorder=SimpleNamespace(maps=[]), sigmas=torch.full((1000,), 1e-4), kind="eps",
                         settings=DisenDiffSettings(micro_batch=2, attention_weight=0.0))
    for m in range(100):
        step(MicroStep(0, m, micro_step_generator(4, 0, m)))
    rows = torch.cat(seen).flatten(1).mean(1)
    regs = rows[rows.abs() > 0.5]  # the targets' rows are ~0
    assert len(regs) > 50 and ((regs.abs() - 1).abs() < 1e-2).all()
    mirrored = float((regs < 0).float().mean())
    assert 0.35 < mirrored < 0.65, mirrored
