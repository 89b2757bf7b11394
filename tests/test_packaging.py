"""The built wheel works on its own: examples are package data, the demo finds
its config inside the installed package, and the auto-registration hook ships."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip"]


def _source_copy(dest: Path) -> Path:
    """The source tree as a build sees it, copied out so that building writes
    nothing (build/, egg-info) into the shared working tree."""
    skip = {".git", ".venv", ".testbed", "runs", "out", "build", "dist", ".pytest_cache"}
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [n for n in names if n in skip and Path(d) == ROOT] + list(ignore(d, names)))
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the dir it was installed into with pip --target)."""
    root = tmp_path_factory.mktemp("packaging")
    source = _source_copy(root / "src")
    wheels = root / "wheels"
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = wheels.glob("mergekit_evolver-*.whl")
    target = root / "target"
    subprocess.run(
        [*PIP, "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    return wheel, target


def test_wheel_holds_the_examples_and_the_hook(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for example in ("demo.yml", "recipe.yml", "mergekit_evolve.yml"):
        assert f"mergekit_evolver/examples/{example}" in names
    assert "mergekit_evolver_autoregister.pth" in names
    assert "_mergekit_evolver_autoregister.py" in names


def test_installed_demo_finds_its_config_inside_the_install(installed, tmp_path):
    _, target = installed
    code = (
        "import sys; from mergekit_evolver import cli; print('CONFIG=' + str(cli.DEMO_CONFIG)); "
        "sys.argv = ['mergekit-evolver', 'demo', '--help']; cli.main()"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = Path(next(l for l in done.stdout.splitlines() if l.startswith("CONFIG="))[7:])
    assert config.is_file()
    assert config.resolve().is_relative_to(target.resolve())
    assert config.read_text() == (ROOT / "mergekit_evolver" / "examples" / "demo.yml").read_text()
    assert "--config" in done.stdout and str(config) in " ".join(done.stdout.split())
