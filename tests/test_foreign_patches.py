"""Our nodes next to other packs' attention patches, in real graphs run by ComfyUI's executor.

Two foreign nodes are registered with ComfyUI for these tests (they are test doubles of OTHER packs,
not of ComfyUI):
- ``ForeignImagePrompt`` patches every attn2 the way IPAdapter_plus / InstantID / PuLID do: an
  ``Attn2Replace``-style object at ``(block name, id)`` (SD1.x), or ``.add(callback, **kwargs)`` on the
  replace already there; its callback adds attention to its own "image tokens".
- ``ForeignAttentionReplace`` installs a plain attn2 replace function (no additive protocol).
"""
import pytest
import torch
from PIL import Image

from harness import checkpoints
from harness import realcustom as realcustom_assets
from harness.additive_replace import AdditiveAttn2Replace
from harness.comfy_env import pack_module
from harness.workflows import WorkflowExecutionError, execute_workflow

STEPS, SIZE = 2, 64
PROMPT = "photo of a sks man and a zwx woman with a toy"


def image_attention(out, q, k, v, extra_options, weight=1.0, **_):
    """Attention of the layer's queries to 4 fixed random "image tokens" of the query width."""
    import comfy.ldm.modules.attention as comfy_attention
    tokens = torch.randn(1, 4, q.shape[-1], generator=torch.Generator().manual_seed(q.shape[-1])).to(q)
    tokens = tokens.expand(q.shape[0], -1, -1)
    return weight * comfy_attention.optimized_attention(q, tokens, tokens, extra_options["n_heads"])


def one_transformer_block_keys(model):
    blocks = pack_module("attention.blocks").discover_transformer_blocks(model.get_model_object("diffusion_model").named_modules())
    return [block.key[:2] for block in blocks if block.has_cross_attention]


class ForeignModelPatch:
    """A legacy-API node of another pack: MODEL in, patched MODEL out."""
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "tests/foreign"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}


class ForeignImagePrompt(ForeignModelPatch):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "weight": ("FLOAT", {"default": 1.0})}}

    def apply(self, model, weight):
        import comfy.ldm.modules.attention as comfy_attention

        patched = model.clone()
        kwargs = {"weight": weight, "sigma_start": float("inf"), "sigma_end": 0.0}
        for key in one_transformer_block_keys(patched):
            options = patched.model_options["transformer_options"].copy()
            options["patches_replace"] = dict(options.get("patches_replace", {}))
            options["patches_replace"]["attn2"] = dict(options["patches_replace"].get("attn2", {}))
            if key in options["patches_replace"]["attn2"]:
                options["patches_replace"]["attn2"][key].add(image_attention, **kwargs)
            else:
                options["patches_replace"]["attn2"][key] = AdditiveAttn2Replace(comfy_attention.optimized_attention,
                                                                                image_attention, **kwargs)
                patched.model_options["transformer_options"] = options
        return (patched,)


def doubled_attention(q, k, v, extra_options):
    import comfy.ldm.modules.attention as comfy_attention
    return 2.0 * comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])


class ForeignAttentionReplace(ForeignModelPatch):
    def apply(self, model):
        patched = model.clone()
        for name, block_id in one_transformer_block_keys(patched):
            patched.set_model_attn2_replace(doubled_attention, name, block_id)
        return (patched,)


@pytest.fixture(scope="module")
def foreign_nodes(comfy):
    added = {"ForeignImagePrompt": ForeignImagePrompt, "ForeignAttentionReplace": ForeignAttentionReplace}
    comfy.nodes.NODE_CLASS_MAPPINGS.update(added)
    yield
    for name in added:
        comfy.nodes.NODE_CLASS_MAPPINGS.pop(name)


@pytest.fixture(scope="module")
def reference_image(comfy):
    name = "foreign_patches_reference.png"
    pixels = torch.Generator().manual_seed(5)
    array = (torch.rand(SIZE, SIZE, 3, generator=pixels) * 255).to(torch.uint8).numpy()
    Image.fromarray(array).save(f"{comfy.folder_paths.get_input_directory()}/{name}")
    return name


