"""Demo assets for a ComfyUI without checkpoints: tiny random-weight models (the test harness's builders)
and a copy of every example workflow that can run on them, wired to them at demo size, so it runs end to
end on the CPU in a few minutes.

The demo models have random weights: outputs are noise, as each demo copy's read-me note says (written for
the demo: what it runs, the files it loads and writes); its saved view opens the note right of the
Workflows sidebar, from which users open the demo copies. Files a trainer workflow writes (embeddings) ship
as random stand-ins, so a demo that uses them runs before its trainer did (running the trainer's demo
replaces them); in the demo copies these files are called demo_<name>, so no stand-in ever answers for a
file the real workflows name. Left out: workflows that need a CLIP vision model (ComfyUI only loads
full-size ones, 0.6 GB even with random weights), PVA (its ArcFace backbone has one fixed file name, which
a random stand-in must not take) or a DiT family (Flux, Flux.2, SD3.5, Z-Image: recognised by their text-encoder
loaders; the demo models are SD1.5, and ComfyUI's stock loaders build only full-size Flux and DiT text encoders).
Existing demo copies are never overwritten (they may hold the user's edits).

Usage: python scripts/demo_assets.py <ComfyUI folder>
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_FOLDER = "personalization-demo"  # in the Workflows sidebar
DEMO_SIZE, DEMO_STEPS, DEMO_TRAIN_STEPS = 128, 8, 8
NOT_IN_THE_DEMO = {"CLIPVisionLoader", "PVALoader", "DualCLIPLoader", "TripleCLIPLoader", "CLIPLoader"}
TRAINERS = ("DisenDiffTrainer", "DecoupledTokenTrainer", "RealCustomTrainer")
# Users open the demo copies from the Workflows sidebar, which stays open over the left of the canvas (a
# fifth of the window: its right edge at 365 px on a 1600 px wide window, 429 px at 1920): the saved view of a
# demo copy is the example's moved right by this much, so the read-me note opens right of the sidebar on
# windows up to ~2000 px wide.
WORKFLOWS_SIDEBAR_WIDTH = 360
# About how the frontend draws a read-me note's markdown (its 10 px font, in a 420 wide note): a line holds
# this many visible characters and is this high (graph units); fitted on frontend 1.32.9, whose drawing of
# every demo note tests/test_frontend.py checks.
NOTE_LINE_CHARS, NOTE_LINE_HEIGHT = 68, 14


def _harness():
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import tiny_workflows, workflows
    return tiny_workflows, workflows


def runs_on_demo_models(workflow: dict) -> bool:
    return not {node["type"] for node in workflow["nodes"]} & NOT_IN_THE_DEMO


def trained_names() -> list[str]:
    """The names the example trainers save their files under (their `name` widget)."""
    _, workflows = _harness()
    return sorted({_widget_values(workflows, node)["name"] for path in sorted((ROOT / "workflows").glob("*.json"))
                   for node in json.loads(path.read_text())["nodes"] if node["type"] in TRAINERS})


def demo_workflow(workflow: dict, input_dir: Path) -> dict:
    """A copy of `workflow` wired to the tiny models at demo size (input images and stand-in files
    written), the trainers' files called demo_<name>, its read-me note written for the demo, its view moved
    right of the Workflows sidebar, without the real models' download list."""
    tiny_workflows, workflows = _harness()
    demo = copy.deepcopy(workflow)
    for node in demo["nodes"]:
        if node["type"] in workflows.FRONTEND_ONLY:
            continue
        node["widgets_values"] = [_demo_names(value) if isinstance(value, str) else value
                                  for value in node.get("widgets_values") or []]
        current = _widget_values(workflows, node)
        overrides = tiny_workflows.tiny_inputs(node["type"], current, DEMO_SIZE, DEMO_STEPS, DEMO_TRAIN_STEPS)
        if node["type"] in TRAINERS:
            overrides["checkpoint_every"] = 0
        workflows.set_ui_widgets(node, overrides)
        if node["type"] == "LoadImage" and not (input_dir / current["image"]).exists():
            tiny_workflows.write_input_image(current["image"], input_dir, DEMO_SIZE)
    for note in (n for n in demo["nodes"] if n["type"] in ("Note", "MarkdownNote")):
        original = note["widgets_values"][0]
        note["widgets_values"][0] = demo_note(original, demo)
        # the read-me column has nothing below its note; its size fits the original's text
        note["size"][1] += _text_height(note["widgets_values"][0]) - _text_height(original)
    view = demo["extra"]["ds"]
    view["offset"][0] = round(view["offset"][0] + WORKFLOWS_SIDEBAR_WIDTH / view["scale"], 1)
    demo.pop("models", None)  # the tiny files stand in for them
    return demo


