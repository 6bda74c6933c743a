#!/usr/bin/env bash
# Sets up (idempotent) and starts the pinned ComfyUI with this pack loaded, on http://127.0.0.1:8188.
# With no checkpoint installed (as ComfyUI would list them, with these arguments), tiny random demo
# models and demo workflows are generated first; existing demo workflows are never overwritten.
# COMFYUI_PATH=/path/to/ComfyUI uses that install instead; extra arguments go to ComfyUI's main.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
COMFY_DIR="${COMFYUI_PATH:-$ROOT/.comfyui}"
PY="$ROOT/.venv/bin/python"

if ! "$PY" "$ROOT/scripts/checkpoint_installed.py" "$COMFY_DIR" "$@"; then
  echo "[start] no checkpoint found: generating the tiny demo models and demo workflows"
  "$PY" "$ROOT/scripts/demo_assets.py" "$COMFY_DIR"
fi

device_flags=()
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null || device_flags=(--cpu)
cd "$COMFY_DIR"
exec "$PY" main.py --listen 127.0.0.1 "${device_flags[@]}" "$@"
