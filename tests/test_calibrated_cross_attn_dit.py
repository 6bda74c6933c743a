"""CalibratedCrossAttn (DisenDiff's sampling-time calibration) on the DiT families, through the joint-attention
dispatcher's cross view (attention/joint.py).

First against a slow written-out formulation of the edit on a joint text+image attention (per sample, per head,
per query, explicit softmax over the whole joint key set), alone and sharing the call with StyleAligned; then in
the real ComfyUI on the tiny Flux dev and SD3.5 Large of harness.dit, sampled by stock KSampler: strength 0 is
bit-identical to unpatched sampling, CFG 1 and CFG > 1, batch 2, a LoRA, SharedAttentionBatch on the same model,
the prompt's words found in the DiT's text sequence (T5 on Flux; CLIP-L/G then T5 on SD3.5), the map preview,
and the errors of bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from personalization_nodes.attention.disendiff import CONTEXT_TOKENS_KEY, CalibratedCrossAttention, Concept
from harness import dit
from harness.comfy_env import pack_module
from harness.dit import comfy_style_attention
from harness.tensors import relative_change
from personalization_nodes.attention.dispatcher import (CHAIN_KEY, CROSS_ATTENTION, AttentionConflictError,
                                                       AttentionProcessor, ProcessorChain)
from personalization_nodes.attention import joint
from personalization_nodes.attention.joint import LAYOUT_KEY, JointAttentionDispatcher, JointLayout, LayoutRecord
from personalization_nodes.attention.style_aligned import SharedAttentionProcessor, StyleAlignedSettings

HEADS, DIM = 2, 8
GRID = (3, 4)
IMAGE = GRID[0] * GRID[1]
PROMPT_LENGTH = 6
#: (modifier positions, class word positions) of two concepts in the 6-token prompt
CONCEPTS = (((1,), (2,)), ((3,), (4, 5)))
STRENGTH = 1.5


def slow_smooth(m):
    """3x3 Attend-and-Excite Gaussian (exponent ((x-1)/(2*0.5))^2, normalised) with reflect padding, by pixel."""
    g = [math.exp(-(((x - 1) / 1.0) ** 2)) for x in range(3)]
    total = sum(a * b for a in g for b in g)
    h, w = len(m), len(m[0])

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    return [[sum(g[i] * g[j] * m[reflect(y + i - 1, h)][reflect(x + j - 1, w)] for i in range(3) for j in range(3))
             / total for x in range(w)] for y in range(h)]


def slow_class_map(values):
    """Training's class-map processing of one map (a list over the grid's queries, row-major): min-max to
    [0, 1], Gaussian smoothing, squared."""
    low, high = min(values), max(values)
    scaled = [(x - low) / (high - low + 1e-8) for x in values]
    smoothed = slow_smooth([scaled[r * GRID[1]:(r + 1) * GRID[1]] for r in range(GRID[0])])
    return [x * x for row in smoothed for x in row]


def slow_softmax(logits):
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    return [w / sum(weights) for w in weights]


def slow_calibration_edits(q, k, text, registers, cond_rows, repeats):
    """(B, heads, IMAGE, text) logit edits of CalibratedCrossAttn as web/docs/CalibratedCrossAttn.md states them
    for a DiT: for each cond sample, P is the softmax of each head's logits of the latent's image queries over ALL
    joint keys [text | image]; concept i's class map is the head mean of P on its class word's text keys (every
    repeat of the prompt, after the register tokens), processed like training's class maps; a modifier key gains
    strength * (2 C_i - 1), concept i's modifier and class keys lose strength * relu(C_j - C_i) for every other
    concept j. Image keys and other samples are not edited."""
    batch, heads, length, dim = q.shape
    edits = torch.zeros(batch, heads, IMAGE, text, dtype=torch.float64)

    def keys_of(positions):
        return [registers + p + r * PROMPT_LENGTH for r in range(repeats) for p in positions]
    for b in cond_rows:
        mean = [[0.0] * length for _ in range(IMAGE)]
        for h in range(heads):
            for n in range(IMAGE):
                logits = [float(q[b, h, text + n] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                for key, p in enumerate(slow_softmax(logits)):
                    mean[n][key] += p / heads
        maps = [slow_class_map([sum(mean[n][key] for key in keys_of(word)) / len(keys_of(word)) for n in range(IMAGE)])
                for _modifier, word in CONCEPTS]
        for n in range(IMAGE):
            for key in range(text):
                delta = 0.0
                for i, (modifier, word) in enumerate(CONCEPTS):
                    if key in keys_of(modifier):
                        delta += STRENGTH * (2 * maps[i][n] - 1)
                    for j in range(len(CONCEPTS)):
                        if j != i and key in keys_of(modifier) + keys_of(word):
                            delta -= STRENGTH * max(maps[j][n] - maps[i][n], 0.0)
                edits[b, :, n, key] = delta
    return edits


def slow_joint_attention(q, k, v, text, edits):
    """Every row of a joint attention, one sample, head and query at a time: logits q.k/sqrt(d) over all joint
    keys, the latent's image queries' text logits plus ``edits``, explicit softmax, weighted sum of values."""
    batch, heads, length, dim = q.shape
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            for row in range(length):
                logits = [float(q[b, h, row] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                if text <= row < text + IMAGE:
                    for key in range(text):
                        logits[key] += float(edits[b, h, row - text, key])
                out[b, h, row] = sum(p * v[b, h, key] for key, p in enumerate(slow_softmax(logits)))
    return out


def token_mean_std(rows):
    n = len(rows)
    mean = sum(rows) / n
    return mean, ((sum((r - mean) ** 2 for r in rows) / (n - 1)) + 1e-5).sqrt()


def slow_style_aligned_with_edits(q, k, v, chunks, settings, text, edits):
    """StyleAligned on a joint attention (sample 0 of each chunk the reference: image queries/keys of the other
    samples AdaIN-normalised to it, attending also to its image keys with the score shift), with the calibration's
    text-logit ``edits`` added to every image query's own text keys, reference included."""
    batch, heads, length, dim = q.shape
    per_chunk = batch // chunks
    out = torch.zeros_like(q)
    for s in range(batch):
        ref = s // per_chunk * per_chunk
        for h in range(heads):
            for row in range(length):
                query, keys, values = q[s, h, row], list(k[s, h]), list(v[s, h])
                biases = [0.0] * length
                if row >= text:
                    biases[:text] = [float(edits[s, h, row - text, key]) for key in range(text)]
                if s != ref and row >= text:
                    mean, std = token_mean_std(list(q[s, h, text:]))
                    ref_mean, ref_std = token_mean_std(list(q[ref, h, text:]))
                    query = (query - mean) / std * ref_std + ref_mean
                    mean, std = token_mean_std(list(k[s, h, text:]))
                    ref_mean, ref_std = token_mean_std(list(k[ref, h, text:]))
                    keys = keys[:text] + [(key - mean) / std * ref_std + ref_mean for key in keys[text:]]
                    keys += list(k[ref, h, text:])
                    values += list(v[ref, h, text:])
                    biases += [settings.score_shift] * (length - text)
                logits = [float(query @ key) / math.sqrt(dim) + bias for key, bias in zip(keys, biases)]
                out[s, h, row] = sum(p * value for p, value in zip(slow_softmax(logits), values))
    return out


