"""Runs every workflows/*.json for real and writes the README's example outputs to docs/outputs/.

There is no real checkpoint on the machines this pack is built on, so the runs use the test harness's
TINY RANDOM-weight models (real ComfyUI, real SD1.5 layouts, shrunk sizes and steps). Their images are
noise by design: each sheet says so in its banner. They show that every graph runs end to end and what
each SaveImage produces (images, mask previews). With a real checkpoint, load the workflow in ComfyUI.

Usage: .venv/bin/python scripts/readme_outputs.py [--size 128] [--steps 4] [--out docs/outputs]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

BANNER = "tiny RANDOM-weight demo checkpoint: noise by design, shows the graph runs"
TILE, MAX_TILES, BANNER_HEIGHT = 128, 8, 34


def contact_sheet(title: str, images: list[Path]) -> Image.Image:
    """The images of one workflow side by side (at most MAX_TILES), under a two-line banner."""
    tiles = [Image.open(path).convert("RGB").resize((TILE, TILE), Image.NEAREST) for path in images[:MAX_TILES]]
    sheet = Image.new("RGB", (max(len(tiles), 4) * TILE, TILE + BANNER_HEIGHT), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (i * TILE, BANNER_HEIGHT))
    draw = ImageDraw.Draw(sheet)
    more = f" (+{len(images) - MAX_TILES} more)" if len(images) > MAX_TILES else ""
    draw.text((4, 2), f"{title}: {len(images)} image(s){more}", fill="black")
    draw.text((4, 17), BANNER, fill="firebrick")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="latent image size in pixels")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "outputs")
    args = parser.parse_args()

    from harness.comfy_env import boot_comfy
    from harness.tiny_workflows import WORKFLOWS, shrink_for_tiny_models
    from harness.workflows import execute_workflow, load_ui_workflow, saved_image_paths, ui_to_api

    comfy = boot_comfy()
    input_dir = Path(comfy.folder_paths.get_input_directory())
    args.out.mkdir(parents=True, exist_ok=True)
    for workflow in WORKFLOWS:
        api = shrink_for_tiny_models(ui_to_api(load_ui_workflow(workflow)), input_dir, args.size, args.steps)
        results = execute_workflow(api)
        images = [path for node_id, node in api.items() if node["class_type"] == "SaveImage"
                  for path in saved_image_paths(results[node_id])]
        contact_sheet(workflow.stem, images).save(args.out / f"{workflow.stem}.png", optimize=True)
        print(f"{workflow.stem}: {len(images)} image(s) -> {args.out / (workflow.stem + '.png')}")


if __name__ == "__main__":
    main()
