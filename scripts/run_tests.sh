#!/usr/bin/env bash
# The test command (README, .ci/run): builds/refreshes the pinned environment, then runs the suite
# against the real ComfyUI on tiny generated checkpoints (cached in $PERSONALIZATION_TEST_CACHE).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
bash "$ROOT/scripts/setup_frontend_test.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
