"""The token layout of a DiT model call read from what its first block receives, in the real ComfyUI with the
tiny Flux dev of harness.dit: ComfyUI's own USO style node (USOStyleReference, whose UsoStyleProjectorPatch goes
through Flux's ``post_input`` patch) puts style tokens in front of the prompt's text tokens, and another pack's
``post_input`` patch can put tokens on both sides. Every technique must then take the true split (text = the
style tokens + the prompt's, the prompt's own columns after the style tokens); where the streams were changed
so that the prompt's tokens cannot be found, sampling stops with an error naming the patch.

The written-out formulation (tests/test_joint_attention.py's slow StyleAligned, per sample, head and row) is
computed on the q/k/v the first double block's attention received, with the true split."""
from __future__ import annotations

import pytest
import torch

from harness import dit
from harness.comfy_env import pack_module
from harness.pack_nodes import run_node, shared_attention
from harness.tensors import relative_change
from test_joint_attention import slow_style_aligned_joint

#: style tokens the USO stand-in projector makes (the released one makes 64 per feature level)
STYLE_TOKENS = 9
#: tokens of the random prompts the samples are conditioned on
PROMPT_TOKENS = 24
#: Flux dev's tiny model: sampled at CFG 1 (one cond pass), 2 images, 8 x 8 latent = 16 image tokens
BATCH = 2
SAMPLING = dict(steps=2, sampler_name="euler", scheduler="simple", cfg=1.0)


class StyleProjector(torch.nn.Module):
    """The USO model patch's SigLIP projector, at the tiny model's width: (3 feature levels, B, tokens, width) ->
    (B, STYLE_TOKENS, hidden). Random weights, as every model of the harness."""

    def __init__(self, siglip_width: int, hidden: int):
        super().__init__()
        self.projection = dit.randomize_(torch.nn.Linear(siglip_width, hidden), seed=7, std=0.5)

    def forward(self, levels):
        return self.projection(levels.mean(0))[:, :STYLE_TOKENS]


def uso_styled(model):
    """``model`` with ComfyUI's USOStyleReference node applied: its real post_input patch, its model patch a
    ModelPatcher of the stand-in projector, the CLIP vision output of BATCH images (20 hidden layers)."""
    import comfy.clip_vision
    import comfy.model_patcher
    import nodes
    hidden = model.model.diffusion_model.hidden_size
    projector = comfy.model_patcher.ModelPatcher(StyleProjector(16, hidden), load_device=torch.device("cpu"),
                                                 offload_device=torch.device("cpu"))
    vision = comfy.clip_vision.Output()
    gen = torch.Generator().manual_seed(11)
    vision["all_hidden_states"] = torch.randn(BATCH, 20, STYLE_TOKENS + 3, 16, generator=gen)
    vision["penultimate_hidden_states"] = torch.randn(BATCH, STYLE_TOKENS + 3, 16, generator=gen)
    return nodes.NODE_CLASS_MAPPINGS["USOStyleReference"]().apply_patch(model, projector, vision)[0]


class Bracketing:
    """Another pack's post_input patch: ``before`` tokens in front of the text, ``after`` behind it (positions
    of zero, as USO gives its tokens)."""

    def __init__(self, before: int, after: int, hidden: int):
        gen = torch.Generator().manual_seed(5)
        self.before, self.after = (torch.randn(1, n, hidden, generator=gen) for n in (before, after))

    def __call__(self, streams):
        txt, ids = streams["txt"], streams["txt_ids"]
        batch = txt.shape[0]
        txt = torch.cat([self.before.expand(batch, -1, -1).to(txt), txt, self.after.expand(batch, -1, -1).to(txt)], 1)
        zeros = [ids.new_zeros(batch, t.shape[1], ids.shape[2]) for t in (self.before, self.after)]
        return {**streams, "txt": txt, "txt_ids": torch.cat([zeros[0], ids, zeros[1]], 1)}


class ScalingText:
    """Another pack's post_input patch that changes the prompt's tokens themselves."""

    def __call__(self, streams):
        return {**streams, "txt": streams["txt"] * 1.5}


def with_post_input(model, patch):
    patched = model.clone()
    patched.set_model_post_input_patch(patch)
    return patched


class SeenCalls:
    """The joint dispatcher's calls while sampling: their q/k/v, output, layout and block."""

    def __init__(self, monkeypatch):
        self.calls = []
        joint = pack_module("attention.joint")
        original = joint.JointAttentionDispatcher.__call__
        seen = self

        def spying(dispatcher, func, *args, **kwargs):
            out = original(dispatcher, func, *args, **kwargs)
            options = kwargs.get("transformer_options") or {}
            record = options.get(joint.LAYOUT_KEY)
            seen.calls.append({"qkv": args[:3], "out": out, "skip_reshape": kwargs.get("skip_reshape"),
                               "layout": record.layout if record is not None else None,
                               "block": (options.get("block_type"), options.get("block_index"))})
            return out
        monkeypatch.setattr(joint.JointAttentionDispatcher, "__call__", spying)

    def layouts(self) -> list:
        """The distinct layouts the calls were served with (slices do not hash: a list)."""
        distinct = []
        for call in self.calls:
            if call["layout"] is not None and call["layout"] not in distinct:
                distinct.append(call["layout"])
        return distinct


