"""`pip install ./python` in a fresh virtual environment, offline: the C++ extensions
build with CMake (python/setup.py), and the installed package works with nothing of
the checkout on the path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PYTHON_DIR = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (PYTHON_DIR.parent / "CMakeLists.txt").exists(), reason="needs the checkout")
def test_pip_install_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-build-isolation",
           "--no-index", str(PYTHON_DIR)]
    subprocess.run(pip, check=True, env=env, cwd=tmp_path)
    python = str(venv / "bin" / "python")
    out = subprocess.run([python, "-c", "import erpy, erpy._node; print(erpy.encode(1).hex(), erpy.__file__)"],
                         check=True, env=env, cwd=tmp_path, capture_output=True, text=True).stdout.split()
    assert out[0] == "836101"  # 131, SMALL_INTEGER_EXT 1
    assert out[1].startswith(str(venv))  # the installed copy, not the checkout
    assert (Path(out[1]).parent / "py.typed").exists()
    usage = subprocess.run([python, "-m", "erpy.node", "--help"], check=True, env=env, cwd=tmp_path,
                           capture_output=True, text=True).stdout
    assert "--name" in usage and "--cookie" in usage