def technique_nodes(technique: str, model_source: list, reference_image: str) -> dict:
    """API nodes of one of our techniques on ``model_source``; its MODEL output is node "ours"."""
    if technique == "SharedAttentionBatch":
        from harness.pack_nodes import SHARED_ATTENTION_DEFAULTS
        return {"ours": {"class_type": "SharedAttentionBatch", "inputs": {"model": model_source, **SHARED_ATTENTION_DEFAULTS}}}
    if technique == "CalibratedCrossAttn":
        return {"ours": {"class_type": "CalibratedCrossAttn", "inputs": {
            "model": model_source, "clip": ["ckpt", 1], "prompt": PROMPT, "modifiers": "sks, zwx",
            "class_words": "man, woman", "strength": 2.0, "start_percent": 0.0, "end_percent": 1.0}}}
    assert technique == "AdaptiveMaskGuidance"
    return {
        "adapter": {"class_type": "RealCustomLoader",
                    "inputs": {"adapter_name": realcustom_assets.sd15_workflow_adapter_path().name}},
        "vision": {"class_type": "CLIPVisionLoader",
                   "inputs": {"clip_name": realcustom_assets.vitl_clip_vision_path().name}},
        "image": {"class_type": "LoadImage", "inputs": {"image": reference_image}},
        "reference": {"class_type": "RealCustomEncodeReference",
                      "inputs": {"adapter": ["adapter", 0], "clip_vision": ["vision", 0], "image": ["image", 0],
                                 "crop": False}},
        "ours": {"class_type": "AdaptiveMaskGuidance", "inputs": {
            "model": model_source, "reference": ["reference", 0], "clip": ["ckpt", 1], "prompt": PROMPT,
            "word": "toy", "mask_strategy": "max_norm", "mask_scope": 0.25, "binary_mask": False,
            "update_fraction": 1.0, "map_source": "previous step", "uncond_image": "black image", "strength": 1.0,
            "scope_selection": "top-k", "guidance": "CFG (released code)", "image_guidance": 12.5}},
    }


def graph(chain: list[str], technique: str, reference_image: str) -> dict:
    """txt2img on the tiny SD1.5 with the model going through ``chain`` ("ours" / foreign node ids)."""
    api = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoints.sd15_checkpoint_path().name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
    }
    source = ["ckpt", 0]
    for step in chain:
        if step == "ours":
            api.update(technique_nodes(technique, source, reference_image))
            source = ["ours", 0]
        else:
            inputs = {"model": source, "weight": 1.0} if step == "ForeignImagePrompt" else {"model": source}
            api[step] = {"class_type": step, "inputs": inputs}
            source = [step, 0]
    api["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": source, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "seed": 3,
        "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    api["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "foreign"}}
    return api


def sampled(api: dict, node: str = "sampler") -> torch.Tensor:
    return execute_workflow(api)[node].outputs[0][0]["samples"]


TECHNIQUES = ["SharedAttentionBatch", "AdaptiveMaskGuidance", "CalibratedCrossAttn"]


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_ipadapter_style_patch_composes_with_ours_in_either_order(foreign_nodes, reference_image, technique):
    run = {tuple(chain): sampled(graph(chain, technique, reference_image)) for chain in
           (["ours"], ["ForeignImagePrompt"], ["ours", "ForeignImagePrompt"], ["ForeignImagePrompt", "ours"])}
    both = run[("ours", "ForeignImagePrompt")]
    assert (both - run[("ForeignImagePrompt", "ours")]).abs().max() <= 1e-5, "the order of the two nodes matters"
    assert (both - run[("ours",)]).abs().max() > 1e-3, "the foreign patch was dropped"
    assert (both - run[("ForeignImagePrompt",)]).abs().max() > 1e-3, f"{technique} was dropped"


