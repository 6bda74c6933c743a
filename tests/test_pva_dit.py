"""ParallelVisualAttention (PVA) on the DiT families, through the joint-attention dispatcher (attention/joint.py).

First against a slow written-out formulation of what PVA computes in one joint text+image attention (per sample,
per head, per query, explicit softmax): the latent's image queries attend in ONE softmax to the joint keys
[text | image] (their own queries) and to the identity tokens' keys, scored by the parallel queries (the block's
input through to_visual_q, normalised per head, on Flux rotated by the token's position) with the strength's ln s
added; identity keys are the identity tokens through to_visual_k and the key norm, values through to_visual_v;
text queries and rows without the identity are the plain joint attention. Then in the real ComfyUI on the tiny
Flux dev and SD3.5 Large of harness.dit: the parallel queries of a file initialised from the model are exactly the
block's own queries (the recorded inputs, norms and rotary positions are the ones the model used), strength 0 is
bit-identical to unpatched sampling, CFG 1 and CFG > 1, batch 2 with one identity per image, a LoRA, a ControlNet,
files of another family refused, PVATextEncode's identity word in the T5 (and CLIP) sequences, and the trainers
(loss on a fixed probe, bit-exact resume, the saved file reloading to the same output)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from harness import dit
from harness.comfy_env import pack_module
from harness.dit import comfy_style_attention
from harness.nightly import only_nightly
from harness.tensors import close, relative_change
from personalization_nodes.attention.dispatcher import CHAIN_KEY, ProcessorChain
from personalization_nodes.attention.head_norm import HeadNorm
from personalization_nodes.attention.blocks import FLUX
from personalization_nodes.attention.joint import (LAYOUT_KEY, QUERY_INPUTS_KEY, JointAttentionDispatcher,
                                                   JointLayout, LayoutRecord, QueryInputs)
from personalization_nodes.attention.pva import JointParallelProjection, ParallelVisualAttentionProcessor
from test_calibrated_cross_attn_dit import flat, slow_softmax
from test_realcustom_dit import call_dispatcher

HEADS, DIM, HIDDEN = 2, 8, 12
GRID = (2, 3)
IMAGE = GRID[0] * GRID[1]
TEXT = 4
IDENTITY_TOKENS = 3
STRENGTH = 0.6
#: rank of the low-rank files of the real-ComfyUI tests (the family fixture's file is one)
LOW_RANK = 4


def projection(seed=0, norms=True):
    gen = torch.Generator().manual_seed(seed)
    out = JointParallelProjection(HIDDEN, HEADS * DIM, True, HeadNorm("rms", DIM) if norms else None,
                                  HeadNorm("rms", DIM) if norms else None).double()
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * (0.3 if p.ndim > 1 else 0.5) + (p.ndim == 1))
    return out.requires_grad_(False)


def rotations(batch, length, seed=5):
    """Flux-style position matrices (B, 1, L, d/2, 2, 2), random angles."""
    angles = torch.rand(batch, 1, length, DIM // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    return torch.stack([torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)], -2)


def slow_rms(vector, weight):
    rms = math.sqrt(sum(float(x.detach()) ** 2 for x in vector) / len(vector) + 1e-6)
    return torch.stack([vector[i] / rms * weight[i] for i in range(len(vector))])


def slow_rotate(vector, matrices):
    out = []
    for pair in range(len(vector) // 2):
        m = matrices[pair]
        a, b = vector[2 * pair], vector[2 * pair + 1]
        out += [m[0, 0] * a + m[0, 1] * b, m[1, 0] * a + m[1, 1] * b]
    return torch.stack(out)


def slow_pva_joint_attention(q, k, v, hidden, tokens, proj, positions, rows_with_identity, strength, text_probs=None):
    """(B, heads, L, d): every row of the joint attention; the latent's image rows of samples in
    ``rows_with_identity`` also attend to the identity keys, one head and query at a time. ``text_probs``, a
    (B, heads, IMAGE, TEXT) tensor, receives the image rows' probabilities of the text keys."""
    batch, heads, length, dim = q.shape
    out = torch.zeros_like(q)
    wq, bq = proj.to_visual_q.weight, proj.to_visual_q.bias
    wk, bk = proj.to_visual_k.weight, proj.to_visual_k.bias
    wv, bv = proj.to_visual_v.weight, proj.to_visual_v.bias
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * dim, (h + 1) * dim)
            id_keys, id_values = [], []
            for t in range(tokens.shape[1]):
                key = wk[cols] @ tokens[b, t] + bk[cols]
                id_keys.append(slow_rms(key, proj.key_norm.weight) if proj.key_norm is not None else key)
                id_values.append(wv[cols] @ tokens[b, t] + bv[cols])
            for row in range(length):
                logits = [float(q[b, h, row] @ k[b, h, key]) / math.sqrt(dim) for key in range(length)]
                values = [v[b, h, key] for key in range(length)]
                if TEXT <= row < TEXT + IMAGE and b in rows_with_identity:
                    query = wq[cols] @ hidden[b, row - TEXT] + bq[cols]
                    if proj.query_norm is not None:
                        query = slow_rms(query, proj.query_norm.weight)
                    if positions is not None:
                        query = slow_rotate(query, positions[b, 0, row])
                    logits += [float(query @ key) / math.sqrt(dim) + math.log(strength) for key in id_keys]
                    values += id_values
                probs = slow_softmax(logits)
                out[b, h, row] = sum(p * value for p, value in zip(probs, values))
                if text_probs is not None and TEXT <= row < TEXT + IMAGE:
                    text_probs[b, h, row - TEXT] = torch.tensor(probs[:TEXT], dtype=text_probs.dtype)
    return out


