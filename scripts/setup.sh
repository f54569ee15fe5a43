#!/usr/bin/env bash
# Creates .venv and installs dp360 with its test tools. Idempotent: reinstalls only when
# pyproject.toml changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.dp360-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # The registry's standard torch + torchvision pair first (never a local CPU-only torch wheel:
  # torchvision would then fail to import, and diffusers/transformers with it).
  .venv/bin/python -m pip install --quiet torch torchvision
  .venv/bin/python -m pip install --quiet -e '.[test]'
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import torchvision.ops, diffusers, nerfstudio, cv2, dlib" \
  || { echo "setup: the installed packages do not import; delete .venv and rerun" >&2; exit 1; }
