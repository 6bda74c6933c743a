"""Which model families each node takes, declared once.

The nodes that patch or train a MODEL take their families from here (``patching.transformer_blocks``), and the
README's node x family table is produced from these declarations and the family adapters
(:func:`family_table`; tests/test_node_contract.py checks the README holds exactly that table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..attention.families import ADAPTERS, ALL_FAMILIES, UNET, Family


@dataclass(frozen=True)
class FamilySupport:
    #: the adapters whose models the node patches or trains; None: the node reads no MODEL, any family's graph
    #: can hold it
    families: Optional[tuple[Family, ...]]
    #: the U-Nets it refuses although the U-Net adapter takes them, by the text encoder they need ("SD2": no CLIP-L;
    #: "SDXL": CLIP-L beside CLIP-G)
    refused_unets: tuple[str, ...] = ()
    #: the README's footnote on the node's name (a letter), if any
    footnote: str = ""


def _every(footnote: str = "") -> FamilySupport:
    return FamilySupport(ALL_FAMILIES, footnote=footnote)


def _any(footnote: str = "") -> FamilySupport:
    return FamilySupport(None, footnote=footnote)


#: every node the pack registers, in the README's order
SUPPORT: dict[str, FamilySupport] = {
    "SharedAttentionBatch": _every(),
    "SharedAttentionPromptBatch": _every(),
    "SharedAttentionInvertReference": _every(),
    "SharedAttentionApplyReference": _every(),
    "RealCustomLoader": _any("ᵇ"),
    "RealCustomDINOv2Loader": _any("ᶜ"),
    "RealCustomEncodeReference": _every("ᵇ"),
    "AdaptiveMaskGuidance": _every("ᵇ"),
    "RealCustomMaskPreview": _every(),
    "RealCustomTrainer": _every("ᵈ"),
    "PVALoader": _any("ᵉ"),
    "ParallelVisualAttention": _every("ᵉ"),
    "PVATextEncode": _every("ᵉ"),
    "PVAIdentityTune": _every("ᵉ"),
    "PVATrainer": _every(),
    "DisenDiffTrainer": FamilySupport((UNET,), refused_unets=("SD2",)),
    "DisenDiffRegularization": _any("ᶠ"),
    "CalibratedCrossAttn": _every(),
    "CalibratedCrossAttnMaps": _every(),
    "DecoupledTokenMask": _any(),
    "DecoupledTokenTrainer": FamilySupport((UNET,), refused_unets=("SD2", "SDXL")),
    "DecoupledTokenPrompt": FamilySupport((UNET,), refused_unets=("SD2", "SDXL"), footnote="ᵍ"),
    "DecoupledTokenAttributes": FamilySupport((UNET,), refused_unets=("SD2", "SDXL"), footnote="ᵍ"),
}

#: the table's columns for the U-Net adapter: what users call its models, and the variant each column may refuse
_UNET_COLUMNS = (("SD1.5 / SD2", "SD2"), ("SDXL", "SDXL"))


def supported_families(node: str) -> tuple[Family, ...]:
    """The families ``node`` patches or trains (its declaration in :data:`SUPPORT`)."""
    families = SUPPORT[node].families
    if families is None:
        raise ValueError(f"{node} reads no MODEL: it has no family to patch")
    return families


def _cells(support: FamilySupport) -> list[str]:
    if support.families is None:
        return ["any"] * (len(_UNET_COLUMNS) + len(ADAPTERS) - 1)
    unet = [("refused" if UNET not in support.families else
             "SD1.x ✔, SD2 refused" if variant == "SD2" and variant in support.refused_unets else
             "refused" if variant in support.refused_unets else "✔") for _column, variant in _UNET_COLUMNS]
    return unet + ["✔" if family in support.families else "refused" for family in ADAPTERS if family is not UNET]


def family_table(display_names: dict[str, str]) -> list[str]:
    """The README's node x family table (markdown lines): a row per node of :data:`SUPPORT` with its display name
    (``display_names``, without the common " (personalization)"), a column per family adapter (the U-Net adapter's
    models in two); every DiT column carries the footnote ᵃ."""
    columns = [column for column, _variant in _UNET_COLUMNS] + [f"{family.name} ⁽ᵃ⁾" for family in ADAPTERS
                                                                if family is not UNET]
    lines = ["| node | id | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for node, support in SUPPORT.items():
        name = display_names[node] + (f" ⁽{support.footnote}⁾" if support.footnote else "")
        lines.append(f"| {name} | `{node}` | " + " | ".join(_cells(support)) + " |")
    return lines