def pva_options(processor, cond_or_uncond, hidden, positions, block=("double", 0)):
    inputs = QueryInputs(FLUX.query_placement)
    inputs.image_tokens, inputs.positions = hidden, positions
    return {CHAIN_KEY: ProcessorChain().with_processor(processor), LAYOUT_KEY: LayoutRecord(JointLayout(TEXT, GRID)),
            QUERY_INPUTS_KEY: inputs, "cond_or_uncond": list(cond_or_uncond), "block_type": block[0],
            "block_index": block[1]}


def written_out_case(family, seed, **settings) -> SimpleNamespace:
    """A CFG batch (uncond then cond) of float64 q/k/v as the family hands them, the latent's hidden states, two
    identities (one per image of a chunk) and the options serving them to PVA's processor in the family's block."""
    batch, length = 4, TEXT + IMAGE
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (2 * torch.randn(batch, HEADS, length, DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    hidden = torch.randn(batch, IMAGE, HIDDEN, generator=gen, dtype=torch.float64)
    identities = torch.randn(2, IDENTITY_TOKENS, HIDDEN, generator=gen, dtype=torch.float64)
    proj = projection(norms=family == "flux")
    block = ("double", 0) if family == "flux" else ("joint", 0)
    processor = ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"_".join(map(str, (*block, 0))): proj}),
                                                 identities, strength=STRENGTH, **settings)
    positions = rotations(batch, length) if family == "flux" else None
    return SimpleNamespace(q=q, k=k, v=v, hidden=hidden, tokens_per_row=identities.repeat(2, 1, 1), proj=proj,
                           positions=positions, block=(*block, 0),
                           options=pva_options(processor, (1, 0), hidden, positions, block))


@pytest.mark.parametrize("uncond_identity", [False, True])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_joint_call_matches_the_written_out_parallel_attention(family, uncond_identity):
    """Flux: (B, heads, L, d) with skip_reshape, RMS-normed and rotated parallel queries; SD3 (no qk norm, as
    SD3.0): (B, L, heads*d) q/k, (B, L, heads, d) v, (B, heads, L, d) back. CFG batch uncond then cond, one
    identity per image of the chunk."""
    case = written_out_case(family, 1, uncond_identity=uncond_identity)
    q, k, v = case.q, case.k, case.v
    expected = slow_pva_joint_attention(q, k, v, case.hidden, case.tokens_per_row, case.proj, case.positions,
                                        {0, 1, 2, 3} if uncond_identity else {2, 3}, STRENGTH)
    out = call_dispatcher(family, q, k, v, case.options)
    torch.testing.assert_close(out, flat(expected), rtol=1e-9, atol=1e-9)
    changed = (out - call_dispatcher(family, q, k, v, {})).abs().amax(-1)  # (B, L)
    assert changed[2:, TEXT:].min() > 1e-3
    assert (changed[:2, TEXT:].min() > 1e-3) == uncond_identity


