"""Demo assets for a ComfyUI without checkpoints: tiny random models (the test harness's builders) and
copies of workflows/*.json that use them, so every example workflow runs out of the box.

The demo models have random weights: outputs are noise, clearly labelled as such in each demo
workflow. Usage: python scripts/demo_assets.py <ComfyUI folder>
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO_SIZE, DEMO_STEPS = 256, 8

# widget index of the model file of each loader in workflows/*.json
MODEL_WIDGETS = {"CheckpointLoaderSimple": ("checkpoint", 0), "ControlNetLoader": ("controlnet", 0),
                 "LoraLoader": ("lora", 0), "LoraLoaderModelOnly": ("lora", 0)}
# Loaders of weights the demo cannot make up (vision encoders, trained adapters): such workflows are skipped.
NEEDS_REAL_WEIGHTS = {"CLIPVisionLoader", "PVALoader", "RealCustomLoader"}


def demo_workflow(workflow: dict, model_names: dict[str, str]) -> dict:
    for node in workflow["nodes"]:
        kind, values = node["type"], node.get("widgets_values")
        if kind in MODEL_WIDGETS:
            role, index = MODEL_WIDGETS[kind]
            values[index] = model_names[role]
        elif kind == "EmptyLatentImage":
            values[0] = values[1] = DEMO_SIZE
        elif kind == "KSampler":
            values[2] = DEMO_STEPS
        elif kind == "SharedAttentionInvertReference":
            values[0] = DEMO_STEPS
        elif kind == "SharedAttentionApplyReference":
            values[0] = min(values[0], DEMO_STEPS // 2)
    workflow["extra"]["info"] = ("DEMO on a tiny RANDOM-weight SD1.5 model: the images are noise. Load a real "
                                 "checkpoint and the original workflow for real results. " + workflow["extra"].get("info", ""))
    return workflow


def main(comfy_dir: Path) -> None:
    os.environ["PERSONALIZATION_TEST_CACHE"] = str(comfy_dir)  # the builders write into <comfy>/models/...
    sys.path.insert(0, str(ROOT / "tests"))
    from harness import checkpoints, comfy_env

    comfy_env.boot_comfy(require_pack=False)
    names = {"checkpoint": checkpoints.sd15_checkpoint_path().name,
             "controlnet": checkpoints.sd15_controlnet_path().name,
             "lora": checkpoints.sd15_lora_path().name}
    target = comfy_dir / "user" / "default" / "workflows" / "personalization-demo"
    target.mkdir(parents=True, exist_ok=True)
    input_dir = comfy_dir / "input"
    input_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for path in sorted((ROOT / "workflows").glob("*.json")):
        workflow = json.loads(path.read_text())
        missing = sorted({node["type"] for node in workflow["nodes"]} & NEEDS_REAL_WEIGHTS)
        if missing:
            print(f"skipped {path.name}: needs real weights for {', '.join(missing)}")
            continue
        workflow = demo_workflow(workflow, names)
        (target / path.name).write_text(json.dumps(workflow, indent=1))
        for node in workflow["nodes"]:
            if node["type"] == "LoadImage" and not (input_dir / node["widgets_values"][0]).exists():
                pixels = rng.integers(0, 255, (DEMO_SIZE, DEMO_SIZE, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(input_dir / node["widgets_values"][0])
    print(f"demo models in {comfy_dir / 'models'}, demo workflows in {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
