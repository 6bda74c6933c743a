"""Lays out workflows/*.json: columns left to right in the order the data flows, one group per stage,
the "Read me" note in the first column, every node at least as large as the real frontend draws it, and
a saved view that opens on the note, below the frontend's bars, zoomed so that its text reads at first sight.

The stages are written out per workflow below (COLUMNS); positions, node and group sizes and the view
are computed. Node sizes are the ones the real frontend computes for each node of each workflow,
written by tests/test_frontend.py to test-artifacts/frontend/node_sizes.json (so run that test first;
run it again afterwards: it fails on overlapping nodes, notes that need scrolling and a first view
under the tab bar).

Usage: .venv/bin/python scripts/layout_workflows.py [--sizes test-artifacts/frontend/node_sizes.json]
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"

NODE_TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
GROUP_TITLE = 34  # LGraphGroup.titleHeight (font 24)
GROUP_PADDING = 12  # between a group's border and its nodes
NODE_GAP = 24  # between two nodes of a group
GROUP_GAP = 40  # between two groups of a column
COLUMN_GAP = 70  # between columns: room for the links
BAND_GAP = 80  # between the bands of a two-pass graph
MIN_NODE_WIDTH = 300
NOTE_WIDTH = 420
NOTE_MARGIN = 20  # below a note's text: fonts differ a little between machines
# Heights a careful person gives a node beyond the frontend's minimum: room for the picture a LoadImage
# shows, the results a SaveImage shows after a run, the text of a prompt.
ROOMY_HEIGHT = {"LoadImage": 340, "SaveImage": 300, "PreviewImage": 300, "CLIPTextEncode": 130,
                "PrimitiveStringMultiline": 120}
# Where the saved view puts the graph's top-left corner (the read-me note's title) on the screen, in pixels:
# right of the side bar (about 60 px) and below the frontend's bars: its first-run banner ("Introducing
# Nodes 2.0", 40 px, shown until dismissed), the tab bar, the floating workflow title and Run bar (their
# bottom at 130 px under the banner).
VIEW_LEFT, VIEW_TOP = 90, 150
# The saved view's zoom: the note's body text (the frontend's markdown font, 10 px) drawn at 12 px, readable
# at first sight; the whole graph is one "fit view" away.
VIEW_SCALE = 1.2
PACK_STAGE_COLOR, STAGE_COLOR = "#8a5a9e", "#3f789e"

# Per workflow (file stem): bands (one per pass) of columns of stages (group title, node ids, top to
# bottom). The "Read me" note goes left of the first band.
COLUMNS: dict[str, list[list[list[tuple[str, list[int]]]]]] = {
    "01 StyleAligned - a batch in one style, from text": [[
        [("Model", [1])],
        [("StyleAligned", [2]), ("Prompts", [3, 4])],
        [("Sample", [5, 6, 7])],
        [("Images", [8])],
    ]],
    "02 StyleAligned - the style of your own image": [[
        [("Model", [1]), ("Style image", [2, 3])],
        [("Invert the style image", [4, 5, 6])],
        [("StyleAligned", [7, 8]), ("Prompts", [9])],
        [("Sample", [10, 11, 12, 13])],
        [("Images", [14])],
    ]],
    "03 StyleAligned - with a depth ControlNet": [[
        [("Model", [1]), ("Depth ControlNet", [6, 7])],
        [("StyleAligned", [2]), ("Prompts", [3, 4])],
        [("Apply ControlNet", [8])],
        [("Sample", [5, 9, 10])],
        [("Images", [11])],
    ]],
    "04 StyleAligned - on top of a LoRA": [[
        [("Model and LoRA", [1, 2])],
        [("StyleAligned", [3]), ("Prompts", [4, 5])],
        [("Sample", [6, 7, 8])],
        [("Images", [9])],
    ]],
    "05 DisenDiff - learn two concepts from one photo, then sample": [[
        [("Model", [1]), ("Training photo", [2])],
        [("Train (DisenDiff)", [3])],
        [("Prompts", [4, 5])],
        [("Sample", [6, 7, 8])],
        [("Images", [9])],
    ]],
    "06 DisenDiff - the exported files with a ControlNet": [[
        [("Model, DisenDiff files", [1, 2]), ("Pose ControlNet", [6, 7])],
        [("Prompts (embeddings)", [4, 5])],
        [("DisenDiff Calibration", [3]), ("Apply ControlNet", [8])],
        [("Sample", [9, 10, 11])],
        [("Images", [12])],
    ]],
    "07 DETEX - learn a subject without its poses and backgrounds": [[
        [("Models", [1, 9]), ("Subject photos", [2, 3, 4])],
        [("Subject masks", [5, 6, 7, 8])],
        [("Train (DETEX)", [10])],
        [("Prompts", [11, 12])],
        [("Sample", [13, 14, 15])],
        [("Images", [16])],
    ]],
    "08 DETEX - the same seed with a pose kept and dropped": [[
        [("Model, DETEX files", [1, 2])],
        [("Prompts", [3, 4, 5])],
        [("Sample: pose dropped", [6, 7, 8]), ("Sample: pose kept", [10, 11])],
        [("Images", [9, 12])],
    ]],
    "09 RealCustom - train an image branch, then sample": [[
        [("Models", [1, 2]), ("Training images", [3, 4, 5])],
        [("Train (RealCustom)", [6]), ("What the word covers", [7])],
        [("Subject reference", [8, 9]), ("Prompt (shared)", [10])],
        [("RealCustom guidance", [11]), ("Prompts", [12, 13])],
        [("Sample", [14, 15, 16]), ("Mask of every step", [18])],
        [("Images", [17, 19])],
    ]],
    "10 RealCustom - with a ControlNet": [[
        [("Models", [1, 2, 3]), ("Subject reference", [4])],
        [("Reference", [5]), ("Prompt (shared)", [13]), ("Canny ControlNet", [14, 15])],
        [("RealCustom guidance", [6]), ("Prompts", [7, 8])],
        [("Apply ControlNet", [16]), ("Sample", [9, 10, 11]), ("Mask of every step", [12])],
        [("Images", [17, 18])],
    ]],
    "11 PVA - identity-preserving face inpainting": [[
        [("Models", [1, 3]), ("Photo to fix", [4])],
        [("Reference faces", [5, 6, 7])],
        [("PVA", [8]), ("Prompts", [9, 10])],
        [("Inpaint", [11, 12, 13])],
        [("Images", [14])],
    ]],
    "12 PVA - on top of a LoRA, with a text edit": [[
        [("Models and LoRA", [1, 2, 3]), ("Photo to fix", [4])],
        [("Reference faces", [5, 6, 7])],
        [("PVA", [8]), ("Prompts", [9, 10])],
        [("Inpaint", [11, 12, 13])],
        [("Images", [14])],
    ]],
    "13 All five techniques in one graph": [
        [
            [("Pass 1: models, files", [1, 2, 3, 4])],
            [("RealCustom subject", [8, 9, 10, 11])],
            [("Prompts", [5, 6]), ("StyleAligned", [7])],
            [("RealCustom guidance", [12]), ("DisenDiff Calibration", [13])],
            [("Pose ControlNet", [14, 15, 16])],
            [("Sample", [17, 18, 19]), ("Mask of every step", [21])],
            [("Images", [20, 22])],
        ],
        [
            [("Pass 2: models, face", [30, 31, 32])],
            [("PVA", [33]), ("Prompts", [34, 35])],
            [("Face region", [36, 37])],
            [("Inpaint the faces", [38, 39, 40])],
            [("Faces", [41])],
        ],
    ],
    "14 StyleAligned - Flux, a batch in one style": [[
        [("Models", [1, 2, 3])],
        [("StyleAligned", [4]), ("Prompts", [5, 6, 7])],
        [("Sample", [8, 9, 10])],
        [("Images", [11])],
    ]],
    "15 StyleAligned - SD3.5, the style of your own image": [[
        [("Models", [1, 2]), ("Style image", [3, 4])],
        [("Invert the style image", [5, 6, 7])],
        [("StyleAligned", [8, 9]), ("Prompts", [10])],
        [("Sample", [11, 12, 13, 14])],
        [("Images", [15])],
    ]],
    "16 RealCustom - Flux, train an image branch, then sample": [[
        [("Models", [1, 2, 3, 4]), ("Training images", [5, 6, 7])],
        [("Train (RealCustom)", [8]), ("What the word covers", [9])],
        [("Subject reference", [10, 11]), ("Prompt (shared)", [12])],
        [("RealCustom guidance", [13]), ("Prompts", [14, 15, 16])],
        [("Sample", [17, 18, 19]), ("Mask of every step", [21])],
        [("Images", [20, 22])],
    ]],
    "17 PVA - Flux, identity-preserving face inpainting": [[
        [("Models", [1, 2, 3, 4]), ("Photo to fix", [5])],
        [("Reference faces", [6, 7, 8])],
        [("PVA", [9]), ("Prompts", [10, 11, 12])],
        [("Inpaint", [13, 14, 15])],
        [("Images", [16])],
    ]],
    "18 Composition - Flux, four techniques, a LoRA and a ControlNet in one graph": [[
        [("Models", [1, 2, 3]), ("Style LoRA", [4])],
        [("Prompt (shared)", [5]), ("StyleAligned", [6])],
        [("RealCustom subject", [7, 8, 9, 10])],
        [("RealCustom guidance", [11]), ("DisenDiff Calibration", [12])],
        [("PVA", [13, 14, 15])],
        [("Prompts", [16, 17, 18]), ("Canny ControlNet", [19, 20])],
        [("Apply ControlNet", [21]), ("Sample", [22, 23, 24]), ("Mask of every step", [26])],
        [("Images", [25, 27])],
    ]],
    "19 StyleAligned - Flux.2, a batch in one style": [[
        [("Models", [1, 2, 3])],
        [("StyleAligned", [4]), ("Prompts", [5, 6])],
        [("Size and steps", [11, 10]), ("Sampler", [7, 8, 9])],
        [("Sample", [12, 13])],
        [("Images", [14])],
    ]],
    "20 RealCustom - Z-Image, train an image branch, then sample": [[
        [("Models", [1, 2, 3, 4, 5]), ("Training images", [6, 7, 8])],
        [("Train (RealCustom)", [9]), ("What the word covers", [10])],
        [("Subject reference", [11, 12]), ("Prompt (shared)", [13])],
        [("RealCustom guidance", [14]), ("Prompts", [15, 16])],
        [("Sample", [17, 18, 19]), ("Mask of every step", [21])],
        [("Images", [20, 22])],
    ]],
}


def _round_up(value: float, step: int = 10) -> int:
    return int(math.ceil(value / step) * step)


def layout(workflow: dict, bands: list, sizes: dict[str, list[float]]) -> dict:
    """Positions, sizes, groups and view of `workflow` (changed in place and returned). `sizes` maps a
    node id (str) to the [width, height] the frontend computes for it (a note: its text's height)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    notes = [node for node in workflow["nodes"] if node["type"] in ("Note", "MarkdownNote")]
    placed = [i for band in bands for column in band for _, ids in column for i in ids]
    expected = sorted(i for i in nodes if nodes[i] not in notes)
    if sorted(placed) != expected:
        raise ValueError(f"COLUMNS must place every node once: placed {sorted(placed)}, nodes {expected}")

    def height(node_id: int) -> int:
        node = nodes[node_id]
        return _round_up(max(sizes[str(node_id)][1], ROOMY_HEIGHT.get(node["type"], 0)))

    groups, x0 = [], 0
    y = 0
    note_right = 0
    for note in notes:  # the read-me column
        note["pos"] = [0, y + NODE_TITLE]
        note["size"] = [NOTE_WIDTH, _round_up(sizes[str(note["id"])][1] + NOTE_MARGIN)]
        y += NODE_TITLE + note["size"][1] + NODE_GAP
        note_right = NOTE_WIDTH + COLUMN_GAP
    band_top = 0
    for band in bands:
        x0, band_bottom = note_right, band_top
        for column in band:
            width = _round_up(max(MIN_NODE_WIDTH, *(sizes[str(i)][0] for _, ids in column for i in ids)))
            y = band_top
            for title, ids in column:
                top = y
                y += GROUP_TITLE + GROUP_PADDING
                for node_id in ids:
                    nodes[node_id]["pos"] = [x0 + GROUP_PADDING, y + NODE_TITLE]
                    nodes[node_id]["size"] = [width, height(node_id)]
                    y += NODE_TITLE + nodes[node_id]["size"][1] + NODE_GAP
                y += GROUP_PADDING - NODE_GAP
                pack_stage = any(nodes[i]["type"] not in STOCK_TYPES for i in ids)
                groups.append({"id": len(groups) + 1, "title": title,
                               "bounding": [x0, top, width + 2 * GROUP_PADDING, y - top],
                               "color": PACK_STAGE_COLOR if pack_stage else STAGE_COLOR,
                               "font_size": 24, "flags": {}})
                y += GROUP_GAP
            band_bottom = max(band_bottom, y - GROUP_GAP)
            x0 += width + 2 * GROUP_PADDING + COLUMN_GAP
        band_top = band_bottom + BAND_GAP
    workflow["groups"] = groups
    workflow.setdefault("extra", {})["ds"] = {"scale": VIEW_SCALE, "offset": [round(VIEW_LEFT / VIEW_SCALE, 1),
                                                                               round(VIEW_TOP / VIEW_SCALE, 1)]}
    return workflow


# Node types of ComfyUI itself (a stage made only of these is drawn in the stock group colour).
STOCK_TYPES = {"CheckpointLoaderSimple", "UNETLoader", "DualCLIPLoader", "TripleCLIPLoader", "VAELoader",
               "LoraLoader", "LoraLoaderModelOnly", "ControlNetLoader", "ControlNetApplyAdvanced", "CLIPVisionLoader",
               "LoadImage", "ImageBatch", "ImageToMask", "CLIPTextEncode", "FluxGuidance", "ConditioningZeroOut",
               "EmptyLatentImage", "EmptySD3LatentImage", "KSampler", "VAEDecode", "VAEEncode", "SaveImage",
               "PreviewImage", "LatentFromBatch", "InpaintModelConditioning", "PrimitiveStringMultiline",
               "CLIPLoader", "EmptyFlux2LatentImage", "Flux2Scheduler", "BasicGuider", "RandomNoise", "KSamplerSelect",
               "SamplerCustomAdvanced", "ModelSamplingAuraFlow"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=Path, default=ROOT / "test-artifacts" / "frontend" / "node_sizes.json",
                        help="node sizes the frontend computed (written by tests/test_frontend.py)")
    args = parser.parse_args()
    measured = json.loads(args.sizes.read_text())
    for stem, bands in COLUMNS.items():
        path = WORKFLOWS / f"{stem}.json"
        workflow = layout(json.loads(path.read_text()), bands, measured[stem])
        path.write_text(json.dumps(workflow, indent=1, ensure_ascii=False) + "\n")
        print(f"laid out {path.name}")
    unknown = sorted({p.stem for p in WORKFLOWS.glob("*.json")} - set(COLUMNS))
    if unknown:
        raise SystemExit(f"no COLUMNS for {unknown}")


if __name__ == "__main__":
    main()
