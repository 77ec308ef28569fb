"""The package as a user installs it: a wheel built from the repository, installed into a fresh
virtual environment, runs bundled recipes and the bundled eval task group from outside the
source tree. The environment sees the system's packages (torch, OLMo-core) and the wheel is
installed without dependencies, so nothing is downloaded."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _build_wheel(tmp: Path) -> Path:
    """Builds the wheel from a copy of the sources (so the checkout gets no build/ folder)."""
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "olmoe_spattn", src / "olmoe_spattn", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    # offline with the setuptools already installed; else pip fetches it into an isolated build env
    local = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *local, "-q", "-w", str(tmp / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp / "dist").glob("olmoe_spattn-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_runs_bundled_recipe_and_eval_tasks_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("olmoe_spattn/recipes/olmoe-1b-7b.yaml", "olmoe_spattn/recipes/tiny.yaml", "olmoe_spattn/data/tiny_text.txt",
                 "olmoe_spattn/eval_tasks/paper/paper.yaml", "olmoe_spattn/eval_tasks/offline/utils.py"):
        assert path in names, f"{path} missing from the wheel"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = str(env_dir / "bin" / "olmoe-spattn")

    def run(*argv: str) -> str:
        p = subprocess.run([cli, *argv], cwd=work, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    installed = str(env_dir.resolve())
    out = run("train", "olmoe-1b-7b", "--dry-run")
    recipe_line = next(line for line in out.splitlines() if line.startswith("# recipe:"))
    assert installed in recipe_line and recipe_line.endswith("olmoe_spattn/recipes/olmoe-1b-7b.yaml"), recipe_line
    assert "olmoe-spattn eval" in run("eval", "--tasks", "paper", "--help")

    # the installed copy (not the checkout) is what ran, and it finds the bundled task folder
    probe = ("from olmoe_spattn.commands.eval import default_include_path as d; import olmoe_spattn;"
             "print(olmoe_spattn.__file__); print((d() / 'paper' / 'paper.yaml').is_file())")
    p = subprocess.run([str(python), "-c", probe], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    where, found = p.stdout.split()
    assert where.startswith(installed) and found == "True", p.stdout + p.stderr
