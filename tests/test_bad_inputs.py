"""The bad-input matrix (issue 7, Hardening): every case is a user mistake or a damaged file, run through the
registered node in the real ComfyUI, and must end in a clear error that names the node and the problem (never a
bare KeyError/IndexError/RuntimeError from torch, never a silent no-op) and write nothing at all.

Categories, per technique where they apply: wrong model family, mismatched batch/latent sizes, missing words,
NaN/inf inputs, empty datasets, corrupt, pickled, integer or wrong-width files (embeddings included), and output names
that are not plain names (``../``, absolute paths, spaces, nothing usable): refused, never cleaned into another name.

Every case runs in a sandbox: private model folders registered with ComfyUI's own ``add_model_folder_path`` (as
extra_model_paths.yaml would) and a private output folder, so damaged files stay out of the shared test cache
(except embeddings: a stock CLIP only searches the folders it was loaded with, so those get per-process names there
and are removed after the test) and the whole temp tree can be compared before and after. Single cases already covered elsewhere (tests/test_*_nodes.py)
are not repeated here.

What the user reads is checked through ComfyUI's own executor too (the section "through the executor"): the error
names the node as the user sees it (never the executor's ``<class>Clone``) with a builtin exception type, and a NaN
typed into a FLOAT widget, which passes ComfyUI's min/max check, is refused before the node runs.
"""
from __future__ import annotations

import asyncio
import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.checkpoints import empty_latent, encode_prompt, sample
from harness.comfy_env import boot_comfy, pack_module
from harness.memory import model_cache
from harness.pack_nodes import SHARED_ATTENTION_DEFAULTS, run_node
from harness.text_encoders import sdxl_tokenizer_clip
from harness.workflows import WorkflowExecutionError, execute_workflow, new_executor
from personalization_nodes.training import exporters, naming

NAN = float("nan")
#: embedding names of this process (the files go to the shared embeddings folder, see Sandbox.embedding_file)
BROKEN, POISONED, NARROW, INTEGER, PICKLED, SD15 = (f"bad_input_{os.getpid()}_{kind}" for kind in
                                                    ("broken", "poisoned", "narrow", "integer", "pickled", "sd15"))
ARCFACE_FILE = "ms1mv3_arcface_r50.safetensors"
MODEL_FOLDERS = ("realcustom", "pva", "embeddings", "loras")
CHECKPOINT_FOLDERS = {"RealCustomTrainer": "realcustom_checkpoints", "PVATrainer": "pva_checkpoints",
                      "PVAIdentityTune": "pva_checkpoints", "DisenDiffTrainer": "disendiff_checkpoints",
                      "DecoupledTokenTrainer": "detex_checkpoints"}


# ---- inputs ----------------------------------------------------------------------------------------------------

def photos(count=2, size=64, seed=0):
    return torch.rand(count, size, size, 3, generator=torch.Generator().manual_seed(seed))


