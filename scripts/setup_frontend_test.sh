#!/usr/bin/env bash
# Installs what tests/test_frontend.py needs on top of scripts/setup_env.sh: Debian's `chromium` and the
# pinned `playwright-core` (tests/frontend/package.json + lock) in the git-ignored .frontend-test/.
# No browser is downloaded: Playwright drives /usr/bin/chromium. Idempotent: returns at once when both
# are already there and the lock file has not changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SPEC="$ROOT/tests/frontend"
TARGET="$ROOT/.frontend-test"
STAMP="$TARGET/.installed-lock.sha256"

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "[frontend-test] chromium missing; run as root or: sudo apt-get install -y chromium" >&2
    exit 1
  fi
  # A fresh machine may have no package lists yet (or lists that predate the candidate): update only then.
  policy="$(apt-cache policy chromium 2>/dev/null || true)"
  if ! grep -q 'Candidate: [0-9]' <<<"$policy"; then
    apt-get update -qq
  fi
  echo "[frontend-test] apt-get install chromium"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "[frontend-test] node and npm are needed (Node.js >= 20)" >&2
  exit 1
fi

lock_hash="$(cat "$SPEC/package.json" "$SPEC/package-lock.json" | sha256sum)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$lock_hash" ] && [ -d "$TARGET/node_modules/playwright-core" ]; then
  echo "frontend test tools up to date: $(chromium --version 2>/dev/null), playwright-core in $TARGET"
  exit 0
fi

echo "[frontend-test] npm ci (pinned playwright-core) into $TARGET"
mkdir -p "$TARGET"
cp "$SPEC/package.json" "$SPEC/package-lock.json" "$TARGET/"
# PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but say it for any future version.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --prefix "$TARGET" --no-audit --no-fund --ignore-scripts --loglevel=error
echo "$lock_hash" > "$STAMP"
echo "frontend test tools ready: $(chromium --version 2>/dev/null), playwright-core in $TARGET"
