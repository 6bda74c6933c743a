"""Runs every workflows/*.json for real and writes the README's example outputs to docs/outputs/ and the
Templates browser's thumbnail of each workflow (workflows/<name>.jpg, which ComfyUI serves beside it).

There is no real checkpoint on the machines this pack is built on, so the runs use the test harness's
TINY RANDOM-weight models (real ComfyUI, real SD1.5, Flux, Flux.2, SD3.5 and Z-Image layouts, shrunk sizes and
steps).
Their images are noise by design: each sheet says so in its banner. They show that every graph runs end to end and what
each SaveImage produces (images, mask previews). With a real checkpoint, load the workflow in ComfyUI.

Usage: .venv/bin/python scripts/readme_outputs.py [--size 128] [--steps 4] [--out docs/outputs] [--only NAME]
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
THUMBNAIL_TILE, THUMBNAIL_GRID = 256, 2  # the browser shows thumbnails about 250 px wide: 2 x 2 images


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


def thumbnail(title: str, images: list[Path]) -> Image.Image:
    """The first images of a workflow in a square grid under the same banner, for the Templates browser."""
    grid = THUMBNAIL_TILE * THUMBNAIL_GRID
    picture = Image.new("RGB", (grid, grid + 2 * BANNER_HEIGHT), "white")
    for i, path in enumerate(images[: THUMBNAIL_GRID**2]):
        tile = Image.open(path).convert("RGB").resize((THUMBNAIL_TILE, THUMBNAIL_TILE), Image.NEAREST)
        row, column = divmod(i, THUMBNAIL_GRID)
        picture.paste(tile, (column * THUMBNAIL_TILE, 2 * BANNER_HEIGHT + row * THUMBNAIL_TILE))
    draw = ImageDraw.Draw(picture)
    draw.text((6, 4), title, fill="black", font_size=18)
    draw.text((6, 40), BANNER, fill="firebrick", font_size=14)
    return picture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="latent image size in pixels")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "outputs")
    parser.add_argument("--only", help="run only the workflow whose name starts with this")
    args = parser.parse_args()

    from harness import dit
    from harness.comfy_env import boot_comfy
    from harness.tiny_workflows import WORKFLOWS, shrink_for_tiny_models
    from harness.workflows import execute_workflow, load_ui_workflow, saved_image_paths, ui_to_api

    comfy = boot_comfy()
    input_dir = Path(comfy.folder_paths.get_input_directory())
    args.out.mkdir(parents=True, exist_ok=True)
    for workflow in WORKFLOWS:
        if args.only and not workflow.stem.startswith(args.only):
            continue
        api = ui_to_api(load_ui_workflow(workflow))
        family = dit.family_of(api)  # Flux / Flux.2 / SD3.5 / Z-Image: the tiny DiT models, some through test-only
        # loaders
        shrink_for_tiny_models(api, input_dir, args.size, args.steps)
        with dit.stand_in_nodes():
            results = execute_workflow(api)
        images = [path for node_id, node in api.items() if node["class_type"] == "SaveImage"
                  for path in saved_image_paths(results[node_id])]
        del results
        if family:
            dit.release(family)
        contact_sheet(workflow.stem, images).save(args.out / f"{workflow.stem}.png", optimize=True)
        thumbnail(workflow.stem, images).save(workflow.with_suffix(".jpg"), quality=88)
        print(f"{workflow.stem}: {len(images)} image(s) -> {args.out / (workflow.stem + '.png')}, "
              f"{workflow.with_suffix('.jpg').name}")


if __name__ == "__main__":
    main()