def calibration(prompt_length=PROMPT_LENGTH):
    return CalibratedCrossAttention(tuple(Concept(m, w) for m, w in CONCEPTS), STRENGTH, float("inf"), 0.0, prompt_length)


def joint_options(chain, cond_or_uncond, text, registers=0, context_tokens=None, block=("double", 0)):
    return {CHAIN_KEY: chain, LAYOUT_KEY: LayoutRecord(JointLayout(text, GRID, slice(registers, text))), "cond_or_uncond": list(cond_or_uncond),
            "block_type": block[0], "block_index": block[1],
            CONTEXT_TOKENS_KEY: text - registers if context_tokens is None else context_tokens}


def qkv(batch, length, seed=0, dim=DIM, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(batch, HEADS, length, dim, generator=gen, dtype=dtype) for _ in range(3)]


#: query rows per chunk of the cross view's logits: all 12 of the grid at once, and chunks of 5, 5, 2 and of 1
ROWS_PER_CHUNK = pytest.mark.parametrize("rows_per_chunk", [None, 5, 1], ids=["all rows", "5 rows", "1 row"])


def serve_rows_in_chunks(monkeypatch, rows_per_chunk, batch, keys, module=joint):
    """Make a cross view of ``batch`` samples over ``keys`` joint keys serve ``rows_per_chunk`` query rows at a
    time (its chunk budget set to their float32 logits), or all rows (None: the budget as it is). The view holds
    only the cond chunks' samples when its processors view nothing else (all of this file's and RealCustom's)."""
    if rows_per_chunk is not None:
        monkeypatch.setattr(module, "CROSS_VIEW_CHUNK_BYTES", rows_per_chunk * batch * HEADS * keys * 4)