def test_foreign_patch_added_after_ours_stays_in_its_own_branch(foreign_nodes, reference_image):
    alone = sampled(graph(["ours"], "CalibratedCrossAttn", reference_image))
    api = graph(["ours", "ForeignImagePrompt"], "CalibratedCrossAttn", reference_image)
    api["plain_sampler"] = {**api["sampler"], "inputs": {**api["sampler"]["inputs"], "model": ["ours", 0]}}
    api["plain_save"] = {**api["save"], "inputs": {**api["save"]["inputs"], "samples": ["plain_sampler", 0]}}
    results = execute_workflow(api)
    assert torch.equal(results["plain_sampler"].outputs[0][0]["samples"], alone)
    assert not torch.equal(results["sampler"].outputs[0][0]["samples"], alone)


def test_plain_foreign_replace_before_an_additive_technique_is_wrapped(foreign_nodes, reference_image):
    foreign = sampled(graph(["ForeignAttentionReplace"], "AdaptiveMaskGuidance", reference_image))
    ours = sampled(graph(["ours"], "AdaptiveMaskGuidance", reference_image))
    both = sampled(graph(["ForeignAttentionReplace", "ours"], "AdaptiveMaskGuidance", reference_image))
    assert (both - foreign).abs().max() > 1e-3 and (both - ours).abs().max() > 1e-3


def test_plain_foreign_replace_before_a_softmax_edit_is_a_clear_error(foreign_nodes, reference_image):
    with pytest.raises(WorkflowExecutionError, match=r"CalibratedCrossAttn.*cannot be combined with another node "
                                                     r"pack's attention patch \(doubled_attention from test_foreign"):
        sampled(graph(["ForeignAttentionReplace", "ours"], "CalibratedCrossAttn", reference_image))


@pytest.mark.parametrize("technique", TECHNIQUES[1:])
def test_plain_foreign_replace_after_ours_is_refused_not_silently_dropped(foreign_nodes, reference_image, technique):
    with pytest.raises(WorkflowExecutionError, match=rf"doubled_attention from test_foreign.*after .*{technique}.*"
                                                     r"would silently do nothing"):
        sampled(graph(["ours", "ForeignAttentionReplace"], technique, reference_image))


class WrappedNorm(torch.nn.Module):
    """Another pack's object patch that keeps the original GroupNorm as a child (``.norm``)."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x)


class ForeignNormWrapper(ForeignModelPatch):
    def apply(self, model):
        patched = model.clone()
        tree = patched.get_model_object("diffusion_model")
        for path, module in list(tree.named_modules()):
            if isinstance(module, torch.nn.GroupNorm):
                patched.add_object_patch(f"diffusion_model.{path}", WrappedNorm(module))
        return (patched,)


def norm_graph(model_node: dict | None, seed: int) -> dict:
    """txt2img on the tiny SD1.5 through ``model_node`` (a node taking ``model``), batch 2, 2 steps."""
    api = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoints.sd15_checkpoint_path().name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a toy train, origami"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 2}},
        "patch": {**model_node, "inputs": {**model_node["inputs"], "model": ["ckpt", 0]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["patch", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "norms"}},
    }
    return api


def test_group_norm_sharing_after_a_foreign_norm_wrapper_was_loaded(comfy):
    """ComfyUI leaves the last sampled clone's object patches applied: SharedAttentionBatch must patch the
    loaded GroupNorms, not the children of another pack's wrappers (was: AttributeError '...norm')."""
    from harness.pack_nodes import SHARED_ATTENTION_DEFAULTS
    from harness.workflows import new_executor

    comfy.nodes.NODE_CLASS_MAPPINGS["ForeignNormWrapper"] = ForeignNormWrapper
    try:
        shared = {"class_type": "SharedAttentionBatch", "inputs": {**SHARED_ATTENTION_DEFAULTS, "share_group_norm": True}}
        executor = new_executor()
        execute_workflow(norm_graph({"class_type": "ForeignNormWrapper", "inputs": {}}, seed=1), executor=executor)
        after_foreign = execute_workflow(norm_graph(shared, seed=1), executor=executor)
        alone = execute_workflow(norm_graph(shared, seed=1), executor=new_executor())
    finally:
        comfy.nodes.NODE_CLASS_MAPPINGS.pop("ForeignNormWrapper")
    assert torch.equal(after_foreign["sampler"].outputs[0][0]["samples"], alone["sampler"].outputs[0][0]["samples"])