@pytest.mark.parametrize("text_view", [False, True], ids=["cross view", "text view"])
@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_maps_read_with_identity_keys_are_normalised_over_them_too(family, text_view, monkeypatch):
    """A map reader of the text columns next to PVA on the same block: its probabilities are the joint softmax's
    over text, image and identity keys, whether the cross view makes all logits or the text view only the text
    columns with the kernel's log-sum-exp (identity keys merged into it)."""
    from personalization_nodes.attention.token_maps import MapRecorder
    case = written_out_case(family, 2)
    recorder = MapRecorder(frozenset({case.block}))
    case.options[CHAIN_KEY] = case.options[CHAIN_KEY].with_processor(recorder)
    text_probs = torch.zeros(4, HEADS, IMAGE, TEXT, dtype=torch.float64)
    expected = slow_pva_joint_attention(case.q, case.k, case.v, case.hidden, case.tokens_per_row, case.proj,
                                        case.positions, {2, 3}, STRENGTH, text_probs)
    columns = []
    original_read = MapRecorder.read_probs
    monkeypatch.setattr(MapRecorder, "read_probs",
                        lambda self, probs, call: columns.append(probs.shape[-1]) or original_read(self, probs, call))
    out = call_dispatcher(family, case.q, case.k, case.v, case.options, exact_attention=text_view)
    assert columns == [TEXT if text_view else TEXT + IMAGE + IDENTITY_TOKENS]
    torch.testing.assert_close(out, flat(expected), rtol=1e-5, atol=1e-6)  # both views' logits are float32
    (maps,) = recorder.maps  # the cond rows' head mean, (b, T, rows, columns)
    torch.testing.assert_close(maps.double(), text_probs[2:].mean(1).transpose(1, 2).reshape(2, TEXT, *GRID),
                               rtol=1e-5, atol=1e-7)


def test_text_rows_and_rows_without_the_identity_are_the_plain_call_bit_for_bit():
    """At DiT head sizes torch's SDPA computes each query row on its own (see test_joint_attention)."""
    gen = torch.Generator().manual_seed(2)
    dim = 64
    q, k, v = (torch.randn(2, HEADS, TEXT + IMAGE, dim, generator=gen) for _ in range(3))
    proj = JointParallelProjection(HIDDEN, HEADS * dim, True, HeadNorm("rms", dim), HeadNorm("rms", dim))
    processor = ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"double_0_0": proj}),
                                                 torch.randn(1, IDENTITY_TOKENS, HIDDEN, generator=gen))
    angles = torch.rand(2, 1, TEXT + IMAGE, dim // 2, generator=gen)
    positions = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1),
                             torch.stack([angles.sin(), angles.cos()], -1)], -2)
    options = pva_options(processor, (1, 0), torch.randn(2, IMAGE, HIDDEN, generator=gen), positions)
    out = JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                     transformer_options=options)
    plain = comfy_style_attention(q, k, v, HEADS, skip_reshape=True)
    assert torch.equal(out[:, :TEXT], plain[:, :TEXT]) and torch.equal(out[0], plain[0])
    assert not torch.allclose(out[1, TEXT:], plain[1, TEXT:])


# ---------------------------------------------------------------- in the real ComfyUI, tiny Flux dev and SD3.5 Large

PROMPT = "photo of a <new1> person"
SAMPLING = dit.NODE_SAMPLING


class Family(dit.TinyFamily):
    prompt = "photo of a person"

    def __init__(self, name, comfy):
        from harness.pva_assets import dit_pva_weights, loaded_pva
        super().__init__(name)
        self.comfy = comfy
        self.pva = loaded_pva(dit_pva_weights(name, self.model, rank=LOW_RANK))

    def patched(self, model=None, pva=None, references=None, **over):
        from harness.pva_assets import PVA_DEFAULTS, faces, tiny_clip_vision
        from harness.pack_nodes import run_node
        return run_node("ParallelVisualAttention", model=self.model if model is None else model,
                        pva=self.pva if pva is None else pva,
                        references=faces(2, seed=4, size=32) if references is None else references,
                        clip_vision=tiny_clip_vision(), **{**PVA_DEFAULTS, **over})[0]


@pytest.fixture(scope="module", params=["flux", "sd35"])
def family(request, comfy):
    yield Family(request.param, comfy)
    dit.release(request.param)


