"""A head from a user's own package (examples/tmass-example-head) joins tmass through its
`tmass.heads` entry point: installed (offline) into a private target, it appears in
`tmass train --help` and passes `tmass check-head`, with no change to tmass."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tmass-example-head"


def test_the_example_plugin_installs_and_passes_check_head(tmp_path):
    source, target = tmp_path / "example", tmp_path / "site"
    # a copy: setuptools builds in the source tree, and the repository stays clean
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}

    def tmass(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from tmass.cli import main; main()", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path)

    def unwrapped(text: str) -> str:  # click wraps help at hyphens too: "best-" / "frame"
        return re.sub(r"-\s+", "-", " ".join(text.split()))

    assert "best-frame" in unwrapped(tmass("train", "--help").stdout)
    assert "best-frame" in unwrapped(tmass("ablate", "--help").stdout)
    check = tmass("check-head", "best-frame")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "best-frame (Best frame: " in check.stdout and "best-frame: all 5 properties hold" in check.stdout
