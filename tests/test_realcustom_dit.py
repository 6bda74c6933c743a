"""AdaptiveMaskGuidance (RealCustom) on the DiT families, through the joint-attention dispatcher (attention/joint.py).

First against a slow written-out formulation of what the dispatcher serves RealCustom on a joint text+image
attention (per sample, per head, per query, explicit softmax): the word map is the head mean of the image
queries' probabilities over the WHOLE joint key set, read on the word's text columns; the image branch is a
softmax of the latent's image queries over the projected reference tokens, gated by the mask and added to the
image rows of the joint output (text rows untouched). Then in the real ComfyUI on the tiny Flux dev and SD3.5
Large of harness.dit with random adapters of their family, sampled by stock KSampler: strength 0 is bit-identical
to unpatched sampling, CFG 1 and CFG > 1 (SD3.5), batch 2, one mask per image and step at the image-token grid and
its preview, both map sources, the cascaded guidance, an adapter with adaptive scoring, a LoRA, a ControlNet,
adapters of another family refused, SD3.5 Medium's image-only attention left alone, and SharedAttentionBatch +
CalibratedCrossAttn + AdaptiveMaskGuidance on one Flux model."""
from __future__ import annotations

import math

import pytest
import torch

from harness import dit
from harness.tensors import relative_change
from personalization_nodes.attention.dispatcher import ProcessorChain
from personalization_nodes.attention import joint
from personalization_nodes.attention.joint import JointAttentionDispatcher
from personalization_nodes.attention.realcustom import (COND, RUN_KEY, ImageBranchWeights, ImageTokens,
                                                        MaskedImageBranch, MaskGuidanceRun, MaskSettings,
                                                        WordMapReader)
from personalization_nodes.attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings
from test_calibrated_cross_attn_dit import (GRID, HEADS, IMAGE, PROMPT_LENGTH, ROWS_PER_CHUNK, comfy_style_attention,
                                            flat, joint_options, qkv, serve_rows_in_chunks,
                                            serve_sampled_rows_one_at_a_time, slow_joint_attention, slow_softmax,
                                            slow_style_aligned_with_edits)

WORD = (2, 4)  # the word's tokens in the 6-token prompt
REFERENCE_TOKENS, TOKEN_DIM = 5, 6
STRENGTH = 0.7


def indicator():
    out = torch.zeros(PROMPT_LENGTH)
    out[list(WORD)] = 1.0
    return out


def branch_weights(block=("double", 0, 0), dim=8, seed=1):
    torch.manual_seed(seed)
    return ImageBranchWeights({block: (HEADS * dim, TOKEN_DIM)}).double().requires_grad_(False)


def image_tokens(negative=True, seed=2):
    gen = torch.Generator().manual_seed(seed)
    reference = torch.randn(1, REFERENCE_TOKENS, TOKEN_DIM, generator=gen, dtype=torch.float64)
    return ImageTokens(reference, torch.randn(1, REFERENCE_TOKENS, TOKEN_DIM, generator=gen, dtype=torch.float64)
                       if negative else None)


def guidance_run(tokens, capturing, injecting, mask=None):
    run = MaskGuidanceRun(MaskSettings(scope=1.0), indicator(), total_steps=2, update_fraction=1.0,
                          text_only_pass=True, tokens=tokens)
    run.capturing, run.injecting, run.mask = capturing, injecting, mask
    return run


