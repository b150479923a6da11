"""Builds erpy's C++ extensions with CMake for `pip install ./python` (see pyproject.toml).

The sources are the repository's (c_src/, one folder up); CMake's ERPY_PYTHON_PACKAGE
build makes only erpy._native and erpy._node, for the interpreter pip runs, straight into
the wheel's package folder.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent.parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        if not (ROOT / "CMakeLists.txt").exists():
            raise RuntimeError(f"erpy: the C++ sources are not at {ROOT} (install from a checkout: pip install ./python)")
        out = Path(self.get_ext_fullpath("erpy._native")).resolve().parent
        build = Path(self.build_temp).resolve() / "cmake"
        build.mkdir(parents=True, exist_ok=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--log-level=WARNING", "-S", str(ROOT), "-B", str(build),
                        "-DCMAKE_BUILD_TYPE=Release", "-DERPY_PYTHON_PACKAGE=ON", "-DERPY_WERROR=OFF",
                        f"-DERPY_PYTHON={sys.executable}", f"-DERPY_PYMOD_DIR={out}"], check=True)
        subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", "erpy_native", "erpy_node"],
                       check=True)


setup(ext_modules=[CMakeExtension("erpy._native"), CMakeExtension("erpy._node")],
      cmdclass={"build_ext": CMakeBuild})