def poisoned(tensor, value=NAN):
    """A copy of ``tensor`` with one element set to NaN (or inf)."""
    out = tensor.clone()
    out.view(-1)[out.numel() // 2] = value
    return out


def subject(count=3, size=64):
    """DETEX training data: a coloured box on a plain background, its mask."""
    images, masks = torch.full((count, size, size, 3), 0.85), torch.zeros(count, size, size)
    for i in range(count):
        images[i, 8 + 6 * i:32 + 6 * i, 10 + 9 * i:30 + 9 * i] = torch.tensor([0.7, 0.2, 0.1])
        masks[i, 8 + 6 * i:32 + 6 * i, 10 + 9 * i:30 + 9 * i] = 1
    return images, masks


@model_cache
def flux_model():
    """A tiny random Flux (DiT) ModelPatcher, the family the pack refuses."""
    boot_comfy()
    from comfy import model_management as mm, model_patcher, supported_models
    config = supported_models.Flux({"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
                                    "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0,
                                    "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12],
                                    "theta": 10000, "qkv_bias": True, "guidance_embed": False})
    return model_patcher.ModelPatcher(config.get_model({}), load_device=mm.get_torch_device(),
                                      offload_device=mm.unet_offload_device())


#: tiny configs of families ComfyUI ships with Flux's block names that no adapter takes, for ComfyUI's own model
#: classes
LOOKALIKE_CONFIGS = {
    "HunyuanImage21": {"image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None,
                       "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
                       "depth_single_blocks": 1, "axes_dim": [16, 16], "theta": 256, "patch_size": [1, 1],
                       "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
                       "use_cond_type_embedding": False, "vision_in_dim": None},
}


@model_cache
def lookalike_model(family: str):
    """A tiny random ModelPatcher of ComfyUI's own model class of ``family`` (HunyuanImage 2.1): Flux's block names,
    another family."""
    boot_comfy()
    from comfy import model_management as mm, model_patcher, supported_models
    if not hasattr(supported_models, family):
        pytest.skip(f"this ComfyUI has no {family} model to refuse")
    config = getattr(supported_models, family)(LOOKALIKE_CONFIGS[family])
    return model_patcher.ModelPatcher(config.get_model({}), load_device=mm.get_torch_device(),
                                      offload_device=mm.unet_offload_device())


def edm_sampled(model):
    """``model`` sampled as an EDM model (σ_data 0.5): neither variance preserving nor rectified flow."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM
    return ModelSamplingContinuousEDM().patch(model, "edm", 80.0, 0.002)[0]


def refuses_dit(node: str) -> str:
    """The message of a U-Net-only node given a DiT model: it names the model's family and the node's families."""
    return rf"this MODEL is a Flux model; {node} supports U-Net \(SD1\.5/SD2/SDXL\) models"


# ---- damaged files -----------------------------------------------------------------------------------------------

def truncated_copy(source: Path, target: Path) -> str:
    data = source.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    return target.name


def pickle_file(target: Path) -> str:
    torch.save({"weight": torch.zeros(2, 2)}, target)
    return target.name


def text_file(target: Path) -> str:
    target.write_text("this is not a model, only a text file renamed to .safetensors\n")
    return target.name


def nan_copy(source: Path, target: Path) -> str:
    from safetensors import safe_open
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(source))
    key = next(k for k, t in sorted(tensors.items()) if t.is_floating_point() and t.numel() > 1)
    tensors[key] = poisoned(tensors[key])
    save_file(tensors, str(target), metadata=metadata)
    return target.name


def nan_embedding(target: Path) -> str:
    """A stock-layout embedding file ({"clip_l": [1, 768]}) whose vector holds NaN."""
    save_file({"clip_l": poisoned(torch.zeros(1, 768))}, str(target))
    return target.name


def sd15_embedding(target: Path) -> str:
    """A sound SD1.x embedding file: one CLIP-L vector, nothing for SDXL's CLIP-G."""
    save_file({"clip_l": torch.randn(1, 768)}, str(target))
    return target.name


def narrow_embedding(target: Path) -> str:
    """A 512-wide embedding in the clip_l slot (CLIP-L reads 768): ComfyUI drops such a word from the prompt."""
    save_file({"clip_l": torch.randn(1, 512)}, str(target))
    return target.name


def integer_embedding(target: Path) -> str:
    """An embedding of int8 values (a quantized or damaged file)."""
    save_file({"clip_l": torch.ones(1, 768, dtype=torch.int8)}, str(target))
    return target.name


class LeavesMarker:
    """Unpickling this object (with the full pickle, which runs code) creates the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "a")


def pickled_embedding(target: Path, marker: Path) -> str:
    """A torch pickle .pt embedding whose unpickling would create ``marker``. ComfyUI's weights-only load refuses
    it, and its loader then ends in an UnboundLocalError."""
    torch.save({"clip_l": LeavesMarker(marker)}, target)
    return target.name


def int8_copy(source: Path, target: Path) -> str:
    """``source`` with every floating-point weight stored as int8 (a quantized file without its scales)."""
    from safetensors import safe_open
    with safe_open(str(source), "pt") as f:
        metadata = f.metadata()
    tensors = {k: (t * 100).to(torch.int8) if t.is_floating_point() else t for k, t in load_file(str(source)).items()}
    save_file(tensors, str(target), metadata=metadata)
    return target.name


# ---- the sandbox --------------------------------------------------------------------------------------------------

class Sandbox:
    """Private models/<kind> folders (first in ComfyUI's search order, so trainers write there) and a private output
    folder; ``changes()`` lists every file created, changed or deleted under the watched roots since ``snapshot()``."""

    def __init__(self, root: Path, watched: list[Path]):
        self.root, self.watched = root, watched
        self.models = {kind: root / "models" / kind for kind in MODEL_FOLDERS}
        self.output = root / "output"
        self._before: dict[Path, tuple[int, int]] = {}
        self.leftovers: list[Path] = []

    def model_file(self, kind: str, name: str) -> Path:
        return self.models[kind] / name

    def embedding_file(self, clip, stem: str, suffix: str = ".safetensors") -> Path:
        """Where ``clip`` looks for ``embedding:<stem>``: a stock CLIP copies the embeddings folder list when it
        loads, so that is the shared test cache, not the sandbox; the file is removed when the test ends."""
        path = Path(clip.tokenizer.clip_l.embedding_directory[0]) / f"{stem}{suffix}"
        self.leftovers.append(path)
        return path

    def checkpoint_files(self, node: str, stem: str) -> list[Path]:
        """The resume checkpoints a trainer wrote for output ``stem`` (``output/<technique>_checkpoints/<stem>/``)."""
        return sorted((self.output / CHECKPOINT_FOLDERS[node] / stem).glob("*.safetensors"))

    def _state(self) -> dict[Path, tuple[int, int]]:
        state = {}
        for root in self.watched:
            for path in root.rglob("*"):
                if path.is_file():
                    stat = path.stat()
                    state[path] = (stat.st_size, stat.st_mtime_ns)
        return state

    def snapshot(self) -> None:
        self._before = self._state()

    def changes(self) -> list[Path]:
        after = self._state()
        return sorted(p for p in set(after) | set(self._before) if after.get(p) != self._before.get(p))


@pytest.fixture
def sandbox(comfy, tmp_path, tmp_path_factory):
    folder_paths = comfy.folder_paths
    box = Sandbox(tmp_path, [tmp_path_factory.getbasetemp(), comfy.run_dir])
    for kind, path in box.models.items():
        path.mkdir(parents=True)
        folder_paths.add_model_folder_path(kind, str(path), is_default=True)
    box.output.mkdir()
    old_output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(box.output))
    folder_paths.filename_list_cache.clear()
    yield box
    for path in box.leftovers:
        path.unlink(missing_ok=True)
    folder_paths.set_output_directory(old_output)
    for kind, path in box.models.items():
        folder_paths.folder_names_and_paths[kind][0].remove(str(path))
    folder_paths.filename_list_cache.clear()


# ---- models and default inputs of every node ----------------------------------------------------------------------

class Kit:
    """The tiny models (built on first use) and each node's valid inputs, which a case overrides."""

    def __init__(self, comfy, sd15, sdxl_model):
        self.comfy, self.sd15, self.sdxl = comfy, sd15, sdxl_model

    @property
    def sdxl_clip(self):
        """SDXL's tokenizers (CLIP-L 768 + CLIP-G 1280), reading the embeddings folders of the SD1.5 CLIP."""
        return sdxl_tokenizer_clip(tuple(self.sd15[1].tokenizer.clip_l.embedding_directory))

    @functools.cached_property
    def pva_file(self) -> Path:
        from harness.pva_assets import arcface_path, pva_path
        arcface_path()
        return pva_path("arcface")

    @functools.cached_property
    def pva(self):
        return run_node("PVALoader", pva_name=self.pva_file.name)[0]

    @functools.cached_property
    def adapter_file(self) -> Path:
        from harness.realcustom import TINY_CLIP_VISION, adapter_path
        blocks = pack_module("nodes.patching").transformer_blocks(self.sd15[0])
        return adapter_path("test_realcustom_sd15_v1.safetensors", blocks, TINY_CLIP_VISION["hidden_size"], 768)

    @functools.cached_property
    def adapter(self):
        return run_node("RealCustomLoader", adapter_name=self.adapter_file.name)[0]

    @functools.cached_property
    def reference(self):
        return run_node("RealCustomEncodeReference", **self.encode_reference())[0]

    def styled_sampling(self, prompts: int, images: int):
        """Stock KSampler inputs: SharedAttentionBatch's model, ``prompts`` batched prompts, ``images`` latents."""
        model = run_node("SharedAttentionBatch", model=self.sd15[0], **SHARED_ATTENTION_DEFAULTS)[0]
        positive = [[torch.zeros(prompts, 77, 768), {}]]
        return {"model": model, "positive": positive, "negative": [[torch.zeros(1, 77, 768), {}]],
                "latent": empty_latent(images), "steps": 1}

    def style_reference(self, latents):
        sigmas = torch.linspace(1.0, 0.0, latents.shape[0])
        return pack_module("attention.style_reference").StyleReference(latents, sigmas)

    # each node's valid inputs
    def invert_reference(self, **over):
        positive = [[torch.zeros(1, 77, 768), {}]]
        return {"model": self.sd15[0], "positive": positive, "negative": positive,
                "latent": {"samples": torch.zeros(1, 4, 8, 8)}, "steps": 1, "scheduler": "normal", "cfg": 1.0, **over}

    def encode_reference(self, **over):
        from harness.realcustom import tiny_clip_vision
        return {"adapter": self.adapter, "clip_vision": tiny_clip_vision(), "image": photos(1), "crop": False, **over}

    def mask_guidance(self, **over):
        return {"model": self.sd15[0], "reference": self.reference, "clip": self.sd15[1],
                "prompt": "a photo of a toy on the beach", "word": "toy", "mask_strategy": "max_norm",
                "mask_scope": 0.25, "binary_mask": False, "update_fraction": 1.0, "map_source": "previous step",
                "uncond_image": "black image", "strength": 1.0, **over}

    def realcustom_trainer(self, **over):
        from harness.realcustom import tiny_clip_vision
        model, clip, vae = self.sd15
        return {"model": model, "clip": clip, "vae": vae, "clip_vision": tiny_clip_vision(), "images": photos(2),
                "captions": "a photo of a toy", "name": "bad_input_rc", "steps": 1, "learning_rate": 1e-3,
                "batch_size": 2, "grad_accumulation": 1, "resolution": 64, "seed": 0, "checkpoint_every": 0,
                "crop": False, **over}

    def pva_attention(self, **over):
        return {"model": self.sd15[0], "pva": self.pva, "references": photos(1), "strength": 1.0,
                "uncond_identity": False, "images_per_identity": 0, "start_percent": 0.0, "end_percent": 1.0, **over}

    def pva_trainer(self, **over):
        model, clip, vae = self.sd15  # PVA also trains on plain (4-channel) models; no second checkpoint to load
        # continues from the tiny PVA file: a fresh start builds the paper-size token transformer (slow on a CPU)
        return {"model": model, "clip": clip, "vae": vae, "pva": self.pva, "images": photos(2), "images_per_identity": 2,
                "name": "bad_input_pva", "encoder": "arcface", "steps": 1, "learning_rate": 1e-4,
                "transformer_learning_rate": 1e-4, "word_learning_rate": 1e-3, "timestep_bins": 1,
                "init_word": "person", "seed": 0, "checkpoint_every": 0, "resolution": 64, **over}

    def identity_tune(self, **over):
        model, clip, vae = self.sd15
        return {"model": model, "clip": clip, "vae": vae, "pva": self.pva, "photos": photos(2), "name": "bad_input_tune",
                "steps": 1, "learning_rate": 1e-4, "word_learning_rate": 1e-3, "timestep_bins": 1, "seed": 0,
                "checkpoint_every": 0, "resolution": 64, **over}

    def disendiff_trainer(self, **over):
        model, clip, vae = self.sd15
        return {"model": model, "clip": clip, "vae": vae, "image": photos(1), "class_words": "cat, dog",
                "name": "bad_input_dd", "steps": 1, "learning_rate": 1e-3, "batch_size": 1, "grad_accumulation": 1,
                "resolution": 64, "seed": 1, "checkpoint_every": 0, "augment": False, **over}

    def calibrated(self, **over):
        return {"model": self.sd15[0], "clip": self.sd15[1], "prompt": "photo of a small cat and a big dog",
                "modifiers": "small, big", "class_words": "cat, dog", "strength": 1.0, "start_percent": 0.0,
                "end_percent": 1.0, **over}

    def detex_trainer(self, **over):
        model, clip, vae = self.sd15
        images, masks = subject()
        return {"model": model, "clip": clip, "vae": vae, "images": images, "masks": masks, "class_word": "dog",
                "name": "bad_input_detex", "steps": 1, "learning_rate": 1e-3, "mapper_learning_rate": 1e-3,
                "batch_size": 1, "grad_accumulation": 1, "seed": 1,
                "template": "photo of a {V} {class}[ with {P} pose][ in {B} background]",
                "attribute_source": "free vectors", "subject_branch_probability": 0.5,
                "mask_normalization": "all elements", "augmented_views": 0, "resolution": 64, "mask_dilation": 0,
                "checkpoint_every": 0, **over}

    def detex_prompt(self, **over):
        return {"clip": self.sd15[1], "name": "bad_input_detex", "prompt": "photo of a {V} dog", "image_index": 0,
                "keep_pose": False, "keep_background": False, **over}


@pytest.fixture(scope="module")
def kit(comfy, sd15, sdxl_model):
    return Kit(comfy, sd15, sdxl_model)


# ---- the matrix ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    #: what the user did, as a sentence (the test id)
    story: str
    node: str
    #: (kit, sandbox) -> the node's inputs; may put damaged files in the sandbox first
    inputs: Callable
    #: regular expression the message must match (besides naming the node)
    problem: str
    #: True when the mistake shows only once the patched model samples: ``inputs`` are then stock KSampler's
    sampling: bool = False

    def param(self):
        return pytest.param(self, id=self.story)


def after(damage: Callable, inputs: Callable) -> Callable:
    """Inputs built once ``damage(kit, sandbox)`` has put a damaged file in place."""
    def build(kit, box):
        damage(kit, box)
        return inputs(kit, box)
    return build


def resuming_from(node: str, stem: str, damage: Callable[[Kit, Path], str], inputs: Callable) -> Callable:
    """Inputs of a second run (2 steps) that resumes from the checkpoint a first run (1 step, same inputs) wrote,
    once ``damage(kit, path)`` has damaged that checkpoint in place."""
    def build(kit, box):
        run_node(node, **inputs(kit, box))
        written = box.checkpoint_files(node, stem)
        assert len(written) == 1, written
        damage(kit, written[0])
        return {**inputs(kit, box), "steps": 2}
    return build


def lookalike_cases() -> list:
    """Every node that patches or trains a DiT, given a HunyuanImage 2.1 model: refused naming that family."""
    nodes = {"SharedAttentionBatch": lambda k, model: {"model": model, **SHARED_ATTENTION_DEFAULTS},
             "AdaptiveMaskGuidance": lambda k, model: k.mask_guidance(model=model),
             "ParallelVisualAttention": lambda k, model: k.pva_attention(model=model),
             "CalibratedCrossAttn": lambda k, model: k.calibrated(model=model),
             "RealCustomTrainer": lambda k, model: k.realcustom_trainer(model=model),
             "PVATrainer": lambda k, model: k.pva_trainer(model=model)}
    names = {"HunyuanImage21": r"HunyuanImage 2\.1"}
    return [Case(f"{node} refuses a {family} model (Flux's block names, another family)", node,
                 lambda k, b, build=build, family=family: build(k, lookalike_model(family)),
                 rf"is a {names[family]} model, which the personalization nodes do not patch yet; supported "
                 r"families: U-Net \(SD1\.5/SD2/SDXL\), Flux, Flux\.2, Chroma, SD3")
            for node, build in nodes.items() for family in names]


STYLE_ALIGNED = [
    Case("SharedAttentionBatch refuses 3 batched prompts for a latent batch of 2", "SharedAttentionBatch",
         lambda k, b: k.styled_sampling(prompts=3, images=2), r"3 prompts but the latent batch has 2 images",
         sampling=True),
    Case("SharedAttentionBatch refuses GroupNorm sharing on a Flux model", "SharedAttentionBatch",
         lambda k, b: {"model": flux_model(), **SHARED_ATTENTION_DEFAULTS, "share_group_norm": True},
         r"share_group_norm joins the GroupNorm statistics of a U-Net; a Flux model has no GroupNorm"),
    Case("SharedAttentionInvertReference refuses an EDM-sampled model", "SharedAttentionInvertReference",
         lambda k, b: k.invert_reference(model=edm_sampled(k.sd15[0])),
         r"variance-preserving schedule.*or rectified flow.*ModelSamplingAdvanced"),
    Case("SharedAttentionInvertReference refuses an empty latent batch", "SharedAttentionInvertReference",
         lambda k, b: k.invert_reference(latent={"samples": torch.zeros(0, 4, 8, 8)}), r"one image.*batch of 0"),
    Case("SharedAttentionInvertReference refuses a latent holding NaN", "SharedAttentionInvertReference",
         lambda k, b: k.invert_reference(latent={"samples": poisoned(torch.zeros(1, 4, 8, 8))}), r"NaN"),
    Case("SharedAttentionInvertReference refuses a latent holding inf", "SharedAttentionInvertReference",
         lambda k, b: k.invert_reference(latent={"samples": poisoned(torch.zeros(1, 4, 8, 8), float("inf"))}),
         r"NaN or infinite"),
    Case("SharedAttentionApplyReference refuses an inverted reference holding NaN", "SharedAttentionApplyReference",
         lambda k, b: {"model": k.sd15[0], "reference": k.style_reference(poisoned(torch.zeros(3, 4, 8, 8))),
                       "offset": 0}, r"NaN"),
    Case("SharedAttentionPromptBatch refuses a prompt embedding of the wrong width", "SharedAttentionPromptBatch",
         after(lambda k, b: narrow_embedding(b.embedding_file(k.sd15[1], NARROW)),
               lambda k, b: {"clip": k.sd15[1], "prompts": f"a toy train\na toy embedding:{NARROW} car", "style": ""}),
         r"narrow\.safetensors.*512-wide.*clip_l.*768"),
]

REALCUSTOM = [
    Case("RealCustomLoader refuses a truncated safetensors file", "RealCustomLoader",
         lambda k, b: {"adapter_name": truncated_copy(k.adapter_file, b.model_file("realcustom", "cut.safetensors"))},
         r"cut\.safetensors.*(damaged|truncated|not a readable safetensors)"),
    Case("RealCustomLoader refuses a pickled .pt file", "RealCustomLoader",
         lambda k, b: {"adapter_name": pickle_file(b.model_file("realcustom", "adapter.pt"))},
         r"adapter\.pt.*only \.safetensors"),
    Case("RealCustomLoader refuses a text file renamed .safetensors", "RealCustomLoader",
         lambda k, b: {"adapter_name": text_file(b.model_file("realcustom", "text.safetensors"))},
         r"text\.safetensors.*not a readable safetensors"),
    Case("RealCustomLoader refuses an adapter file holding NaN", "RealCustomLoader",
         lambda k, b: {"adapter_name": nan_copy(k.adapter_file, b.model_file("realcustom", "nan.safetensors"))},
         r"nan\.safetensors.*NaN"),
    Case("RealCustomLoader does not read a ../ name outside models/realcustom", "RealCustomLoader",
         lambda k, b: {"adapter_name": "../" + text_file(b.root / "models" / "outside.safetensors")},
         r"outside\.safetensors.*not found"),
    Case("RealCustomEncodeReference refuses a batch of two references", "RealCustomEncodeReference",
         lambda k, b: k.encode_reference(image=photos(2)), r"one reference image, got a batch of 2"),
    Case("RealCustomEncodeReference refuses an empty image batch", "RealCustomEncodeReference",
         lambda k, b: k.encode_reference(image=photos(0)), r"one reference image, got a batch of 0"),
    Case("RealCustomEncodeReference refuses an image holding NaN", "RealCustomEncodeReference",
         lambda k, b: k.encode_reference(image=poisoned(photos(1))), r"NaN.*reference image"),
    Case("AdaptiveMaskGuidance refuses an empty word", "AdaptiveMaskGuidance",
         lambda k, b: k.mask_guidance(word="  "), r"word.*empty"),
    Case("AdaptiveMaskGuidance refuses an embedding as the word", "AdaptiveMaskGuidance",
         lambda k, b: k.mask_guidance(word="embedding:toy", prompt="a photo of a embedding:toy"), r"plain text"),
    Case("AdaptiveMaskGuidance refuses a prompt embedding of the wrong width", "AdaptiveMaskGuidance",
         after(lambda k, b: narrow_embedding(b.embedding_file(k.sd15[1], NARROW)),
               lambda k, b: k.mask_guidance(prompt=f"a photo of a embedding:{NARROW} toy on the beach")),
         r"narrow\.safetensors.*512-wide.*768"),
    Case("AdaptiveMaskGuidance refuses a U-Net adapter on a Flux model", "AdaptiveMaskGuidance",
         lambda k, b: k.mask_guidance(model=flux_model()),
         r"AdaptiveMaskGuidance: adapter .* was made for U-Net \(SD1\.5/SD2/SDXL\) models, but this MODEL \(Flux\) "
         r"is a Flux model"),
    Case("RealCustomMaskPreview refuses masks from no finished run", "RealCustomMaskPreview",
         lambda k, b: {"masks": pack_module("nodes.realcustom").MaskRecord(),
                       "samples": {"samples": torch.zeros(1, 4, 8, 8)}}, r"no sampling run"),
    Case("RealCustomMaskPreview refuses samples of another batch size", "RealCustomMaskPreview",
         lambda k, b: {"masks": pack_module("nodes.realcustom").MaskRecord([torch.zeros(2, 4, 4)]),
                       "samples": {"samples": torch.zeros(3, 4, 8, 8)}}, r"2 images, these samples 3"),
    Case("RealCustomTrainer refuses an empty image batch", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(images=photos(0)), r"no training images"),
    Case("RealCustomTrainer refuses empty captions", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(captions="  \n "), r"2 images but 0 captions"),
    Case("RealCustomTrainer refuses training images holding NaN", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(images=poisoned(photos(2))), r"NaN.*training images"),
    Case("RealCustomTrainer refuses an SDXL text encoder for an SD1.5 model", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(clip=sdxl_tokenizer_clip()), r"768-wide text.*CLIP gives 2048"),
    Case("RealCustomTrainer refuses an empty output name", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(name=" "), r"output name ' ' is empty"),
    Case("RealCustomTrainer refuses the output name ..", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(name=".."), r"output name '\.\.' starts or ends with '\.'"),
    Case("RealCustomTrainer refuses a target word missing from its caption", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(captions="a photo of a toy\na photo of a cup", target_words="toy"),
         r"caption 2:.*'toy' does not occur"),
    Case("RealCustomTrainer refuses more target words than captions", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(target_words="toy\ncup\nhat"), r"2 captions but 3 target words"),
    Case("RealCustomTrainer refuses word-mask training without target words", "RealCustomTrainer",
         lambda k, b: k.realcustom_trainer(word_mask_training=True), r"word_mask_training.*target_words"),
    Case("RealCustomTrainer refuses a truncated resume checkpoint", "RealCustomTrainer",
         resuming_from("RealCustomTrainer", "bad_input_rc", lambda k, p: truncated_copy(k.adapter_file, p),
                       lambda k, b: k.realcustom_trainer()), r"checkpoint.*not a readable safetensors"),
    Case("RealCustomTrainer refuses a text file as resume checkpoint", "RealCustomTrainer",
         resuming_from("RealCustomTrainer", "bad_input_rc", lambda k, p: text_file(p),
                       lambda k, b: k.realcustom_trainer()), r"checkpoint.*not a readable safetensors"),
]

PVA = [
    Case("PVALoader refuses a truncated safetensors file", "PVALoader",
         lambda k, b: {"pva_name": truncated_copy(k.pva_file, b.model_file("pva", "cut.safetensors"))},
         r"cut\.safetensors.*not a readable safetensors"),
    Case("PVALoader refuses a pickled .pt file", "PVALoader",
         lambda k, b: {"pva_name": pickle_file(b.model_file("pva", "weights.pt"))}, r"weights\.pt.*only \.safetensors"),
    Case("PVALoader refuses a text file renamed .safetensors", "PVALoader",
         lambda k, b: {"pva_name": text_file(b.model_file("pva", "text.safetensors"))},
         r"text\.safetensors.*not a readable safetensors"),
    Case("PVALoader refuses a weights file holding NaN", "PVALoader",
         lambda k, b: {"pva_name": nan_copy(k.pva_file, b.model_file("pva", "nan.safetensors"))}, r"nan\.safetensors.*NaN"),
    Case("PVALoader refuses int8 weights", "PVALoader",
         lambda k, b: {"pva_name": int8_copy(k.pva_file, b.model_file("pva", "quantized.safetensors"))},
         r"quantized\.safetensors.*int8.*floating-point"),
    Case("PVALoader refuses a damaged ArcFace backbone", "PVALoader",
         after(lambda k, b: text_file(b.model_file("pva", ARCFACE_FILE)), lambda k, b: {"pva_name": k.pva_file.name}),
         r"ms1mv3_arcface_r50\.safetensors.*not a readable safetensors"),
    Case("PVALoader does not read a ../ name outside models/pva", "PVALoader",
         lambda k, b: {"pva_name": "../" + text_file(b.root / "models" / "outside.safetensors")}, r"outside\.safetensors.*not"),
    Case("ParallelVisualAttention refuses a U-Net PVA file on a Flux model", "ParallelVisualAttention",
         lambda k, b: k.pva_attention(model=flux_model()), r"trained for U-Net \(SD1\.5/SD2/SDXL\) models, but this MODEL .* is a Flux model"),
    Case("ParallelVisualAttention refuses references holding NaN", "ParallelVisualAttention",
         lambda k, b: k.pva_attention(references=poisoned(photos(1))), r"NaN.*references"),
    Case("PVATextEncode refuses an empty identity word", "PVATextEncode",
         lambda k, b: {"clip": k.sd15[1], "pva": k.pva, "text": "photo of a <new1> person", "identity_word": ""},
         r"word.*empty"),
    Case("PVATextEncode refuses a pickled embedding in its text without unpickling it", "PVATextEncode",
         after(lambda k, b: pickled_embedding(b.embedding_file(k.sd15[1], PICKLED, ".pt"), b.root / "unpickled"),
               lambda k, b: {"clip": k.sd15[1], "pva": k.pva, "text": f"photo of a <new1> person, embedding:{PICKLED}",
                             "identity_word": "<new1>"}),
         r"pickled\.pt.*only \.safetensors"),
    Case("PVATextEncode refuses an SDXL text encoder for SD1.5 weights", "PVATextEncode",
         lambda k, b: {"clip": sdxl_tokenizer_clip(), "pva": k.pva,
                       "text": "photo of a <new1> person", "identity_word": "<new1>"}, r"this CLIP also uses \['g'\]"),
    Case("PVATrainer refuses an empty image batch", "PVATrainer",
         lambda k, b: k.pva_trainer(images=photos(0)), r"no images"),
    Case("PVATrainer refuses a U-Net PVA file on a Flux model", "PVATrainer",
         lambda k, b: k.pva_trainer(model=flux_model()), r"trained for U-Net \(SD1\.5/SD2/SDXL\) models, but this MODEL .* is a Flux model"),
    Case("PVATrainer refuses an SDXL model with an SD1.5 text encoder", "PVATrainer",
         lambda k, b: k.pva_trainer(model=k.sdxl), r"2048-wide text.*CLIP gives 768"),
    Case("PVATrainer refuses masks of another size than the images", "PVATrainer",
         lambda k, b: k.pva_trainer(masks=torch.ones(2, 32, 32)), r"2 masks of \(32, 32\) for 2 images of \(64, 64\)"),
    Case("PVATrainer refuses fewer masks than images", "PVATrainer",
         lambda k, b: k.pva_trainer(masks=torch.ones(1, 64, 64)), r"1 masks .* for 2 images"),
    Case("PVATrainer refuses an empty mask", "PVATrainer",
         lambda k, b: k.pva_trainer(masks=torch.cat([torch.ones(1, 64, 64), torch.zeros(1, 64, 64)])),
         r"mask of image\(s\) \[1\].*empty"),
    Case("PVATrainer refuses images holding NaN", "PVATrainer",
         lambda k, b: k.pva_trainer(images=poisoned(photos(2))), r"NaN.*images"),
    Case("PVATrainer refuses masks holding NaN", "PVATrainer",
         lambda k, b: k.pva_trainer(masks=poisoned(torch.ones(2, 64, 64))), r"NaN.*masks"),
    Case("PVATrainer refuses an init word without a token", "PVATrainer",
         lambda k, b: k.pva_trainer(init_word="embedding:no_such_embedding", pva=None), r"init_word.*has no token"),
    Case("PVATrainer refuses an empty output name", "PVATrainer",
         lambda k, b: k.pva_trainer(name=""), r"output name '' is empty"),
    Case("PVATrainer refuses a truncated resume checkpoint", "PVATrainer",
         resuming_from("PVATrainer", "bad_input_pva", lambda k, p: truncated_copy(k.pva_file, p),
                       lambda k, b: k.pva_trainer()), r"checkpoint.*not a readable safetensors"),
    Case("PVAIdentityTune refuses a U-Net PVA file on a Flux model", "PVAIdentityTune",
         lambda k, b: k.identity_tune(model=flux_model()), r"trained for U-Net \(SD1\.5/SD2/SDXL\) models, but this MODEL .* is a Flux model"),
    Case("PVAIdentityTune refuses an SDXL model with an SD1.5 text encoder", "PVAIdentityTune",
         lambda k, b: k.identity_tune(model=k.sdxl), r"2048-wide text.*CLIP gives 768"),
    Case("PVAIdentityTune refuses photos holding NaN", "PVAIdentityTune",
         lambda k, b: k.identity_tune(photos=poisoned(photos(2))), r"NaN.*photos"),
    Case("PVAIdentityTune refuses the output name /", "PVAIdentityTune",
         lambda k, b: k.identity_tune(name="/"), r"output name '/' holds '/'"),
    Case("PVAIdentityTune refuses a text file as resume checkpoint", "PVAIdentityTune",
         resuming_from("PVAIdentityTune", "bad_input_tune", lambda k, p: text_file(p), lambda k, b: k.identity_tune()),
         r"checkpoint.*not a readable safetensors"),
]

DISENDIFF = [
    Case("DisenDiffTrainer refuses an empty image batch", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(image=photos(0)), r"no (training )?image|empty"),
    Case("DisenDiffTrainer refuses an image holding NaN", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(image=poisoned(photos(1))), r"NaN"),
    Case("DisenDiffTrainer refuses a Flux model", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(model=flux_model()), refuses_dit("DisenDiffTrainer")),
    Case("DisenDiffTrainer refuses regularisation captions that do not match the images", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(reg_images=photos(3), reg_captions="a cat\na dog"),
         r"one line per regularisation image \(3\)"),
    Case("DisenDiffTrainer refuses an empty regularisation batch", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(reg_images=photos(0), reg_captions="a cat and a dog"), r"regularisation"),
    Case("DisenDiffTrainer refuses an empty output name", "DisenDiffTrainer",
         lambda k, b: k.disendiff_trainer(name="  "), r"output name '  ' is empty"),
    Case("DisenDiffTrainer refuses a text file as resume checkpoint", "DisenDiffTrainer",
         resuming_from("DisenDiffTrainer", "bad_input_dd", lambda k, p: text_file(p), lambda k, b: k.disendiff_trainer()),
         r"checkpoint.*not a readable safetensors"),
    Case("CalibratedCrossAttn refuses a class word missing from the prompt", "CalibratedCrossAttn",
         lambda k, b: k.calibrated(class_words="cat, horse"), r"'horse' does not occur in the prompt"),
    Case("CalibratedCrossAttn refuses a modifier embedding that does not exist", "CalibratedCrossAttn",
         lambda k, b: k.calibrated(prompt="photo of a embedding:nowhere_new1 cat and a big dog",
                                   modifiers="embedding:nowhere_new1, big"), r"embedding:nowhere_new1.*not found"),
    Case("CalibratedCrossAttn refuses a damaged embedding file", "CalibratedCrossAttn",
         after(lambda k, b: text_file(b.embedding_file(k.sd15[1], BROKEN)),
               lambda k, b: k.calibrated(prompt=f"photo of a embedding:{BROKEN} cat and a big dog",
                                         modifiers=f"embedding:{BROKEN}, big")), r"broken.*(damaged|not a readable|could not be read)"),
    Case("CalibratedCrossAttn refuses a modifier embedding holding NaN", "CalibratedCrossAttn",
         after(lambda k, b: nan_embedding(b.embedding_file(k.sd15[1], POISONED)),
               lambda k, b: k.calibrated(prompt=f"photo of a embedding:{POISONED} cat and a big dog",
                                         modifiers=f"embedding:{POISONED}, big")), r"poisoned.*NaN"),
    Case("CalibratedCrossAttn refuses a modifier embedding of the wrong width", "CalibratedCrossAttn",
         after(lambda k, b: narrow_embedding(b.embedding_file(k.sd15[1], NARROW)),
               lambda k, b: k.calibrated(prompt=f"photo of a embedding:{NARROW} cat and a big dog",
                                         modifiers=f"embedding:{NARROW}, big")), r"narrow\.safetensors.*512-wide.*768"),
    Case("CalibratedCrossAttn refuses an integer embedding elsewhere in its prompt", "CalibratedCrossAttn",
         after(lambda k, b: integer_embedding(b.embedding_file(k.sd15[1], INTEGER)),
               lambda k, b: k.calibrated(prompt=f"photo of a small cat and a big dog, embedding:{INTEGER}")),
         r"integer\.safetensors.*int8.*floating-point"),
    Case("CalibratedCrossAttn refuses a CLIP embedding as a modifier on a Flux model", "CalibratedCrossAttn",
         lambda k, b: k.calibrated(model=flux_model(), prompt="photo of a embedding:pair_new1 cat and a big dog",
                                   modifiers="embedding:pair_new1, big"),
         r"CalibratedCrossAttn: 'embedding:pair_new1' is a CLIP embedding .* on a Flux model name modifier words"),
]

DETEX = [
    Case("DecoupledTokenTrainer refuses an empty image batch", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(images=photos(0), masks=torch.zeros(0, 64, 64)), r"3 to 10 images.*got 0"),
    Case("DecoupledTokenTrainer refuses images holding NaN", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(images=poisoned(subject()[0])), r"NaN.*images"),
    Case("DecoupledTokenTrainer refuses a Flux model", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(model=flux_model()), refuses_dit("DecoupledTokenTrainer")),
    Case("DecoupledTokenTrainer refuses an empty class word", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(class_word=" "), r"class_word"),
    Case("DecoupledTokenTrainer refuses the output name ...", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(name="..."), r"output name '\.\.\.' starts or ends with '\.'"),
    Case("DecoupledTokenTrainer refuses a text file as resume checkpoint", "DecoupledTokenTrainer",
         resuming_from("DecoupledTokenTrainer", "bad_input_detex", lambda k, p: text_file(p),
                       lambda k, b: k.detex_trainer()), r"checkpoint.*not a readable safetensors"),
    Case("DecoupledTokenMask refuses an empty image batch", "DecoupledTokenMask",
         lambda k, b: {"images": photos(0), "threshold": 0.12, "smoothing": 2, "dilation": 0}, r"no image|empty"),
    Case("DecoupledTokenMask refuses images holding NaN", "DecoupledTokenMask",
         lambda k, b: {"images": poisoned(subject()[0]), "threshold": 0.12, "smoothing": 2, "dilation": 0}, r"NaN"),
    Case("DecoupledTokenPrompt refuses a prompt without {V}", "DecoupledTokenPrompt",
         lambda k, b: k.detex_prompt(prompt="photo of a dog"), r"\{V\}"),
    Case("DecoupledTokenPrompt refuses a subject embedding holding NaN", "DecoupledTokenPrompt",
         after(lambda k, b: nan_embedding(b.embedding_file(k.sd15[1], f"{POISONED}_V")),
               lambda k, b: k.detex_prompt(name=POISONED)), r"poisoned_V.*NaN"),
    Case("DecoupledTokenTrainer refuses an empty regularisation batch", "DecoupledTokenTrainer",
         lambda k, b: k.detex_trainer(regularization_images=photos(0)), r"regularization"),
    Case("DecoupledTokenPrompt refuses a damaged subject embedding", "DecoupledTokenPrompt",
         after(lambda k, b: text_file(b.embedding_file(k.sd15[1], f"{BROKEN}_V")),
               lambda k, b: k.detex_prompt(name=BROKEN)),
         r"broken_V.*(damaged|not a readable|could not be read)"),
    Case("DecoupledTokenPrompt refuses a subject embedding of the wrong width", "DecoupledTokenPrompt",
         after(lambda k, b: narrow_embedding(b.embedding_file(k.sd15[1], f"{NARROW}_V")),
               lambda k, b: k.detex_prompt(name=NARROW)), r"narrow_V\.safetensors.*512-wide.*clip_l.*768"),
    Case("DecoupledTokenPrompt refuses an integer subject embedding", "DecoupledTokenPrompt",
         after(lambda k, b: integer_embedding(b.embedding_file(k.sd15[1], f"{INTEGER}_V")),
               lambda k, b: k.detex_prompt(name=INTEGER)), r"integer_V\.safetensors.*int8.*floating-point"),
    Case("DecoupledTokenPrompt refuses a pickled .pt subject embedding without unpickling it", "DecoupledTokenPrompt",
         after(lambda k, b: pickled_embedding(b.embedding_file(k.sd15[1], f"{PICKLED}_V", ".pt"), b.root / "unpickled"),
               lambda k, b: k.detex_prompt(name=PICKLED)), r"pickled_V\.pt.*only \.safetensors"),
    Case("DecoupledTokenPrompt refuses an SD1.x subject embedding on an SDXL CLIP", "DecoupledTokenPrompt",
         after(lambda k, b: sd15_embedding(b.embedding_file(k.sd15[1], f"{SD15}_V")),
               lambda k, b: k.detex_prompt(clip=k.sdxl_clip, name=SD15)), r"sd15_V\.safetensors.*768-wide.*clip_g.*1280"),
    Case("DecoupledTokenPrompt refuses a wrong-width embedding elsewhere in its prompt", "DecoupledTokenPrompt",
         after(lambda k, b: (sd15_embedding(b.embedding_file(k.sd15[1], f"{SD15}_V")),
                             narrow_embedding(b.embedding_file(k.sd15[1], NARROW))),
               lambda k, b: k.detex_prompt(name=SD15, prompt=f"photo of a {{V}} dog, embedding:{NARROW}")),
         r"narrow\.safetensors.*512-wide"),
]

#: each trainer's valid inputs
TRAINER_INPUTS = {"RealCustomTrainer": Kit.realcustom_trainer, "PVATrainer": Kit.pva_trainer,
                  "PVAIdentityTune": Kit.identity_tune, "DisenDiffTrainer": Kit.disendiff_trainer,
                  "DecoupledTokenTrainer": Kit.detex_trainer}

# Absolute AND climbing: a naive join would write <basetemp>/escape*, outside every allowed folder but inside the
# watched tree; cleaning the name instead (to tmp_..._escape) would merge it with other names (DESIGN.md §4).
OUTPUT_NAMES = [
    Case(f"{node} refuses an absolute ../ output name", node,
         lambda k, b, inputs=inputs: inputs(k, name=f"{b.root}/../escape", checkpoint_every=1),
         r"output name '/.*/\.\./escape' holds '/'.*try '\S+'") for node, inputs in TRAINER_INPUTS.items()]

CASES = STYLE_ALIGNED + REALCUSTOM + PVA + DISENDIFF + DETEX + OUTPUT_NAMES + lookalike_cases()


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_a_clear_error_and_writes_nothing(case, kit, sandbox):
    inputs = case.inputs(kit, sandbox)
    sandbox.snapshot()
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        sample(**inputs) if case.sampling else run_node(case.node, **inputs)
    message = str(raised.value)
    assert case.node in message, f"the message does not name the node: {message!r}"
    assert re.search(case.problem, message, re.S), f"the message does not name the problem: {message!r}"
    assert not sandbox.changes(), f"{case.node} wrote files although it failed: {sandbox.changes()}"


# ---- output names ---------------------------------------------------------------------------------------------------

def test_a_unicode_output_name_is_an_embedding_word_of_stock_clip_text_encode(kit, sandbox):
    # Names keep letters of any script: the file a trainer writes for "évil名" must be what ComfyUI's own tokenizer
    # finds for embedding:évil名_new1 (else the name would be refused, not cleaned into another one).
    clip = kit.sd15[1]
    folder = clip.tokenizer.clip_l.embedding_directory[0]
    vector = torch.randn(1, 768, generator=torch.Generator().manual_seed(3))
    words = {"unicode": f"{naming.checked_name('évil名')}_new1", "ascii": f"{SD15}_twin_new1"}
    for word in words.values():
        path = naming.output_path(folder, word)
        sandbox.leftovers.append(path)
        exporters.save_embedding(path, vector)
    assert (Path(folder) / "évil名_new1.safetensors").is_file()
    unicode, ascii_twin, without = (encode_prompt(clip, text)[0][0] for text in (
        f"a photo of embedding:{words['unicode']} toy", f"a photo of embedding:{words['ascii']} toy", "a photo of toy"))
    torch.testing.assert_close(unicode, ascii_twin)
    assert (unicode - without).abs().max() > 1e-3, "CLIPTextEncode dropped the word"


def test_a_name_of_the_longest_length_keeps_every_file_suffix(tmp_path):
    # Trainers write several files from one name (<name>_new1, <name>_new2, <name>_disendiff_kv, <name>_pose_9):
    # a name at the length limit must still give distinct files, none cut.
    stem = naming.checked_name("名" * (naming.MAX_NAME_BYTES // 3))
    files = {naming.output_path(tmp_path, f"{stem}{suffix}") for suffix in ("_new1", "_new2", "_disendiff_kv", "_pose_9")}
    assert len(files) == 4 and all(path.parent == tmp_path.resolve() for path in files)


# ---- through the executor: the node as the user sees it, builtin exception types, NaN widgets ----------------------

#: where the executor graphs below take a pack node's non-widget inputs from, by type
UPSTREAM = {"MODEL": ["ckpt", 0], "CLIP": ["ckpt", 1], "VAE": ["ckpt", 2], "CONDITIONING": ["text", 0],
            "LATENT": ["latent", 0], "IMAGE": ["image", 0], "PVA": ["pva", 0]}


def executor_graph(node: str, **widgets) -> dict:
    """An API prompt running ``node`` on the tiny SD1.5: its required inputs linked to stock nodes (a PVA to
    PVALoader of the tiny PVA file), its widgets at their defaults unless ``widgets`` sets them, its first output
    shown by PreviewAny so that it runs (a trainer is an output node itself)."""
    from harness.checkpoints import sd15_checkpoint_path
    schema = boot_comfy().nodes.NODE_CLASS_MAPPINGS[node].GET_SCHEMA()
    required = {i.id: UPSTREAM.get(str(i.get_io_type()), getattr(i, "default", None))
                for i in schema.inputs if not i.optional}
    api = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint_path().name}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a cat"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "image": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "node": {"class_type": node, "inputs": {**required, **widgets}},
    }
    if required.get("pva") == UPSTREAM["PVA"]:
        from harness.pva_assets import arcface_path, pva_path
        arcface_path()
        api["pva"] = {"class_type": "PVALoader", "inputs": {"pva_name": pva_path("arcface").name}}
    if not schema.is_output_node:
        api["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["node", 0]}}
    return api


@pytest.fixture(scope="module")
def executor(comfy):
    """One executor for the module, as the server keeps one: its cache loads the checkpoint once."""
    return new_executor()


def executor_error(api: dict, executor) -> dict:
    """ComfyUI's error report (what the frontend shows) of a prompt that must fail while executing."""
    with pytest.raises(WorkflowExecutionError) as raised:
        execute_workflow(api, executor=executor)
    return raised.value.report


def not_a_pva_file(kit, box) -> str:
    """A readable safetensors file in models/pva that holds no PVA weights (the PVA reader's own error class)."""
    save_file({"weight": torch.zeros(2, 2)}, str(box.model_file("pva", "other.safetensors")))
    return "other.safetensors"


@pytest.mark.parametrize("node, widgets, exception_type, problem", [
    pytest.param("PVALoader", lambda k, b: {"pva_name": not_a_pva_file(k, b)}, "ValueError", r"not a PVA weights file",
                 id="PVALoader given another safetensors file"),
    pytest.param("PVALoader", lambda k, b: {"pva_name": text_file(b.model_file("pva", "text.safetensors"))},
                 "ValueError", r"text\.safetensors.*not a readable safetensors", id="PVALoader given a text file"),
    pytest.param("DisenDiffTrainer", lambda k, b: {"class_words": "cat", "steps": 1, "resolution": 64},
                 "ValueError", r"2 or more class words", id="DisenDiffTrainer given one class word"),
    pytest.param("CalibratedCrossAttn", lambda k, b: {"prompt": "photo of a embedding:nowhere_new1 cat and a big dog",
                                                      "modifiers": "embedding:nowhere_new1, big", "class_words": "cat, dog"},
                 "FileNotFoundError", r"embedding:nowhere_new1.*not found", id="CalibratedCrossAttn given a missing embedding"),
])
def test_executor_error_names_the_node_once_with_a_builtin_type(node, widgets, exception_type, problem, kit, sandbox,
                                                                 executor):
    report = executor_error(executor_graph(node, **widgets(kit, sandbox)), executor)
    message = report["exception_message"]
    assert "Clone" not in message and len(re.findall(rf"\b{node}\b", message)) == 1, message
    assert re.search(problem, message, re.S), message
    assert report["exception_type"] == exception_type, "a builtin name, not the pack's module path"


@pytest.mark.parametrize("node, name, widgets", [
    pytest.param("SharedAttentionBatch", "shared_score_shift", {}, id="SharedAttentionBatch shift (black images)"),
    pytest.param("SharedAttentionBatch", "start_percent", {}, id="SharedAttentionBatch start_percent"),
    pytest.param("CalibratedCrossAttn", "strength", {"prompt": "photo of a small cat and a big dog",
                                                     "modifiers": "small, big", "class_words": "cat, dog"},
                 id="CalibratedCrossAttn strength (black images)"),
    pytest.param("ParallelVisualAttention", "strength", {}, id="ParallelVisualAttention strength (silent)"),
    pytest.param("SharedAttentionInvertReference", "cfg", {"steps": 1},
                 id="SharedAttentionInvertReference cfg (caught by the next node)"),
])
def test_executor_refuses_a_nan_widget(node, name, widgets, executor):
    # JSON NaN passes ComfyUI's min/max check (every comparison with NaN is False)
    report = executor_error(executor_graph(node, **widgets, **{name: NAN}), executor)
    assert report["node_type"] == node and report["exception_type"] == "ValueError"
    assert re.match(rf"{node}: input '{name}' is NaN", report["exception_message"]), report["exception_message"]


@pytest.mark.parametrize("value", [NAN, float("inf"), float("-inf")], ids=["NaN", "inf", "-inf"])
def test_every_float_input_of_every_node_refuses_a_non_finite_value(value, comfy):
    """Each registered node called as ComfyUI's executor calls a V3 node (the registered class's method, run on a
    clone of the class), one FLOAT input non-finite and every other input None: the refusal comes before the node
    touches any input."""
    shown = "NaN" if math.isnan(value) else str(value)
    checked, wrong = set(), []
    for cls in asyncio.run(pack_module("nodes").PersonalizationExtension().get_node_list()):
        schema = cls.GET_SCHEMA()
        for name in [i.id for i in schema.inputs if str(i.get_io_type()) == "FLOAT"]:
            try:
                getattr(cls, cls.FUNCTION).__func__(cls.PREPARE_CLASS_CLONE({}),
                                                    **{**{i.id: None for i in schema.inputs}, name: value})
                outcome = "no error"
            except Exception as error:  # noqa: BLE001 - any other outcome is reported below
                outcome = f"{type(error).__name__}: {error}"
            if not outcome.startswith(f"ValueError: {schema.node_id}: input '{name}' is {shown};"):
                wrong.append(f"{schema.node_id}.{name}: {outcome[:200]}")
            checked.add(f"{schema.node_id}.{name}")
    assert not wrong, "\n".join(wrong)
    assert {"SharedAttentionBatch.shared_score_shift", "CalibratedCrossAttn.strength", "ParallelVisualAttention.strength",
            "SharedAttentionInvertReference.cfg", "PVATrainer.learning_rate"} <= checked