@pytest.fixture(scope="module")
def flux(comfy):
    yield dit.TinyFamily("flux")
    dit.release("flux")


def prompts():
    return (dit.conditioning("flux", batch=BATCH, seed=0, tokens=PROMPT_TOKENS, guidance=3.5),
            dit.conditioning("flux", batch=1, seed=100, tokens=PROMPT_TOKENS, guidance=3.5))


def sample(model):
    from harness.checkpoints import sample as sample_model
    positive, negative = prompts()
    return sample_model(model, positive, negative, dit.empty_latent(BATCH), seed=3, **SAMPLING)


def true_layout(before: int, after: int = 0):
    joint = pack_module("attention.joint")
    return joint.JointLayout(before + PROMPT_TOKENS + after, (4, 4), slice(before, before + PROMPT_TOKENS))


def test_shared_attention_after_uso_equals_the_written_out_formulation_on_the_true_split(flux, monkeypatch):
    seen = SeenCalls(monkeypatch)
    styled = uso_styled(flux.model)
    assert relative_change(sample(styled), sample(flux.model)) > 1e-3, "the USO patch must change the images"
    for model in (shared_attention(styled), uso_styled(shared_attention(flux.model))):
        seen.calls.clear()
        sample(model)
        assert seen.layouts() == [true_layout(STYLE_TOKENS)]
        first = next(call for call in seen.calls if call["block"] == ("double", 0))
        q, k, v = (t.double() for t in first["qkv"])
        expected = slow_style_aligned_joint(q, k, v, 1, pack_module("attention.style_aligned").StyleAlignedSettings(),
                                            text=STYLE_TOKENS + PROMPT_TOKENS)
        out = first["out"].double().unflatten(-1, (q.shape[1], -1)).transpose(1, 2)
        error = (out - expected).abs().max() / expected.abs().max()
        assert error < 1e-5, f"relative error {error:.2e} against the written-out formulation"
        # and not what the split of the conditioning alone would give (the style tokens shared as image tokens)
        wrong = slow_style_aligned_joint(q, k, v, 1, pack_module("attention.style_aligned").StyleAlignedSettings(),
                                         text=PROMPT_TOKENS)
        assert (out - wrong).abs().max() / expected.abs().max() > 1e-3


def test_four_techniques_with_uso_or_another_packs_tokens_take_the_true_split(comfy, monkeypatch):
    """SharedAttentionBatch + CalibratedCrossAttn + AdaptiveMaskGuidance + ParallelVisualAttention on one Flux
    model with ComfyUI's USO style tokens (in front of the prompt's) or another pack's tokens on both sides:
    every joint call takes the text as all of them and the prompt's columns after the tokens in front (their
    written-out checks on such a layout: test_realcustom_dit, test_calibrated_cross_attn_dit, test_pva_dit);
    the techniques still change every image."""
    from test_pva_dit import Family as IdentityFamily
    from test_realcustom_dit import PROMPT as GUIDED_PROMPT
    from test_realcustom_dit import Family as GuidedFamily
    identity, guided = IdentityFamily("flux", comfy), GuidedFamily("flux", comfy)
    prompt_tokens = guided.encode(GUIDED_PROMPT)[0][0].shape[1]
    hidden = guided.model.model.diffusion_model.hidden_size

    def four(model):
        calibrated = run_node("CalibratedCrossAttn", model=shared_attention(model), clip=guided.clip,
                              prompt=GUIDED_PROMPT, modifiers="small, beach", class_words="toy, photo", strength=1.0,
                              start_percent=0.0, end_percent=1.0)[0]
        return identity.patched(model=guided.guided(model=calibrated)[0])
    seen = SeenCalls(monkeypatch)
    cases = {"USO": (uso_styled, STYLE_TOKENS, 0),
             "tokens on both sides": (lambda model: with_post_input(model, Bracketing(5, 3, hidden)), 5, 3)}
    for name, (patch, before, after) in cases.items():
        for model in (four(patch(guided.model)), patch(four(guided.model))):
            seen.calls.clear()
            patched = guided.sample(model)
            layout = pack_module("attention.joint").JointLayout(before + prompt_tokens + after, (4, 4),
                                                                slice(before, before + prompt_tokens))
            assert seen.layouts() == [layout], name
        assert relative_change(patched, guided.sample(patch(guided.model))) > 1e-3, name
    dit.release("flux")


def test_streams_changed_past_recognition_are_refused_naming_the_patch(flux):
    with pytest.raises(Exception, match=r"do not hold the prompt's 24 conditioning tokens unchanged; the post_input "
                                        r"patch ScalingText \(from test_joint_layout\) changed them"):
        sample(shared_attention(with_post_input(flux.model, ScalingText())))
    assert torch.isfinite(sample(with_post_input(flux.model, ScalingText()))).all(), "unpatched, the patch just runs"