@pytest.mark.parametrize("rank", [0, LOW_RANK], ids=["full rank", "low rank"])
def test_parallel_queries_of_an_initial_file_are_the_blocks_own(family, rank, monkeypatch):
    """Initialised from the model, to_visual_q with its norm (and Flux's rotary positions) gives exactly the
    queries the block hands to attention: the recorded inputs, the copied norms and the positions are the ones
    the model used, in every double/single/joint block. In low rank the block's own projection is read from the
    MODEL as sampled: with a LoRA applied, the queries are the LoRA'd block's own."""
    from harness.pva_assets import dit_pva_weights, loaded_pva
    joint = pack_module("attention.joint")
    compared = []
    original = joint.attention_with_extra_keys

    def comparing(q, k, v, call, extras):
        compared.append((call.block, float((extras[0].queries.float() - q.float()).abs().max()),
                         float(q.float().abs().max())))
        return original(q, k, v, call, extras)
    monkeypatch.setattr(joint, "attention_with_extra_keys", comparing)
    model = family.model
    if rank:
        model = family.comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, dit.lora_path(family.name).name,
                                                                              1.0)[0]
    family.sample(family.patched(model=model, pva=loaded_pva(
        dit_pva_weights(family.name, family.model, perturbed=False, rank=rank))), batch=1, cfg=1.0)
    blocks = {call_block for call_block, _, _ in compared}
    expected = ({("double", i, 0) for i in range(2)} | {("single", i, 0) for i in range(2)} if family.name == "flux"
                else {("joint", i, 0) for i in range(dit.SD35_DIT["depth"])})
    assert blocks == expected
    assert all(error <= 1e-5 * scale for _, error, scale in compared), compared


def test_low_rank_at_step_zero_samples_exactly_as_the_full_rank_copy(family):
    """The paper's initialisation kept: a fresh low-rank file (the block's own projections read at run time, a zero
    change) samples bit for bit as the full-rank copy of the same blocks."""
    from harness.pva_assets import dit_pva_weights, loaded_pva
    plain = family.sample(family.model)  # loads the plain model: an earlier test's LoRA is no longer merged into the
    # weights the full-rank copy is taken from
    full, low = (dit_pva_weights(family.name, family.model, perturbed=False, rank=rank) for rank in (0, LOW_RANK))
    assert low.rank == LOW_RANK and full.rank is None
    assert all(torch.equal(v, low.token_transformer.state_dict()[k]) for k, v in full.token_transformer.state_dict().items())
    with_low = family.sample(family.patched(pva=loaded_pva(low)))
    assert torch.equal(with_low, family.sample(family.patched(pva=loaded_pva(full))))
    assert relative_change(with_low, plain) > 1e-4, "the identity takes part"


def test_pva_v1_files_load_and_sample_as_before(family, comfy):
    """A full-rank file written as before low rank (format pva-v1, no rank or blocks metadata) loads through
    PVALoader and samples as those weights always did."""
    if family.name == "sd35":
        only_nightly("the file format does not depend on the family: checked on Flux by default")
    from safetensors.torch import save_file
    from harness.comfy_env import models_dir
    from harness.pack_nodes import run_node
    from harness.pva_assets import dit_pva_weights, loaded_pva
    weights = dit_pva_weights(family.name, family.model)
    tensors, metadata = weights.state_and_metadata()
    path = models_dir() / "pva" / f"old_pva_v1_{family.name}.safetensors"
    save_file(tensors, str(path), {"format": "pva-v1", **{k: metadata[k] for k in ("encoder", "heads", "family")}})
    comfy.folder_paths.filename_list_cache.clear()
    loaded = run_node("PVALoader", pva_name=path.name)[0]
    assert loaded.weights.rank is None and loaded.weights.block_selection == "all"
    assert torch.equal(family.sample(family.patched(pva=loaded)), family.sample(family.patched(pva=loaded_pva(weights))))


