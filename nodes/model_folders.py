"""The pack's own folders under ComfyUI's models directory."""
from __future__ import annotations

import os

import folder_paths


def register_model_folder(name: str) -> None:
    """``models/<name>`` as a ComfyUI model folder listing safetensors only (no pickle is ever read)."""
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], {".safetensors"})
