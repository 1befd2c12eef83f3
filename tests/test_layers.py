"""The stages depend one way (setup.cfg's [importlinter] contracts): features <- extract;
features <- train <- evaluate; the tmass package's own modules on top.

import-linter walks a package's folder, but the stage folders sit beside tmass/ and
install into it (setup.cfg's package_dir). So the contracts are checked on a copy of
the sources laid out as installed, in a subprocess whose ``tmass`` is that copy."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def installed_layout(dest: Path) -> Path:
    """Copy the Python sources to ``dest`` as setup.cfg's package_dir installs them."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    mapping = [line.split("=") for line in config["options"]["package_dir"].strip().splitlines()]
    for package, folder in sorted((p.strip(), f.strip()) for p, f in mapping):  # tmass before tmass.*
        target = dest.joinpath(*package.split("."))
        for source in (ROOT / folder).rglob("*.py"):
            relative = source.relative_to(ROOT / folder)
            if package == "tmass" and len(relative.parts) > 1:
                continue  # only tmass/'s own modules; its sub-packages come from their folders
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / relative)
    return dest


def lint(layout: Path) -> subprocess.CompletedProcess:
    """import-linter with setup.cfg's contracts, on the package laid out in ``layout``."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
         str(ROOT / "setup.cfg"), "--no-cache"],
        cwd=layout, capture_output=True, text=True, env={"PATH": "", "PYTHONPATH": str(layout)},
    )


def test_the_stages_depend_one_way(tmp_path):
    result = lint(installed_layout(tmp_path / "src"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken" in result.stdout, result.stdout


def test_an_import_against_the_layers_is_caught(tmp_path):
    layout = installed_layout(tmp_path / "src")
    data = layout / "tmass" / "train" / "data.py"
    data.write_text(data.read_text() + "\nimport tmass.evaluate.metrics  # validation from below: not allowed\n")
    result = lint(layout)
    assert result.returncode == 1 and "tmass.train is not allowed to import tmass.evaluate" in result.stdout, result.stdout