def _demo_names(text: str) -> str:
    """`text` with the names the example trainers save under changed to demo_<name>."""
    return re.sub(r"(?<!\w)(" + "|".join(map(re.escape, trained_names())) + ")", r"demo_\1", text)


def demo_note(note: str, demo: dict) -> str:
    """The read-me of a demo copy: what the demo does and that its pictures are noise, the original's
    explanation with the demo's names, and the files the demo loads and writes instead of the downloads."""
    tiny_workflows, workflows = _harness()
    explanation, _, models = note.partition("## Models\n")
    nodes = [(node["type"], _widget_values(workflows, node)) for node in demo["nodes"]
             if node["type"] not in workflows.FRONTEND_ONLY]
    trains = any(kind in TRAINERS for kind, _ in nodes)
    steps = f"{DEMO_STEPS} steps" + (f", {DEMO_TRAIN_STEPS} training steps" if trains else "")
    banner = (f"> **DEMO** on tiny random-weight models: the images are noise by design. It runs this graph end "
              f"to end on the CPU in minutes ({DEMO_SIZE} px, {steps}) to show how it works. The original, for "
              "real models: Templates → personalization_nodes.\n\n")
    lines = ["## Models (demo)", "Random weights, made by `scripts/demo_assets.py`:"]
    loaded = set()
    for kind, values in nodes:
        if kind in tiny_workflows.TINY_MODELS:
            widget, path = tiny_workflows.TINY_MODELS[kind]
            loaded.add(f"- `models/{path().parent.name}/{values[widget]}`")
    lines += sorted(loaded)
    texts = [value for _, values in nodes for value in values.values() if isinstance(value, str)]
    written_here = {values["name"] for kind, values in nodes if kind in TRAINERS}  # already demo_<name>
    stand_ins = {f"demo_{name}" for name in trained_names() if any(f"demo_{name}" in text for text in texts)}
    lines += [f"- `models/embeddings/{name}_*`: random stand-ins for a trainer's files, so this runs before any "
              "training" for name in sorted(stand_ins - written_here)]
    written = models.partition("Written by this graph:\n")[2].strip()
    if written:
        lines += ["", "Written by this graph:", _demo_names(written)]
    return banner + _demo_names(explanation) + "\n".join(lines)


def _text_height(markdown: str) -> int:
    """About the height the frontend draws `markdown` at in a read-me note: its lines, wrapped."""
    def visible(line: str) -> str:
        return re.sub(r"[*`\[\]]|^#+ |^> |^- ", "", re.sub(r"\]\([^)]*\)", "]", line))  # link targets, marks
    return NOTE_LINE_HEIGHT * sum(max(1, math.ceil(len(visible(line)) / NOTE_LINE_CHARS))
                                  for line in markdown.splitlines() if line.strip())


def _widget_values(workflows, node: dict) -> dict:
    """The node's widget values by input name (as ui_to_api reads them)."""
    api = workflows.ui_to_api({"nodes": [{**node, "inputs": []}], "links": []})
    return api[str(node["id"])]["inputs"]


def write_demo_copies(target: Path, input_dir: Path) -> list[Path]:
    """Demo copies of workflows/*.json in `target`, except those that exist already; returns the paths
    of every demo copy."""
    target.mkdir(parents=True, exist_ok=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted((ROOT / "workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        if not runs_on_demo_models(workflow):
            print(f"no demo of {path.stem}: it needs a CLIP vision model, PVA's ArcFace or a Flux / Flux.2 / SD3.5 / "
                  "Z-Image model")
            continue
        copy_path = target / path.name
        written.append(copy_path)
        if copy_path.exists():
            print(f"kept {copy_path} (not overwritten)")
            continue
        tmp = copy_path.with_name(f".{copy_path.name}.tmp")
        tmp.write_text(json.dumps(demo_workflow(workflow, input_dir), indent=1, ensure_ascii=False))
        os.replace(tmp, copy_path)
    return written


def main(comfy_dir: Path) -> None:
    os.environ["PERSONALIZATION_TEST_CACHE"] = str(comfy_dir)  # the builders write into <comfy>/models/...
    _harness()
    from harness import comfy_env
    comfy_env.boot_comfy()
    target = comfy_dir / "user" / "default" / "workflows" / DEMO_FOLDER
    copies = write_demo_copies(target, comfy_dir / "input")
    print(f"demo models in {comfy_dir / 'models'}, {len(copies)} demo workflows in {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
