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
# nerfstudio's ns-export imports open3d, which loads the system library libusb-1.0 on Linux
# (a fresh Debian lacks it: "ImportError: libusb-1.0.so.0"). Installed with apt when we are root.
if [ "$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep 'libusb-1\.0\.so\.0' >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libusb-1.0-0 >/dev/null; } \
      || echo "setup: could not install libusb-1.0-0 with apt; ns-export will not work until it is installed" >&2
  else
    echo "setup: the system library libusb-1.0 is missing; ns-export (open3d) needs it: install libusb-1.0-0 (Debian/Ubuntu: sudo apt-get install libusb-1.0-0)" >&2
  fi
fi
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
# ns-render asks for an `ffmpeg` on PATH: the one imageio-ffmpeg ships (H.264) is linked into the venv.
if [ ! -e "$VENV/bin/ffmpeg" ]; then
  ln -s "$("$VENV/bin/python" -c 'import imageio_ffmpeg as f; print(f.get_ffmpeg_exe())')" "$VENV/bin/ffmpeg" || true
fi
# Headless Chromium for tests/report/test_report.py (it renders export/report.html): installed only where
# apt-get can (Debian/Ubuntu, as root); elsewhere the browser check of that test is skipped.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }; } \
    || echo "setup: could not install chromium; tests/report/test_report.py will skip its browser check" >&2
fi