def test_a_block_selection_patches_those_blocks_and_reloads(family, comfy, monkeypatch):
    """A low-rank file on every 2nd block (Flux: double 0 and single 0 of the tiny model's four; SD3.5: joint 0
    and 2) gives identity keys to those blocks only; saved and reloaded it keeps its selection and its output."""
    if family.name == "sd35":
        only_nightly("the same selection code on another DiT family: checked on Flux by default")
    from harness.comfy_env import models_dir
    from harness.pack_nodes import run_node
    from harness.pva_assets import dit_pva_weights, loaded_pva
    save_pva = pack_module("attention.pva_weights").save_pva
    joint = pack_module("attention.joint")
    seen = set()
    original = joint.attention_with_extra_keys
    monkeypatch.setattr(joint, "attention_with_extra_keys",
                        lambda q, k, v, call, extras: seen.add(call.block) or original(q, k, v, call, extras))
    weights = dit_pva_weights(family.name, family.model, rank=LOW_RANK, block_selection="every_2")
    sampled = family.sample(family.patched(pva=loaded_pva(weights)))
    assert seen == ({("double", 0, 0), ("single", 0, 0)} if family.name == "flux" else {("joint", 0, 0), ("joint", 2, 0)})
    save_pva(models_dir() / "pva" / f"every_2_{family.name}.safetensors", weights)
    comfy.folder_paths.filename_list_cache.clear()
    loaded = run_node("PVALoader", pva_name=f"every_2_{family.name}.safetensors")[0]
    assert loaded.weights.block_selection == "every_2" and loaded.weights.rank == LOW_RANK
    assert torch.equal(family.sample(family.patched(pva=loaded)), sampled)


def test_strength_zero_is_unpatched_sampling_and_the_identity_changes_every_image(family):
    dit.check_strength_zero_is_unpatched(family, family.patched)


def test_the_two_exact_joint_softmaxes_sample_alike(family, monkeypatch):
    """The identity keys joined to the plain joint attention by its log-sum-exp (ComfyUI's exact CPU attention)
    or by widening the heads of ComfyUI's own call (what other attention functions get) sample the same."""
    merges = []
    merged = pack_module("attention.dispatcher").merged_joint_attention
    monkeypatch.setattr(pack_module("attention.dispatcher"), "merged_joint_attention",
                        lambda *args: merges.append(1) or merged(*args))
    by_logsumexp = family.sample(family.patched())
    assert merges, "ComfyUI's CPU attention takes the log-sum-exp merge"
    merges.clear()
    monkeypatch.setattr(pack_module("nodes.patching"), "computes_exact_attention", lambda attention, options: False)
    widened = family.sample(family.patched())
    assert not merges and close(widened, by_logsumexp, 1e-4)


def test_one_identity_per_image_and_the_uncond_rule(family):
    from harness.pva_assets import faces
    two = family.sample(family.patched(references=torch.cat([faces(2, seed=4, size=32), torch.zeros(2, 32, 32, 3)]),
                                       images_per_identity=2))
    first_twice = family.sample(family.patched(references=torch.cat([faces(2, seed=4, size=32)] * 2),
                                               images_per_identity=2))
    # image 0 sees the first identity in both; image 1 another one (the tiny token transformer's identities differ
    # little: the change is small but never zero)
    assert torch.equal(two[0], first_twice[0]) and relative_change(two[1], first_twice[1]) > 1e-7
    if family.name == "sd35":  # CFG > 1: the uncond pass sees the identity only with uncond_identity
        assert relative_change(family.sample(family.patched(uncond_identity=True)), family.sample(family.patched())) > 1e-4
    with pytest.raises(ValueError, match="3 identities but the latent batch has 2 images"):
        family.sample(family.patched(references=faces(3, seed=4, size=32), images_per_identity=1))


def test_a_lora_and_a_controlnet_in_the_same_graph(family):
    from harness.checkpoints import sample
    lora = family.comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(family.model, dit.lora_path(family.name).name,
                                                                        1.0)[0]
    with_lora = family.sample(lora)
    assert torch.equal(family.sample(family.patched(model=lora, strength=0.0)), with_lora)
    assert relative_change(family.sample(family.patched(model=lora)), with_lora) > 1e-3
    positive, negative = family.encode("photo of a person"), family.encode("")
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    apply = family.comfy.nodes.ControlNetApplyAdvanced().apply_controlnet
    controlled = (apply(positive, negative, dit.flux_controlnet(), hint, 1.0, 0.0, 1.0) if family.name == "flux" else
                  apply(positive, negative, dit.sd35_controlnet(), hint, 1.0, 0.0, 1.0, vae=dit.vae()))

    def sampled(model):
        return sample(model, *controlled, dit.empty_latent(2), seed=3, cfg=family.cfg, **SAMPLING)
    plain = sampled(family.model)
    assert torch.equal(sampled(family.patched(strength=0.0)), plain)
    assert relative_change(sampled(family.patched()), plain) > 1e-3