def slow_word_maps(q, k, text, registers, rows, repeats):
    """(len(rows), IMAGE) word map per cond sample: for each head and image query of the latent, the explicit
    softmax of q.k/sqrt(d) over ALL joint keys [text | image]; the probabilities on the word's text keys (every
    repeat of the prompt, after the register tokens) summed; the mean over heads."""
    _batch, heads, length, dim = q.shape
    words = [registers + p + r * PROMPT_LENGTH for r in range(repeats) for p in WORD]
    maps = torch.zeros(len(rows), IMAGE, dtype=torch.float64)
    for i, b in enumerate(rows):
        for h in range(heads):
            for n in range(IMAGE):
                logits = [float(q[b, h, text + n] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                probs = slow_softmax(logits)
                maps[i, n] += sum(probs[key] for key in words) / heads
    return maps


def slow_branch(q, text, weights, tokens, mask, chunks, block="double_0_0"):
    """(B, heads, L, d) image branch: zero on text rows; on the latent's image row n of sample b (chunk kind
    COND: the reference's tokens, else the black image's, or nothing without them), per head the explicit softmax
    of q.K_i/sqrt(d) over the projected reference tokens K_i = W_k t, weighted sum of V_i = W_v t, times the mask
    at n's grid position of b's image, times the strength."""
    batch, heads, length, dim = q.shape
    per_chunk = batch // len(chunks)
    w_k, w_v = weights.to_k_vision[block].weight, weights.to_v_vision[block].weight
    out = torch.zeros_like(q)
    for b in range(batch):
        kind = chunks[b // per_chunk]
        source = tokens.reference if kind == COND else tokens.negative
        if source is None:
            continue
        for h in range(heads):
            keys = [w_k[h * dim:(h + 1) * dim] @ t for t in source[0]]
            values = [w_v[h * dim:(h + 1) * dim] @ t for t in source[0]]
            for n in range(IMAGE):
                probs = slow_softmax([float(q[b, h, text + n] @ key) / math.sqrt(dim) for key in keys])
                gate = float(mask[b % per_chunk, n // GRID[1], n % GRID[1]])
                out[b, h, text + n] = STRENGTH * gate * sum(p * value for p, value in zip(probs, values))
    return out


def call_dispatcher(family, q, k, v, options, exact_attention=False):
    """Flux hands (B, heads, L, d) with skip_reshape; SD3 (B, L, heads*d) q/k, (B, L, heads, d) v and asks for
    (B, heads, L, d) back. The output as (B, L, heads*d). ``exact_attention``: the dispatcher takes the attention
    function for exact (as the node glue does ComfyUI's own), so a kernel returning the log-sum-exp may stand in."""
    dispatcher = JointAttentionDispatcher(is_exact_attention=(lambda fn, opts: True) if exact_attention else None)
    if family == "flux":
        return dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True, transformer_options=options)
    out = dispatcher(comfy_style_attention, flat(q), flat(k), v.transpose(1, 2), heads=HEADS, skip_output_reshape=True,
                     transformer_options=options)
    return flat(out)


#: how the word map's probabilities are served: the cross view's logits of all joint keys, or (where a kernel
#: returning the log-sum-exp serves) the text columns alone
VIEWS = pytest.mark.parametrize("text_view", [False, True], ids=["cross view", "text view"])


LAYOUTS = pytest.mark.parametrize("cond_or_uncond,repeats,registers", [((1, 0), 1, 0), ((0,), 2, 0), ((0, 1), 1, 2)],
                                  ids=["cfg: uncond then cond", "cfg 1: cond only, prompt repeated", "register tokens"])


@LAYOUTS
@pytest.mark.parametrize("family", ["flux", "sd3"])
@ROWS_PER_CHUNK
@VIEWS
def test_word_map_is_read_on_the_text_columns_of_the_joint_softmax(family, cond_or_uncond, repeats, registers,
                                                                    rows_per_chunk, text_view, monkeypatch):
    """The text-only pass: the reader takes the cond rows' probabilities, one map of the whole grid however many
    query rows they come in; the output is the plain joint attention (explicit softmax over all joint keys)."""
    text = registers + PROMPT_LENGTH * repeats
    batch = 2 * len(cond_or_uncond)
    serve_rows_in_chunks(monkeypatch, rows_per_chunk, 2 * cond_or_uncond.count(COND), text if text_view else text + IMAGE)
    q, k, v = qkv(batch, text + IMAGE, seed=repeats + registers)
    run = guidance_run(image_tokens(), capturing=True, injecting=False)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(branch_weights()))
    block = ("double", 0) if family == "flux" else ("joint", 0)
    options = {**joint_options(chain, cond_or_uncond, text, registers, block=block), RUN_KEY: run}
    served = []  # (query rows, key columns) of each read
    original_read = WordMapReader.read_probs
    monkeypatch.setattr(WordMapReader, "read_probs",
                        lambda self, probs, call: served.append(probs.shape[2:]) or original_read(self, probs, call))
    out = call_dispatcher(family, q, k, v, options, exact_attention=text_view)
    assert {columns for _, columns in served} == {text if text_view else text + IMAGE}
    assert {rows for rows, _ in served[:-1]} <= {rows_per_chunk or IMAGE} and sum(r for r, _ in served) == IMAGE
    torch.testing.assert_close(out, flat(slow_joint_attention(q, k, v, text, torch.zeros(batch, HEADS, IMAGE, text))),
                               rtol=1e-5, atol=1e-5)
    run.finish_text_only_pass()
    first_cond = cond_or_uncond.index(COND) * 2
    maps = slow_word_maps(q, k, text, registers, [first_cond, first_cond + 1], repeats)
    expected = (maps / (maps.max(dim=1, keepdim=True).values + 1e-6)).view(2, *GRID)  # max_norm, scope 1: all kept
    torch.testing.assert_close(run.mask.double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[0], expected[1], atol=1e-3), "each image its own map"


@LAYOUTS
@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("negative", [True, False], ids=["black image", "no uncond image"])
def test_image_branch_is_added_to_the_image_rows_of_the_joint_output(family, cond_or_uncond, repeats, registers,
                                                                      negative):
    """The guided pass with the released schedule: no logits needed, the plain joint attention plus the gated
    branch on the latent's image rows; text rows are the plain joint attention's (the branch is zero there)."""
    text = registers + PROMPT_LENGTH * repeats
    batch = 2 * len(cond_or_uncond)
    q, k, v = qkv(batch, text + IMAGE, seed=5 + repeats + registers)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block = ("double", 0) if family == "flux" else ("joint", 0)
    weights, tokens = branch_weights((*block, 0)), image_tokens(negative)
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(weights, STRENGTH))
    options = {**joint_options(chain, cond_or_uncond, text, registers, block=block), RUN_KEY: run}
    out = call_dispatcher(family, q, k, v, options)
    plain = slow_joint_attention(q, k, v, text, torch.zeros(batch, HEADS, IMAGE, text))
    branch = slow_branch(q, text, weights, tokens, mask, cond_or_uncond, block="_".join(map(str, (*block, 0))))
    torch.testing.assert_close(out, flat(plain + branch), rtol=1e-6, atol=1e-6)
    assert branch[:, :, text:].abs().max() > 1e-2


def test_scoring_reads_the_flow_latent_in_vp_form_at_the_same_signal_to_noise_ratio():
    """[R] For x_t = (1 - σ) x0 + σ ε: ᾱ/(1 - ᾱ) is the flow's SNR ((1 - σ)/σ)², and the scoring module's latent
    is √ᾱ x0 + √(1 - ᾱ) ε, as a VP model's input at that ᾱ."""
    from personalization_nodes.attention.realcustom_scoring import alpha_bar, model_input
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.97], dtype=torch.float64)
    a = alpha_bar(sigma, flow=True).double()
    torch.testing.assert_close(a / (1 - a), ((1 - sigma) / sigma) ** 2, rtol=1e-5, atol=0)  # ᾱ in float32
    gen = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(5, 16, 2, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    view = (-1, 1, 1, 1)
    x_t = (1 - sigma).view(view) * x0 + sigma.view(view) * eps
    torch.testing.assert_close(model_input(x_t, sigma, flow=True), a.sqrt().view(view) * x0 + (1 - a).sqrt().view(view) * eps,
                               rtol=1e-5, atol=1e-6)


@ROWS_PER_CHUNK
def test_map_read_and_branch_added_in_one_call(rows_per_chunk, monkeypatch):
    """"previous step": the guided pass both reads the map (of the joint softmax without the branch, which is
    an output added after it) and adds the branch; a block the adapter has no projections for is left alone. The
    reader views cond rows only: at CFG the logits are made for the cond chunk's rows, the uncond rows take the
    fused path."""
    text, chunks = PROMPT_LENGTH, (1, 0)
    serve_rows_in_chunks(monkeypatch, rows_per_chunk, 2, text + IMAGE)  # the cond chunk's 2 samples
    q, k, v = qkv(4, text + IMAGE, seed=9)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    weights, tokens = branch_weights(), image_tokens()
    run = guidance_run(tokens, capturing=True, injecting=True, mask=mask)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(weights, STRENGTH))
    viewed_batches = []
    cross_view = joint._cross_view

    def recording(queries, *args, **kwargs):
        viewed_batches.append(queries.shape[0])
        return cross_view(queries, *args, **kwargs)
    monkeypatch.setattr(joint, "_cross_view", recording)
    out = call_dispatcher("flux", q, k, v, {**joint_options(chain, chunks, text), RUN_KEY: run})
    assert viewed_batches == [2]
    plain = slow_joint_attention(q, k, v, text, torch.zeros(4, HEADS, IMAGE, text))
    torch.testing.assert_close(out, flat(plain + slow_branch(q, text, weights, tokens, mask, chunks)),
                               rtol=1e-5, atol=1e-5)
    run.finish_text_only_pass()
    maps = slow_word_maps(q, k, text, 0, [2, 3], 1)
    torch.testing.assert_close(run.mask.double(), (maps / (maps.max(1, keepdim=True).values + 1e-6)).view(2, *GRID),
                               rtol=1e-5, atol=1e-6)
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    other_block = {**joint_options(chain, chunks, text, block=("single", 0)), RUN_KEY: run}
    assert torch.equal(call_dispatcher("flux", q, k, v, other_block), call_dispatcher("flux", q, k, v, {}))


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_another_packs_override_computes_the_call_and_realcustom_reads_and_adds_around_it(family):
    """Mask guidance only reads the probabilities and adds an output, so it composes with another pack's DiT
    override: the override's output (here twice the plain joint attention) plus the gated branch on the latent's
    image rows, and the word map read from the plain joint keys' softmax ("previous step": both in one call).
    A softmax edit still cannot wrap the override (tested with CalibratedCrossAttn)."""
    text, chunks = PROMPT_LENGTH, (1, 0)
    q, k, v = qkv(4, text + IMAGE, seed=11)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    block = ("double", 0) if family == "flux" else ("joint", 0)
    weights, tokens = branch_weights((*block, 0)), image_tokens()
    run = guidance_run(tokens, capturing=True, injecting=True, mask=mask)
    chain = ProcessorChain().with_processor(WordMapReader()).with_processor(MaskedImageBranch(weights, STRENGTH))
    options = {**joint_options(chain, chunks, text, block=block), RUN_KEY: run}

    def doubled(func, *args, **kwargs):
        return 2 * func(*args, **kwargs)
    dispatcher = JointAttentionDispatcher(inner=doubled)
    if family == "flux":
        out = dispatcher(comfy_style_attention, q, k, v, HEADS, skip_reshape=True, transformer_options=options)
    else:
        out = flat(dispatcher(comfy_style_attention, flat(q), flat(k), v.transpose(1, 2), heads=HEADS,
                              skip_output_reshape=True, transformer_options=options))
    plain = slow_joint_attention(q, k, v, text, torch.zeros(4, HEADS, IMAGE, text))
    branch = slow_branch(q, text, weights, tokens, mask, chunks, block="_".join(map(str, (*block, 0))))
    torch.testing.assert_close(out, flat(2 * plain + branch), rtol=1e-5, atol=1e-5)
    run.finish_text_only_pass()
    maps = slow_word_maps(q, k, text, 0, [2, 3], 1)
    torch.testing.assert_close(run.mask.double(), (maps / (maps.max(1, keepdim=True).values + 1e-6)).view(2, *GRID),
                               rtol=1e-5, atol=1e-6)


