#!/usr/bin/env bash
# Creates a virtual environment (default .venv) and installs dp360 with its test tools, pinned
# to constraints.txt (the versions the suite last passed with). Idempotent: reinstalls only when
# pyproject.toml or constraints.txt changed since the last successful install.
#   VENV=.venv-upgrade CONSTRAINTS= scripts/setup.sh    # the newest versions instead (make upgrade-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
CONSTRAINTS="${CONSTRAINTS-constraints.txt}"
pin=()
if [ -n "$CONSTRAINTS" ]; then pin=(-c "$CONSTRAINTS"); fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.dp360-installed"
want=$(cat pyproject.toml ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # The registry's standard torch + torchvision pair first (never a local CPU-only torch wheel:
  # torchvision would then fail to import, and diffusers/transformers with it).
  "$VENV/bin/python" -m pip install --quiet ${pin[@]+"${pin[@]}"} torch torchvision
  "$VENV/bin/python" -m pip install --quiet ${pin[@]+"${pin[@]}"} -e '.[test]'
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torchvision.ops, diffusers, nerfstudio, cv2, dlib" \
  || { echo "setup: the installed packages do not import; delete .venv and rerun" >&2; exit 1; }
