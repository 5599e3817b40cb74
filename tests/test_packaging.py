"""`pip install .` gives a working memft: a wheel built from the checkout, installed into a fresh venv, lists its
built-in recipes and trains the quickstart from a directory outside the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "memft").rglob("__init__.py")}
    assert found and set(packages) == found | {"memft.configs", "memft.recipes"}


def test_a_wheel_installed_into_a_fresh_venv_trains_the_quickstart_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy, so the checkout stays clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "memft", "configs", "recipes"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True, timeout=600, cwd=tmp_path)
    [wheel] = dist.glob("memft-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the dependencies are this interpreter's (no downloads); memft itself only from the wheel
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "memft-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True,
                   timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    where = subprocess.run([python, "-c", "import memft; print(memft.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(purelib)  # the wheel's memft, not the checkout's
    memft = venv / "bin" / "memft"
    listed = subprocess.run([memft, "recipes"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "quickstart.yaml" in listed.stdout and "stories260K" in listed.stdout
    run = subprocess.run([memft, "train", "recipes/quickstart.yaml", "train.max_steps=2", "train.eval_every=null",
                          "output.plot=false"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "summary.json").is_file()
