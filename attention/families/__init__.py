"""One adapter per model family (:class:`~.base.Family`): the only code that knows families.

Adding a family: a module here defining its adapter, its entry in :data:`ADAPTERS`, and a tiny random-weight
model of it in tests/harness; nothing else in the pack changes.
"""
from __future__ import annotations

from typing import Optional

from .base import (BlockKey, ConditioningPlacement, Family, JointProjections, NamedModules, ProjectionRows, TransformerBlock,
                   UnsupportedModelError, class_names, nearest_of)
from .chroma import CHROMA
from .flux import FLUX
from .flux2 import FLUX2
from .qwen_image import QWEN_IMAGE
from .sd3 import MMDIT
from .unet import UNET
from .zimage import ZIMAGE

#: the families the pack patches, in the order they are tried
ADAPTERS: tuple[Family, ...] = (UNET, FLUX, FLUX2, CHROMA, MMDIT, ZIMAGE, QWEN_IMAGE)
ALL_FAMILIES = ADAPTERS
#: the families ComfyUI ships that the pack does not patch yet, by their model class, as users call them: named
#: in the error a node gives for them
OTHER_FAMILIES = {"ChromaRadiance": "Chroma Radiance",
                  "Lumina2": "Lumina 2", "HiDream": "HiDream",
                  "HunyuanImage21": "HunyuanImage 2.1", "HunyuanVideo": "HunyuanVideo", "AuraFlow": "AuraFlow"}


def family_of_tag(tag: str) -> Family:
    """The family a file records as ``tag`` (:attr:`Family.file_tag`); ValueError for an unknown one."""
    for family in ADAPTERS:
        if family.file_tag == tag:
            return family
    raise ValueError(f"unknown model family {tag!r} (known: {', '.join(f.file_tag for f in ADAPTERS)})")


def family_of_model(modules: list, model_name: str, model_classes: Optional[list[str]]) -> Family:
    """The family of a diffusion model given its ``(path, module)`` pairs and the names along its ComfyUI model
    class's MRO (None: recognised before). UnsupportedModelError naming the family, where ComfyUI's class tells
    it, and the supported ones otherwise."""
    tops = {path for path, _ in modules if path and "." not in path}
    for family in ADAPTERS:
        if family.recognises(tops, model_classes):
            return family
    supported = ", ".join(f.name for f in ADAPTERS)
    other = nearest_of(model_classes, OTHER_FAMILIES)
    if other is not None:
        raise UnsupportedModelError(f"{model_name} is a {OTHER_FAMILIES[other]} model, which the personalization "
                                    f"nodes do not patch yet; supported families: {supported}.")
    root = type(modules[0][1]).__name__ if modules else "empty model"
    raise UnsupportedModelError(f"{model_name} is a {root}, which the personalization nodes cannot patch; supported "
                                f"families: {supported}.")


def text_encoder_family(encoders) -> Family:
    """The family whose own combination of text encoders ``encoders`` (a CLIP's ``cond_stage_model``) is; the
    U-Nets' for any CLIP no DiT family claims (CLIP-L, CLIP-L + G)."""
    return next((family for family in ADAPTERS if family.encodes_with(encoders)), UNET)


def context_stretches(encoders, tokens: dict) -> list[tuple[str, ...]]:
    """The tokenizer keys (of ``tokens``, ``clip.tokenize``'s output) whose encoders fill the conditioning's token
    axis, one tuple per stretch in token order: the encoders of one stretch are concatenated channel-wise (they
    share positions), stretches follow each other along the tokens, as the family of ``encoders`` (a CLIP's
    ``cond_stage_model``, None for a tokenizer-only CLIP) builds its conditioning; any CLIP no family claims is
    one stretch of all its encoders, the U-Nets' layout."""
    for family in ADAPTERS:
        stretches = family.context_stretches(encoders, tokens) if encoders is not None else None
        if stretches is not None:
            return stretches
    return [tuple(tokens)]


__all__ = ["ADAPTERS", "ALL_FAMILIES", "BlockKey", "CHROMA", "ConditioningPlacement", "FLUX", "FLUX2", "Family", "JointProjections", "MMDIT", "NamedModules",
           "OTHER_FAMILIES", "ProjectionRows", "QWEN_IMAGE", "TransformerBlock", "UNET", "UnsupportedModelError", "ZIMAGE", "class_names", "context_stretches",
           "family_of_model", "family_of_tag", "text_encoder_family"]
