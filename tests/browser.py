"""Headless Chromium for the tests that look at a page as a person would (the run report, the
viewer). scripts/setup.sh installs Debian's `chromium` when run as root; elsewhere those tests
skip their browser part."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CHROMIUM = next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)
NO_CHROMIUM = "headless Chromium is not installed (scripts/setup.sh installs Debian's `chromium` when run as root)"


def chromium(profile: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs headless Chromium with its own profile folder (no GPU: WebGL runs on SwiftShader)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += ["--no-first-run", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