def test_files_of_another_family_are_refused(family, comfy):
    from harness.pva_assets import dit_pva_weights, loaded_pva, pva_path
    other = "sd35" if family.name == "flux" else "flux"
    foreign = loaded_pva(dit_pva_weights(other, dit.sd35_model("large") if other == "sd35" else dit.flux_model("dev")))
    names = {"flux": "Flux", "sd35": r"SD3/SD3\.5 \(MMDiT\)"}
    with pytest.raises(ValueError, match=rf"ParallelVisualAttention: tiny dit pva was trained for {names[other]} "
                                         rf"models, but this MODEL .* is a {names[family.name]} model"):
        family.patched(pva=foreign)
    from harness.pack_nodes import run_node
    unet = run_node("PVALoader", pva_name=pva_path("clip_vision", "sd15").name)[0]
    with pytest.raises(ValueError, match=r"trained for U-Net \(SD1\.5/SD2/SDXL\) models"):
        family.patched(pva=unet)


def test_the_identity_word_is_written_into_every_text_encoders_tokens(family):
    """PVATextEncode puts the learned vector in place of the placeholder in T5's sequence (the DiT's context) and
    in CLIP's (Flux: its pooled vector; SD3.5: also the context)."""
    import copy
    from harness.pack_nodes import run_node

    def encoded(pva):
        return run_node("PVATextEncode", clip=family.clip, pva=pva, text=PROMPT, identity_word="<new1>")[0]
    first = encoded(family.pva)
    changed = copy.deepcopy(family.pva.weights)
    with torch.no_grad():
        changed.identity_word["t5xxl"].add_(1.0)
    second = encoded(pack_module("nodes.pva").LoadedPVA("changed", changed, family.pva.patcher))
    assert relative_change(second[0][0], first[0][0]) > 1e-4, "the T5 sequence carries the identity word"
    with pytest.raises(ValueError, match="PVATextEncode: .*'<new2>' does not occur in the prompt"):
        run_node("PVATextEncode", clip=family.clip, pva=family.pva, text=PROMPT, identity_word="<new2>")


@pytest.mark.parametrize("stage1", [False, True], ids=["PVAIdentityTune", "PVATrainer"])
def test_trainers_lower_the_loss_resume_exactly_and_reload(family, stage1, tmp_path):
    """PVAIdentityTune and PVATrainer (stage 1: also the token transformer) on the DiT: the flow-matching loss of
    the model's own CONST sampling on a fixed probe goes down, an interrupted run resumes bit for bit, and the
    saved file (its family recorded) reloads through PVALoader to the same sampled output as the tuned
    weights."""
    if stage1 and family.name == "sd35":
        pytest.skip("stage 1 differs from the tune only in what trains (the token transformer), not by family; "
                    "run on Flux only to keep the suite in its time budget")
    if family.name == "sd35":
        only_nightly("the default run makes these checks on Flux: the same trainer on another DiT family")
    from harness.pack_nodes import run_node
    from harness.pva_assets import faces, tiny_clip_vision
    from harness.training_probes import interrupting_at, probe_loss
    nodes_tune, glue = pack_module("nodes.pva_training"), pack_module("nodes.training_glue")
    loop, runs = pack_module("training.loop"), pack_module("training.runs")
    vae = dit.vae()
    photos = faces(2, seed=6, size=64)

    def run(steps, checkpoint=None, interrupt_at=None):
        with glue.training_mode():
            tune = nodes_tune.prepare_training(family.model, family.clip, vae, family.pva, glue.clone_tensors(photos),
                                               ((0, 1),), stage1, 2, 1, tiny_clip_vision())
            assert tune.step.kind == "flow"
            before = probe_loss(tune.step, 50, 4, seed=99, micros=2)
            optimizer = nodes_tune.identity_tune_optimizer(tune.params, 3e-3, 3e-2, 1e-3 if stage1 else 0.0)
            checkpoints = checkpoint and runs.RunCheckpoints(checkpoint, tune.fingerprint)
            loop.train(tune.params, tune.step, optimizer, loop.LoopSettings(steps, 2, 1, 0, checkpoints),
                       check_interrupted=interrupting_at(interrupt_at))
            after = probe_loss(tune.step, 50, 4, seed=99, micros=2)
        return before, after, {k: v.detach().clone() for k, v in tune.params.items()}

    before, after, straight = run(4)
    assert after < before, f"loss on a fixed probe {before:.5f} -> {after:.5f}"
    assert any(k.startswith("identity_word.t5xxl") for k in straight), "the word is tuned in T5 too"
    assert any(k.startswith("token_transformer.") for k in straight) == stage1
    checkpoint = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        run(4, checkpoint, interrupt_at=4)
    _, _, resumed = run(4, checkpoint)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)
    if stage1:
        return  # the same file writer and loader as the tune's, below

    patched, tuned, name = run_node("PVAIdentityTune", model=family.model, clip=family.clip, vae=vae, pva=family.pva,
                                    photos=photos, name=f"dit_tune_{family.name}", steps=1, learning_rate=1e-3,
                                    word_learning_rate=1e-2, timestep_bins=1, seed=3, checkpoint_every=0,
                                    clip_vision=tiny_clip_vision(), resolution=64)
    loaded = run_node("PVALoader", pva_name=name)[0]
    assert loaded.weights.family == family.pva.weights.family
    assert torch.equal(family.sample(family.patched(pva=loaded, references=photos)), family.sample(patched))


