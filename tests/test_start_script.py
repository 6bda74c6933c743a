"""scripts/start_comfyui.sh generates the tiny demo only when ComfyUI would offer no checkpoint: the
check (scripts/checkpoint_installed.py, run as the start script runs it) against temporary model
folders given to ComfyUI as --base-directory or extra model paths."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness.comfy_env import comfy_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECK = REPO_ROOT / "scripts" / "checkpoint_installed.py"
START = REPO_ROOT / "scripts" / "start_comfyui.sh"


def _checkpoint_installed(*main_args: str) -> bool:
    result = subprocess.run([sys.executable, str(CHECK), str(comfy_dir()), *main_args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode == 0


def _base_with(tmp_path: Path, *files: str) -> Path:
    base = tmp_path / "base"
    (base / "models" / "checkpoints").mkdir(parents=True)
    for name in files:
        path = base / "models" / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"weights")
    return base


def test_the_start_script_runs_this_check_with_its_arguments():
    script = START.read_text()
    assert re.search(r'if ! "\$PY" "\$ROOT/scripts/checkpoint_installed.py" "\$COMFY_DIR" "\$@"; then\n'
                     r'.*\n\s*"\$PY" "\$ROOT/scripts/demo_assets.py"', script), \
        "start_comfyui.sh generates the demo only when checkpoint_installed.py finds no checkpoint"


def test_no_checkpoint(tmp_path):
    assert not _checkpoint_installed("--base-directory", str(_base_with(tmp_path)))
    assert not _checkpoint_installed("--base-directory", str(_base_with(tmp_path / "x", "notes.txt")))


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "model.pt", "SDXL/model.safetensors"])
def test_any_checkpoint_comfyui_lists(tmp_path, name):
    """A .safetensors without any .ckpt (the old `ls *.safetensors *.ckpt` failed here), a .ckpt, other
    extensions ComfyUI loads, a sub-folder."""
    assert _checkpoint_installed("--base-directory", str(_base_with(tmp_path, name)))


def test_checkpoint_in_extra_model_paths(tmp_path):
    elsewhere = _base_with(tmp_path / "elsewhere", "model.safetensors")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"mine:\n  base_path: {elsewhere / 'models'}\n  checkpoints: checkpoints\n")
    empty = _base_with(tmp_path)
    assert not _checkpoint_installed("--base-directory", str(empty))
    assert _checkpoint_installed("--base-directory", str(empty), "--extra-model-paths-config", str(config))