def test_branch_is_added_to_style_aligned_image_rows():
    """SharedAttentionBatch owns the joint call's image rows; the branch is added to its output."""
    text, chunks, settings = PROMPT_LENGTH, (1, 0), StyleAlignedSettings(score_shift=0.4)
    q, k, v = qkv(4, text + IMAGE, seed=11)
    mask = torch.rand(2, *GRID, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    weights, tokens = branch_weights(), image_tokens()
    run = guidance_run(tokens, capturing=False, injecting=True, mask=mask)
    shared = SharedAttentionProcessor(settings=settings, blocks=frozenset({("double", 0, 0)}))
    chain = ProcessorChain().with_processor(shared).with_processor(MaskedImageBranch(weights, STRENGTH))
    out = call_dispatcher("flux", q, k, v, {**joint_options(chain, chunks, text), RUN_KEY: run})
    expected = slow_style_aligned_with_edits(q, k, v, 2, settings, text, torch.zeros(4, HEADS, IMAGE, text))
    torch.testing.assert_close(out, flat(expected + slow_branch(q, text, weights, tokens, mask, chunks)),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- in the real ComfyUI, tiny Flux dev and SD3.5 Large

PROMPT = "photo of a small toy on the beach"
GUIDANCE_DEFAULTS = dict(prompt=PROMPT, word="toy", mask_strategy="max_norm", mask_scope=0.25, binary_mask=False,
                         update_fraction=1.0, map_source="text-only pass", uncond_image="black image", strength=1.0)
SAMPLING = dit.NODE_SAMPLING
ADAPTER_TOKEN_DIM = 64
CONTEXT_WIDTH = 4096  # T5-XXL's, the text context of Flux and SD3
#: 64 px images: 8 x 8 latents, 4 x 4 image tokens (patch 2), the mask grid
MASK_GRID = (4, 4)


def encoded_reference(model, file_name, family_tag, scoring=False):
    """RealCustomEncodeReference's output for a random adapter of ``family_tag`` for the DiT ``model``'s blocks; with
    the scoring module, its tokens have the text context's width (4096), as the trainer makes them, so that the
    module reads the prompt."""
    from harness.pack_nodes import run_node
    from harness.realcustom import TINY_CLIP_VISION, adapter_path, tiny_clip_vision
    blocks = pack_module("nodes.patching").transformer_blocks(model, families=pack_module("attention.blocks").ALL_FAMILIES)
    adapter_path(file_name, blocks, TINY_CLIP_VISION["hidden_size"], CONTEXT_WIDTH if scoring else ADAPTER_TOKEN_DIM,
                 family=family_tag, scoring=scoring, latent_channels=16)
    adapter = run_node("RealCustomLoader", adapter_name=file_name)[0]
    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    return run_node("RealCustomEncodeReference", adapter=adapter, clip_vision=tiny_clip_vision(), image=image,
                    crop=False)[0]


class Family(dit.TinyFamily):
    prompt = PROMPT

    def __init__(self, name, comfy):
        super().__init__(name)
        self.comfy = comfy
        self.reference = self.encoded_reference(f"test_realcustom_{name}_v1.safetensors", self.tag)

    @property
    def tag(self):
        return "flux" if self.name == "flux" else "sd3"

    def encoded_reference(self, file_name, family_tag, scoring=False):
        return encoded_reference(self.model, file_name, family_tag, scoring)

    def guided(self, model=None, reference=None, **over):
        from harness.pack_nodes import run_node
        return run_node("AdaptiveMaskGuidance", model=self.model if model is None else model, clip=self.clip,
                        reference=self.reference if reference is None else reference, **{**GUIDANCE_DEFAULTS, **over})



def pack_module(name):
    from harness.comfy_env import pack_module as module
    return module(name)


@pytest.fixture(scope="module", params=["flux", "sd35"])
def family(request, comfy):
    yield Family(request.param, comfy)
    dit.release(request.param)


def test_strength_zero_is_unpatched_sampling_and_the_branch_changes_it(family):
    """Batch 2; Flux at CFG 1 (cond pass only), SD3.5 at CFG 1 and CFG 4 (cond and uncond passes). One mask per
    image and step at the image-token grid, the top quarter kept with soft max-normalised values; the mask
    preview shows every step's masks at image size."""
    for cfg in ((1.0,) if family.name == "flux" else (1.0, 4.0)):
        base = family.sample(family.model, cfg=cfg)
        assert torch.equal(family.sample(family.guided(strength=0.0)[0], cfg=cfg), base)
        patched, masks = family.guided()
        on = family.sample(patched, cfg=cfg)
        assert relative_change(on[0], base[0]) > 1e-3 and relative_change(on[1], base[1]) > 1e-3
        assert len(masks.steps) == SAMPLING["steps"]
        for mask in masks.steps:
            assert mask.shape == (2, *MASK_GRID)
            assert not torch.equal(mask[0], mask[1])
            assert ((mask > 0).flatten(1).sum(1) <= 4).all()
            torch.testing.assert_close(mask.flatten(1).amax(1), torch.ones(2), atol=1e-4, rtol=0)
        from harness.pack_nodes import run_node
        preview_mask, preview = run_node("RealCustomMaskPreview", masks=masks, samples={"samples": on})
        assert preview_mask.shape == (2 * SAMPLING["steps"], 64, 64) and preview.shape == (2 * SAMPLING["steps"], 64, 64, 3)
    assert torch.equal(family.sample(family.model, cfg=cfg), base), "the input model must stay unpatched"


def test_query_rows_served_one_at_a_time_sample_as_all_at_once(family, monkeypatch):
    """The cross view serving its probabilities one query row at a time (chunk budget 1 byte) gives the masks and
    samples of all rows at once, up to float rounding: each layer's word map is joined from its rows before it
    counts, whichever pass reads it."""
    def outputs(source):
        patched, masks = family.guided(map_source=source)
        return family.sample(patched), torch.stack(masks.steps)
    sources = ("text-only pass", "previous step")
    whole = [outputs(source) for source in sources]
    served_rows = serve_sampled_rows_one_at_a_time(monkeypatch, pack_module("attention.realcustom").WordMapReader,
                                                   "read_probs")
    chunked = [outputs(source) for source in sources]
    assert served_rows and all(rows.stop - rows.start == 1 for rows in served_rows)
    for one_row, all_rows in zip(chunked, whole):  # measured: samples (magnitude 5 to 14) at most 5.3e-6 apart,
        for a, b in zip(one_row, all_rows):      # masks (at most 1) 5.4e-7
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_map_sources_share_the_first_mask_and_the_frozen_mask_is_reused(family):
    runs = {}
    for source in ("previous step", "text-only pass"):
        patched, masks = family.guided(map_source=source)
        family.sample(patched, batch=1)
        runs[source] = masks.steps
    torch.testing.assert_close(runs["previous step"][0], runs["text-only pass"][0], atol=1e-5, rtol=0)
    assert not torch.equal(runs["previous step"][1], runs["text-only pass"][1])
    patched, masks = family.guided(update_fraction=0.5)
    family.sample(patched, batch=1)
    assert len(masks.steps) == 2 and torch.equal(masks.steps[0], masks.steps[1])


def test_cascaded_guidance_with_equal_scales_is_the_released_cfg(family):
    """Paper eq. 13 with ω_i = ω_t is the released CFG; the text-only prediction the DiT wrapper keeps is the
    denoised one (an APPLY_MODEL wrapper), which the guidance must not convert again."""
    cfg = 3.0
    released = family.sample(family.guided()[0], cfg=cfg)
    cascaded, masks = family.guided(guidance="cascaded (paper eq. 13)", image_guidance=cfg)
    assert (family.sample(cascaded, cfg=cfg) - released).abs().max() <= 1e-4 * released.abs().max()
    other = family.sample(family.guided(guidance="cascaded (paper eq. 13)", image_guidance=2 * cfg)[0], cfg=cfg)
    assert relative_change(other, released) > 1e-3
    assert len(masks.steps) == SAMPLING["steps"]


def test_a_lora_on_the_dit_still_applies(family):
    lora = family.comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(family.model, dit.lora_path(family.name).name,
                                                                       1.0)[0]
    with_lora = family.sample(family.guided(model=lora)[0])
    assert torch.equal(family.sample(family.guided(model=lora, strength=0.0)[0]), family.sample(lora))
    assert relative_change(with_lora, family.sample(family.guided()[0])) > 1e-3
    assert relative_change(with_lora, family.sample(lora)) > 1e-3


def test_adapters_of_another_family_are_refused_naming_both(family):
    other = "sd3" if family.name == "flux" else "flux"
    foreign = family.encoded_reference(f"test_realcustom_{family.name}_marked_{other}_v1.safetensors", other)
    names = {"flux": "Flux", "sd3": r"SD3/SD3\.5 \(MMDiT\)"}
    with pytest.raises(ValueError, match=rf"AdaptiveMaskGuidance: adapter .* was made for {names[other]} models, but "
                                         rf"this MODEL .* is a {names[family.tag]} model"):
        family.guided(reference=foreign)
    unet = family.encoded_reference(f"test_realcustom_{family.name}_unmarked_v1.safetensors", None)
    with pytest.raises(ValueError, match=r"made for U-Net \(SD1\.5/SD2/SDXL\) models, but this MODEL"):
        family.guided(reference=unet)


def test_adapter_with_adaptive_scoring_scores_the_tokens_of_every_call(family):
    """Paper §3.2 on a rectified flow: tokens picked and weighted per call from the prompt, the masked latent in
    its VP form and the ᾱ of the flow's signal-to-noise ratio."""
    import dataclasses
    scored = family.encoded_reference(f"test_realcustom_{family.name}_scoring_v1.safetensors", family.tag, scoring=True)
    assert scored.features is not None
    patched, masks = family.guided(reference=scored)
    out = family.sample(patched)
    assert torch.isfinite(out).all() and len(masks.steps) == SAMPLING["steps"]
    unscored = dataclasses.replace(scored, features=None)  # the same adapter's projector on all tokens
    assert relative_change(out, family.sample(family.guided(reference=unscored)[0])) > 1e-4
    assert torch.equal(family.sample(family.guided(reference=scored, strength=0.0)[0]), family.sample(family.model))

    scorer = pack_module("nodes.realcustom")._ScoredTokens(scored.adapter.adapter, scored.features, flow=True)
    x, context = torch.randn(4, 16, 8, 8), torch.randn(4, 154, CONTEXT_WIDTH)
    tokens = scorer(x, context, [0, 1], torch.ones(2, *MASK_GRID), torch.full((4,), 0.6))
    count = scored.features.reference.shape[1]
    assert tokens.reference.shape == (2, round(0.8 * count), CONTEXT_WIDTH)
    masked = scorer(x, context, [0, 1], torch.zeros(2, *MASK_GRID), torch.full((4,), 0.6))
    assert not torch.allclose(masked.reference, tokens.reference), "the word mask must reach the visual context"


def test_the_word_is_found_in_the_dits_text_sequence(family):
    with pytest.raises(ValueError, match=r"AdaptiveMaskGuidance: the word 'dog' does not occur in the prompt"):
        family.guided(word="dog")
    with pytest.raises(ValueError, match=r"AdaptiveMaskGuidance: .* same prompt"):
        family.sample(family.guided()[0], positive=family.encode(" ".join(["red"] * 300) + " toy"))


def test_composes_with_shared_attention_and_calibration_on_one_flux_model(comfy):
    """SharedAttentionBatch + CalibratedCrossAttn + AdaptiveMaskGuidance on one Flux model: every order gives one
    result; the guidance at strength 0 gives the other two alone bit for bit; the branch changes every image."""
    from harness.pack_nodes import run_node, shared_attention
    flux = Family("flux", comfy)

    def calibrated(model):
        return run_node("CalibratedCrossAttn", model=model, clip=flux.clip, prompt=PROMPT, modifiers="small, beach",
                        class_words="toy, photo", strength=1.0, start_percent=0.0, end_percent=1.0)[0]
    others = flux.sample(calibrated(shared_attention(flux.model)))
    orders = [flux.guided(model=calibrated(shared_attention(flux.model)))[0],
              calibrated(shared_attention(flux.guided()[0])),
              shared_attention(calibrated(flux.guided()[0]))]
    outputs = [flux.sample(model) for model in orders]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    assert torch.equal(flux.sample(flux.guided(model=calibrated(shared_attention(flux.model)), strength=0.0)[0]), others)
    assert relative_change(outputs[0][0], others[0]) > 1e-3 and relative_change(outputs[0][1], others[1]) > 1e-3
    dit.release("flux")


def test_a_controlnet_in_the_same_graph(family):
    """Flux: the XLabs-layout ControlNet (hint image); SD3.5: Stability's (VAE-encoded hint). The text-only pass
    of the cond rows gets the cond rows' residuals."""
    from harness.checkpoints import sample
    positive, negative = family.encode(PROMPT), family.encode("")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    apply = family.comfy.nodes.ControlNetApplyAdvanced().apply_controlnet
    controlled = (apply(positive, negative, dit.flux_controlnet(), hint, 1.0, 0.0, 1.0) if family.name == "flux" else
                  apply(positive, negative, dit.sd35_controlnet(), hint, 1.0, 0.0, 1.0, vae=dit.vae()))

    def sampled(model, prompts):
        return sample(model, *prompts, dit.empty_latent(2), seed=3, cfg=family.cfg, **SAMPLING)
    plain_controlled = sampled(family.model, controlled)
    assert torch.equal(sampled(family.guided(strength=0.0)[0], controlled), plain_controlled)
    patched, masks = family.guided()
    guided_controlled = sampled(patched, controlled)
    assert relative_change(guided_controlled, plain_controlled) > 1e-3
    uncontrolled_masks = family.guided()
    sampled(uncontrolled_masks[0], (positive, negative))
    assert not torch.equal(masks.steps[0], uncontrolled_masks[1].steps[0]), "the map is read with the ControlNet"


def test_sd35_medium_leaves_its_image_only_attention_alone(comfy, monkeypatch):
    """SD3.5 Medium (MMDiT-X): the word map is read and the branch added in its joint attentions; its second,
    image-only attention (no text keys) computes as without the node."""
    family = Family("sd35", comfy)
    family.model = dit.sd35_model("medium")
    family.reference = family.encoded_reference("test_realcustom_sd35_medium_v1.safetensors", "sd3")
    joint = pack_module("attention.joint")
    lengths = []
    original = joint._add_parallel_outputs

    def recording(image_out, queries, call, adding):
        lengths.append(image_out.shape[1])
        return original(image_out, queries, call, adding)
    monkeypatch.setattr(joint, "_add_parallel_outputs", recording)
    base = family.sample(family.model)
    assert torch.equal(family.sample(family.guided(strength=0.0)[0]), base)
    patched, masks = family.guided()
    assert relative_change(family.sample(patched), base) > 1e-3 and masks.steps[0].shape == (2, *MASK_GRID)
    # 2 steps x 3 joint blocks of the guided pass (one cond+uncond batch each), the image-only attentions never
    assert lengths == [MASK_GRID[0] * MASK_GRID[1]] * (2 * dit.SD35_DIT["depth"])
    dit.release("sd35")