def test_stage1_trainer_starts_from_the_dit_blocks(family):
    """A fresh PVATrainer start copies every block's projections and norms and trains at the block width."""
    from harness.pack_nodes import run_node
    from harness.pva_assets import faces, tiny_clip_vision
    training = pack_module("nodes.pva_training")
    initial = training.PVAWeights.initial
    import unittest.mock
    with unittest.mock.patch.object(training.PVAWeights, "initial", classmethod(
            lambda cls, *args, **kwargs: initial(*args, **{**kwargs, "layers": 1, "feedforward": 64}))):
        trained, _name = run_node(
            "PVATrainer", model=family.model, clip=family.clip, vae=dit.vae(), images=faces(4, seed=5, size=32),
            images_per_identity=2, name=f"stage1_{family.name}", encoder="clip_vision", steps=1, learning_rate=1e-4,
            transformer_learning_rate=1e-4, word_learning_rate=1e-3, timestep_bins=1, init_word="person", seed=0,
            checkpoint_every=0, clip_vision=tiny_clip_vision(), resolution=32)
    assert set(trained.weights.parallel) == set(family.pva.weights.parallel)
    assert trained.weights.family == family.pva.weights.family
    assert trained.weights.context_dim == family.pva.weights.context_dim
    assert set(trained.weights.identity_word) == set(family.pva.weights.identity_word)


def test_four_inference_techniques_compose_in_one_flux_graph(comfy):
    """SharedAttentionBatch + CalibratedCrossAttn + AdaptiveMaskGuidance + ParallelVisualAttention on one Flux
    model: one joint call serves them all (StyleAligned owns the image queries' softmax, the calibration edits and
    the word map read the cross view, which includes the identity keys, and the identity keys join the owner's
    softmax). Every order of the nodes gives one result; PVA at strength 0 gives the other three alone bit for bit;
    the identity changes every image."""
    from harness.pack_nodes import run_node, shared_attention
    from test_realcustom_dit import PROMPT as GUIDED_PROMPT
    from test_realcustom_dit import Family as GuidedFamily
    flux, guided = Family("flux", comfy), GuidedFamily("flux", comfy)

    def calibrated(model):
        return run_node("CalibratedCrossAttn", model=model, clip=flux.clip, prompt=GUIDED_PROMPT, modifiers="small, beach",
                        class_words="toy, photo", strength=1.0, start_percent=0.0, end_percent=1.0)[0]

    def sample(model):
        return guided.sample(model)
    others = sample(calibrated(shared_attention(guided.guided()[0])))
    orders = [flux.patched(model=calibrated(shared_attention(guided.guided()[0]))),
              guided.guided(model=calibrated(shared_attention(flux.patched())))[0],
              shared_attention(calibrated(guided.guided(model=flux.patched())[0]))]
    outputs = [sample(model) for model in orders]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    assert torch.equal(sample(flux.patched(model=calibrated(shared_attention(guided.guided()[0])), strength=0.0)), others)
    assert relative_change(outputs[0][0], others[0]) > 1e-4 and relative_change(outputs[0][1], others[1]) > 1e-4
    dit.release("flux")