def serve_sampled_rows_one_at_a_time(monkeypatch, processor_class, hook: str) -> list:
    """Make the cross view of the pack ComfyUI loaded (what sampling runs) serve one query row at a time; the list
    it returns gathers ``call.query_rows`` of every call of ``processor_class``'s ``hook``."""
    served_rows = []
    original = getattr(processor_class, hook)

    def recording(self, tensor, call):
        served_rows.append(call.query_rows)
        return original(self, tensor, call)
    monkeypatch.setattr(processor_class, hook, recording)
    monkeypatch.setattr(pack_module("attention.joint"), "CROSS_VIEW_CHUNK_BYTES", 1)
    return served_rows


def flat(t):
    """(B, heads, L, d) -> (B, L, heads*d), SD3's q/k layout."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


@pytest.mark.parametrize("cond_or_uncond,repeats,registers", [((1, 0), 1, 0), ((0,), 2, 0), ((0, 1), 1, 2)],
                         ids=["cfg: uncond then cond", "cfg 1: cond only, prompt repeated", "register tokens"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
@ROWS_PER_CHUNK
def test_joint_call_matches_the_written_out_calibration(family, cond_or_uncond, repeats, registers, rows_per_chunk,
                                                        monkeypatch):
    """Flux hands (B, heads, L, d) with skip_reshape; SD3 (B, L, heads*d) q/k, (B, L, heads, d) v and asks for
    (B, heads, L, d) back. The class maps span the whole grid however many query rows the logits come in."""
    text = registers + PROMPT_LENGTH * repeats
    batch = 2 * len(cond_or_uncond)
    serve_rows_in_chunks(monkeypatch, rows_per_chunk, 2 * cond_or_uncond.count(0), text + IMAGE)
    q, k, v = qkv(batch, text + IMAGE, seed=repeats + registers)
    chain = ProcessorChain().with_processor(calibration())
    block = ("double", 0) if family == "flux" else ("joint", 0)
    options = joint_options(chain, cond_or_uncond, text, registers, block=block)
    cond_rows = [c * 2 + r for c, kind in enumerate(cond_or_uncond) if kind == 0 for r in range(2)]
    expected = slow_joint_attention(q, k, v, text, slow_calibration_edits(q, k, text, registers, cond_rows, repeats))
    if family == "flux":
        out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                         transformer_options=options)
        plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
        expected = flat(expected)
    else:
        out = JointAttentionDispatcher()(comfy_style_attention, flat(q), flat(k), v.transpose(1, 2), heads=HEADS,
                                         skip_output_reshape=True, transformer_options=options)
        plain = comfy_style_attention(flat(q), flat(k), flat(v), HEADS, skip_output_reshape=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # logits in float32, as on the U-Net
    assert (out - plain).abs().max() > 1e-2, "the cond rows' image queries must change"


def test_text_rows_are_bit_identical_to_the_plain_call():
    """Rows computed apart are bit-identical when the kernel computes each query row on its own, as torch's SDPA
    does at DiT head sizes (see test_joint_attention)."""
    q, k, v = qkv(2, PROMPT_LENGTH + IMAGE, dim=64, dtype=torch.float32)
    chain = ProcessorChain().with_processor(calibration())
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=joint_options(chain, (1, 0), PROMPT_LENGTH))
    plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
    assert torch.equal(out[:, :PROMPT_LENGTH], plain[:, :PROMPT_LENGTH])
    assert not torch.allclose(out[1, PROMPT_LENGTH:], plain[1, PROMPT_LENGTH:])


@ROWS_PER_CHUNK
def test_shared_joint_call_with_style_aligned_matches_the_written_out_composition(rows_per_chunk, monkeypatch):
    """SharedAttentionBatch and CalibratedCrossAttn on the same block: one joint call serves both. The
    calibration's edits of the image queries' own text logits (computed on the plain joint keys) join
    StyleAligned's softmax over [text | own image | reference image]; the order of the nodes does not matter."""
    text, settings = PROMPT_LENGTH, StyleAlignedSettings(score_shift=0.4)
    serve_rows_in_chunks(monkeypatch, rows_per_chunk, 2, text + IMAGE)  # the cond chunk's 2 samples
    q, k, v = qkv(4, text + IMAGE, seed=7)
    shared = SharedAttentionProcessor(settings=settings, blocks=frozenset({("double", 0, 0)}))
    edits = slow_calibration_edits(q, k, text, 0, [2, 3], 1)
    assert edits[2:].abs().max() > 0.1 and not edits[:2].any()
    expected = flat(slow_style_aligned_with_edits(q, k, v, 2, settings, text, edits))
    outputs = []
    for chain in (ProcessorChain().with_processor(shared).with_processor(calibration()),
                  ProcessorChain().with_processor(calibration()).with_processor(shared)):
        outputs.append(JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                                  transformer_options=joint_options(chain, (1, 0), text)))
        torch.testing.assert_close(outputs[-1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(outputs[0], outputs[1])


def test_image_only_attention_is_not_part_of_the_cross_view():
    """SD3.5 Medium's second attention runs over the image tokens alone: no text keys, the plain call."""
    q, k, v = qkv(2, IMAGE)
    chain = ProcessorChain().with_processor(calibration())
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=joint_options(chain, (0,), PROMPT_LENGTH, block=("joint", 1)))
    assert torch.equal(out, comfy_style_attention(q, k, v, HEADS, skip_reshape=True))


def test_positions_beyond_the_calls_text_are_an_error_naming_the_node():
    q, k, v = qkv(2, 4 + IMAGE)
    chain = ProcessorChain().with_processor(calibration())
    with pytest.raises(ValueError, match=r"CalibratedCrossAttn: the concepts sit at tokens up to 5 .* 4 text tokens"):
        JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                   transformer_options=joint_options(chain, (0,), 4))


