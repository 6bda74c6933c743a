"""Text-encoder stand-ins built from ComfyUI's own classes.

SDXL's CLIP-G (~700M parameters) and SD2's OpenCLIP ViT-H (~350M) are too big for CPU tests, but token
positions only depend on the tokenizers, so `sdxl_tokenizer_clip()` is a real `comfy.sd.CLIP` carrying
ComfyUI's real SDXL tokenizer (both `l` and `g`) and no encoder weights: `tokenize` works, encoding does
not. `reduced_clip(family)` encodes: ComfyUI's own SD2 / SDXL CLIP classes with the real tokenizers, widths,
vocabularies and hidden-layer choice, only `layers` transformer layers deep (ComfyUI's
``<clip name>_model_config`` option), random weights.
"""
from __future__ import annotations

from .comfy_env import boot_comfy
from .memory import model_cache


@model_cache
def sdxl_tokenizer_clip(embedding_directory: tuple[str, ...] | None = None):
    """The tokenizer-only SDXL CLIP; with ``embedding_directory`` it resolves ``embedding:`` words from those
    folders, as a loaded SDXL CLIP does from models/embeddings (without, it reads them as plain text)."""
    boot_comfy(require_pack=False)
    import comfy.sd
    import comfy.sdxl_clip

    clip = comfy.sd.CLIP(no_init=True)
    clip.tokenizer = comfy.sdxl_clip.SDXLTokenizer(
        embedding_directory=None if embedding_directory is None else list(embedding_directory))
    clip.tokenizer_options = {}
    return clip


#: ComfyUI's (tokenizer, text encoder) classes of each family, and the text models they hold
_CLIP_TARGETS = {"sd2": ("comfy.text_encoders.sd2_clip", "SD2Tokenizer", "SD2ClipModel", ("clip_h",)),
                 "sdxl": ("comfy.sdxl_clip", "SDXLTokenizer", "SDXLClipModel", ("clip_l", "clip_g"))}


@model_cache
def reduced_clip(family: str, layers: int = 3):
    """A CLIP of ``family`` ("sd2" or "sdxl") that encodes, ``layers`` deep (SD2 and SDXL read the
    penultimate layer, and ComfyUI wants more layers than that index: at least 3), random from a fixed
    seed. Shared by the process: clone() before changing it."""
    boot_comfy(require_pack=False)
    import importlib

    import comfy.sd
    import comfy.supported_models_base

    from .checkpoints import randomize_

    module, tokenizer, encoder, names = _CLIP_TARGETS[family]
    module = importlib.import_module(module)
    target = comfy.supported_models_base.ClipTarget(getattr(module, tokenizer), getattr(module, encoder))
    clip = comfy.sd.CLIP(target, model_options={f"{name}_model_config": {"num_hidden_layers": layers} for name in names})
    randomize_(clip.cond_stage_model, seed=11)
    return clip