def test_flux_fill_inpainting_with_its_inpainting_conditioning(comfy):
    """FLUX.1 Fill's layout (masked image and mask as input channels): InpaintModelConditioning feeds the sampled
    model as without the node (strength 0 bit-identical, the identity changes the inpainted images), and the
    identity tune trains on the Fill conditioning of its masked photos."""
    from harness.checkpoints import sample
    from harness.pack_nodes import run_node
    from harness.pva_assets import PVA_DEFAULTS, dit_pva_weights, faces, loaded_pva, tiny_clip_vision
    fill = dit.TinyFamily("flux")
    fill.model = dit.flux_model("fill")
    pva = loaded_pva(dit_pva_weights("flux", fill.model))
    photo, mask = faces(1, seed=8, size=64), torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    positive, negative, latent = comfy.nodes.InpaintModelConditioning().encode(
        fill.encode("photo of a person"), fill.encode(""), photo, dit.vae(), mask, True)

    def patched(strength):
        return run_node("ParallelVisualAttention", model=fill.model, pva=pva, references=faces(2, seed=4, size=32),
                        clip_vision=tiny_clip_vision(), **{**PVA_DEFAULTS, "strength": strength})[0]

    def sampled(model):
        return sample(model, positive, negative, latent, seed=3, cfg=1.0, **SAMPLING)
    plain = sampled(fill.model)
    assert torch.equal(sampled(patched(0.0)), plain)
    assert relative_change(sampled(patched(1.0)), plain) > 1e-3

    glue, nodes_tune, loop = (pack_module(m) for m in ("nodes.training_glue", "nodes.pva_training", "training.loop"))
    with glue.training_mode():
        tune = nodes_tune.prepare_identity_tune(fill.model, fill.clip, dit.vae(), pva, glue.clone_tensors(faces(2, seed=6)),
                                                bins=1, seed=0, clip_vision=tiny_clip_vision())
        photos = tune.step.photos
        c_concat = tune.step.concat(photos.latents[0, 0][None], photos.masked_latents[0, 0][None], photos.masks[0, 0][None])
        assert c_concat.shape[1] == 16 + 64, "masked-image latent and the folded mask"
        loss = tune.step(loop.MicroStep(0, 0, loop.micro_step_generator(0, 0, 0)))
        assert torch.isfinite(loss) and loss.requires_grad
    dit.release("flux")


def test_identity_keys_join_every_chunk_of_the_cross_view(monkeypatch):
    """With CalibratedCrossAttn on the same block the cross view serves the logits, identity columns included, in
    chunks of query rows: 1-row chunks give what one chunk of all rows gives; both edits take effect."""
    from personalization_nodes.attention.disendiff import CONTEXT_TOKENS_KEY
    from test_calibrated_cross_attn_dit import calibration
    joint = pack_module("attention.joint")
    gen = torch.Generator().manual_seed(3)
    length = 6 + IMAGE  # the calibration's 6-token prompt
    q, k, v = (2 * torch.randn(4, HEADS, length, DIM, generator=gen, dtype=torch.float64) for _ in range(3))
    hidden = torch.randn(4, IMAGE, HIDDEN, generator=gen, dtype=torch.float64)
    pva = ParallelVisualAttentionProcessor(torch.nn.ModuleDict({"double_0_0": projection()}),
                                           torch.randn(1, IDENTITY_TOKENS, HIDDEN, generator=gen, dtype=torch.float64),
                                           strength=STRENGTH)

    def run(chain):
        inputs = QueryInputs(FLUX.query_placement)
        inputs.image_tokens, inputs.positions = hidden, rotations(4, length)
        options = {CHAIN_KEY: chain, LAYOUT_KEY: LayoutRecord(JointLayout(6, GRID)), QUERY_INPUTS_KEY: inputs, CONTEXT_TOKENS_KEY: 6,
                   "cond_or_uncond": [1, 0], "block_type": "double", "block_index": 0}
        return JointAttentionDispatcher()(comfy_style_attention, q, k, v, HEADS, skip_reshape=True,
                                          transformer_options=options)
    both = ProcessorChain().with_processor(calibration()).with_processor(pva)
    whole = run(both)
    monkeypatch.setattr(joint, "CROSS_VIEW_CHUNK_BYTES", 1)
    torch.testing.assert_close(run(both), whole, rtol=1e-12, atol=1e-12)
    assert relative_change(whole, run(ProcessorChain().with_processor(calibration()))) > 1e-3
    assert relative_change(whole, run(ProcessorChain().with_processor(pva))) > 1e-3