class ImageKeyEditor(AttentionProcessor):
    """A cross-attention processor that edits the logits of an image key."""
    name, node_name, patch_point = "image_key_editor", "ImageKeyEditor", CROSS_ATTENTION

    def edit_logits(self, logits, call):
        edited = logits.clone()
        edited[..., call.text_keys.stop] += 1.0
        return edited


def test_conflict_rules_of_the_cross_view():
    """Another pack's DiT override cannot take a softmax the calibration edits; an edit of image-key logits
    cannot move into StyleAligned's softmax, whose image keys are others."""
    q, k, v = qkv(2, PROMPT_LENGTH + IMAGE)

    def foreign_override(func, *args, **kwargs):
        return func(*args, **kwargs)
    calibrated = ProcessorChain().with_processor(calibration())
    with pytest.raises(AttentionConflictError, match="CalibratedCrossAttn changes attention in block double:0, but "
                                                     "another node pack's attention patch"):
        JointAttentionDispatcher(inner=foreign_override)(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                                         transformer_options=joint_options(calibrated, (0,), PROMPT_LENGTH))
    shared = SharedAttentionProcessor(settings=StyleAlignedSettings(), blocks=frozenset({("double", 0, 0)}))
    both = ProcessorChain().with_processor(shared).with_processor(ImageKeyEditor())
    with pytest.raises(AttentionConflictError, match="ImageKeyEditor edits the image-key logits .* SharedAttentionBatch"):
        JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                   transformer_options=joint_options(both, (0,), PROMPT_LENGTH))


# ---------------------------------------------------------------- in the real ComfyUI, tiny Flux dev and SD3.5 Large

PROMPT = "photo of a small cat and a big dog"
NODE_INPUTS = dict(prompt=PROMPT, modifiers="small, big", class_words="cat, dog", start_percent=0.0, end_percent=1.0)
SAMPLING = dit.NODE_SAMPLING


class Family(dit.TinyFamily):
    prompt = PROMPT

    def __init__(self, name, comfy):
        super().__init__(name)
        self.comfy = comfy

    def calibrated(self, model=None, strength=STRENGTH, **over):
        from harness.pack_nodes import run_node
        return run_node("CalibratedCrossAttn", model=self.model if model is None else model, clip=self.clip,
                        strength=strength, **{**NODE_INPUTS, **over})[0]


@pytest.fixture(scope="module", params=["flux", "sd35"])
def family(request, comfy):
    yield Family(request.param, comfy)
    dit.release(request.param)


def test_strength_zero_is_unpatched_sampling_and_strength_changes_it(family):
    dit.check_strength_zero_is_unpatched(family, family.calibrated)


def test_the_edit_is_the_cond_rows_only(family, monkeypatch):
    """At CFG > 1 the uncond rows are left alone: the cross view serves the calibration the cond rows only (a call
    describing those), and it edits every one of them."""
    if family.name == "flux":
        pytest.skip("Flux dev samples at CFG 1 (distilled guidance): no uncond pass")
    calibration_class = pack_module("attention.disendiff").CalibratedCrossAttention
    edited_rows, served_layouts = [], set()
    original = calibration_class.edit_logits

    def recording(self, logits, call):
        edited = original(self, logits, call)
        served_layouts.add(tuple(call.cond_or_uncond))
        per_chunk = logits.shape[0] // len(call.cond_or_uncond)
        edited_rows.append(tuple(call.cond_or_uncond[row // per_chunk] for row in range(logits.shape[0])
                                 if not torch.equal(edited[row], logits[row])))
        return edited
    monkeypatch.setattr(calibration_class, "edit_logits", recording)
    family.sample(family.calibrated())
    assert edited_rows and all(rows == (0, 0) for rows in edited_rows)
    assert served_layouts == {(0,)}, "the sampled batch holds cond and uncond rows; the edit gets the cond rows only"


def test_query_rows_served_one_at_a_time_sample_as_all_at_once(family, monkeypatch):
    """The cross view serving its logits one query row at a time (chunk budget 1 byte) samples what all rows at
    once sample, up to float rounding: the calibration alone (SD3.5 at CFG 4: cond and uncond rows), with
    SharedAttentionBatch (the edits join its softmax as a text bias, row by row), and the map preview."""
    from harness.pack_nodes import run_node, shared_attention
    models = (family.calibrated(), shared_attention(family.calibrated()))
    latent = {"samples": family.sample(family.model, batch=1)}

    def outputs():
        maps = run_node("CalibratedCrossAttnMaps", model=models[0], positive=family.encode(PROMPT), latent=latent,
                        noise_level=0.5, seed=0)[1]
        return [family.sample(model) for model in models] + [maps]
    whole = outputs()
    served_rows = serve_sampled_rows_one_at_a_time(
        monkeypatch, pack_module("attention.disendiff").CalibratedCrossAttention, "edit_logits")
    chunked = outputs()
    assert served_rows and all(rows.stop - rows.start == 1 for rows in served_rows)
    for one_row, all_rows in zip(chunked, whole):  # measured: at most 5.5e-6 on samples of magnitude 5 to 13
        torch.testing.assert_close(one_row, all_rows, rtol=1e-5, atol=1e-5)


def test_a_lora_on_the_dit_still_applies(family):
    lora = family.comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(family.model, dit.lora_path(family.name).name,
                                                                       1.0)[0]
    with_lora = family.sample(family.calibrated(model=lora))
    assert torch.equal(family.sample(family.calibrated(model=lora, strength=0.0)), family.sample(lora))
    assert relative_change(with_lora, family.sample(family.calibrated())) > 1e-3
    assert relative_change(with_lora, family.sample(lora)) > 1e-3


def test_composes_with_shared_attention_on_the_same_model(family):
    """Both nodes in either order give one result; calibration off gives SharedAttentionBatch alone bit for bit;
    the reference image is calibrated as without sharing (up to float rounding: its calibrated joint softmax
    goes through the attention function with the edits as a mask instead of an explicit softmax)."""
    from harness.pack_nodes import shared_attention
    shared = shared_attention(family.model)
    calibrated_then_shared = family.sample(shared_attention(family.calibrated()))
    shared_then_calibrated = family.sample(family.calibrated(model=shared))
    assert torch.equal(calibrated_then_shared, shared_then_calibrated)
    assert torch.equal(family.sample(family.calibrated(model=shared, strength=0.0)), family.sample(shared))
    assert relative_change(calibrated_then_shared[1], family.sample(shared)[1]) > 1e-3
    calibrated_alone = family.sample(family.calibrated())
    torch.testing.assert_close(calibrated_then_shared[0], calibrated_alone[0], rtol=1e-4, atol=1e-4)
    assert relative_change(calibrated_then_shared[1], calibrated_alone[1]) > 1e-3


def test_the_words_are_found_in_the_dits_text_sequence(family):
    """Flux's conditioning is T5's sequence; SD3's is CLIP-L/G (77 tokens) then T5: a word has a position in
    each. Checked against the T5 tokenizer's own reading of the whole prompt (ComfyUI tokenizes word by word)."""
    find = pack_module("nodes.prompt_tokens").find_phrase_tokens
    t5 = family.clip.tokenizer.t5xxl.tokenizer
    t5_position = t5.convert_ids_to_tokens(t5(PROMPT)["input_ids"]).index("\u2581cat")
    clip_tokens = family.clip.tokenize(PROMPT)
    found = find(family.clip, PROMPT, "cat")
    if family.name == "flux":
        assert found.positions == (t5_position,) and found.context_length == len(clip_tokens["t5xxl"][0]) == 256
    else:
        clip_length = len(clip_tokens["l"][0])
        assert found.positions == (PROMPT.split().index("cat") + 1, clip_length + t5_position)  # + 1: CLIP's BOS
        assert found.context_length == clip_length + len(clip_tokens["t5xxl"][0])


def test_bad_inputs_are_clear_errors(family):
    with pytest.raises(ValueError, match=r"CalibratedCrossAttn: the word 'horse' does not occur in the prompt"):
        family.calibrated(class_words="cat, horse")
    with pytest.raises(ValueError, match=r"(?s)CalibratedCrossAttn: the word 'Cat' does not occur .* T5 \(Flux, SD3\) does not"):
        family.calibrated(class_words="Cat, dog")
    with pytest.raises(ValueError, match=r"CalibratedCrossAttn: 'embedding:pair_new1' is a CLIP embedding .* name "
                                         r"modifier words"):
        family.calibrated(prompt="photo of a embedding:pair_new1 cat and a big dog", modifiers="embedding:pair_new1, big")
    with pytest.raises(ValueError, match=r"CalibratedCrossAttn: the positive conditioning .* is not the node's prompt"):
        family.sample(family.calibrated(), positive=family.encode("photo of a big cat and a small dog"))


def test_map_preview_on_the_dit(family):
    from harness.pack_nodes import run_node
    latent = {"samples": family.sample(family.model, batch=1)}
    images, masks = run_node("CalibratedCrossAttnMaps", model=family.calibrated(), positive=family.encode(PROMPT),
                             latent=latent, noise_level=0.5, seed=0)
    assert images.shape == (4, 64, 64, 3) and masks.shape == (2, 64, 64)
    assert float(masks.amax()) == pytest.approx(1.0, abs=1e-4) and float(masks.amin()) == pytest.approx(0.0, abs=1e-4)
    assert not torch.equal(masks[0], masks[1])


def test_a_controlnet_in_the_same_graph(family):
    """Flux: the XLabs-layout ControlNet (hint image); SD3.5: Stability's (VAE-encoded hint)."""
    positive, negative = family.encode(PROMPT), family.encode("")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    if family.name == "flux":
        controlled = family.comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, dit.flux_controlnet(), hint, 1.0, 0.0, 1.0)
    else:
        controlled = family.comfy.nodes.ControlNetApplyAdvanced().apply_controlnet(
            positive, negative, dit.sd35_controlnet(), hint, 1.0, 0.0, 1.0, vae=dit.vae())
    from harness.checkpoints import sample

    def sampled(model, prompts):
        return sample(model, *prompts, dit.empty_latent(2), seed=3, cfg=family.cfg, **SAMPLING)
    plain_controlled = sampled(family.model, controlled)
    assert torch.equal(sampled(family.calibrated(strength=0.0), controlled), plain_controlled)
    calibrated_controlled = sampled(family.calibrated(), controlled)
    assert relative_change(calibrated_controlled, plain_controlled) > 1e-3
    assert relative_change(calibrated_controlled, sampled(family.calibrated(), (positive, negative))) > 1e-3


def test_sd35_medium_leaves_its_image_only_attention_alone(comfy, monkeypatch):
    """SD3.5 Medium (MMDiT-X): its joint attentions are calibrated, its second, image-only attention (no text
    keys) is not."""
    family = Family("sd35", comfy)
    family.model = dit.sd35_model("medium")
    joint = pack_module("attention.joint")
    lengths = []
    original = joint._cross_view

    def recording(queries, k, *args):
        lengths.append(k.shape[1])
        return original(queries, k, *args)
    monkeypatch.setattr(joint, "_cross_view", recording)
    base = family.sample(family.model)
    assert torch.equal(family.sample(family.calibrated(strength=0.0)), base)
    assert relative_change(family.sample(family.calibrated()), base) > 1e-3
    image_tokens = (64 // 8 // 2) ** 2
    assert lengths and all(length > image_tokens for length in lengths)
    assert len(lengths) == 2 * dit.SD35_DIT["depth"]  # 2 steps x 3 joint blocks, one cond+uncond batch each
