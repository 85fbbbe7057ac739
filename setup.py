"""Builds imagen_fast._C with CMake + ninja (pybind11 only, no torch headers).

Environment:
  IMAGEN_FAST_CUDA=0/1     force the CUDA kernels off / on (default: on when nvcc is found)
  CMAKE_CUDA_ARCHITECTURES override the default "80;90a"
  IMAGEN_FAST_NATIVE=0     do not compile the CPU kernels with -march=native
  IMAGEN_FAST_AVX512=0     build only the portable variant of the CPU kernels (x86-64
                           builds also hold an AVX-512 variant, chosen at run time)
  IMAGEN_FAST_REQUIRE_EXTENSION=1  fail the install when the build fails (default: warn
                           and install the pure-Python package on the reference backend)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


def _cmake_args(out_dir: Path) -> list:
    import pybind11

    args = [
        f"-DIMAGEN_FAST_OUTPUT_DIR={out_dir}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    cuda = os.environ.get("IMAGEN_FAST_CUDA")
    if cuda is not None:
        args.append(f"-DIMAGEN_FAST_CUDA={'ON' if cuda == '1' else 'OFF'}")
    if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
    if os.environ.get("IMAGEN_FAST_NATIVE") == "0":
        args.append("-DIMAGEN_FAST_NATIVE=OFF")
    if os.environ.get("IMAGEN_FAST_AVX512") == "0":
        args.append("-DIMAGEN_FAST_AVX512=OFF")
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    nvcc = Path(cuda_home) / "bin" / "nvcc"
    if not os.environ.get("CUDACXX") and nvcc.exists():
        args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    ninja = _ninja()
    if ninja:
        # named every time: a build directory configured by an earlier pip build keeps
        # that build environment's ninja (deleted since) in its cache
        args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    return args


def _ninja():
    """The ninja executable: on PATH, else the one the ninja package brings (its bin
    directory is not on PATH in a virtualenv that was not activated)."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    exe = Path(ninja.BIN_DIR) / "ninja"
    return str(exe) if exe.exists() else None


def _generator(args: list) -> str:
    return args[args.index("-G") + 1] if "-G" in args else "Unix Makefiles"


def _forget_other_generator(build_dir: Path, generator: str) -> None:
    """CMake refuses to reconfigure a build directory for another generator (an earlier
    build had ninja, this one has not): start that directory afresh."""
    cache = build_dir / "CMakeCache.txt"
    if cache.exists() and f"CMAKE_GENERATOR:INTERNAL={generator}\n" not in cache.read_text():
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


class CMakeBuild(build_ext):
    def run(self):
        try:
            super().run()
        except (OSError, subprocess.CalledProcessError) as e:
            if os.environ.get("IMAGEN_FAST_REQUIRE_EXTENSION") == "1":
                raise
            print(f"WARNING: building imagen_fast._C failed ({e}); installing without it. "
                  "The ops will run on the torch reference backend.", file=sys.stderr)
            # Nothing was built: tell setuptools there is no extension to copy.
            self.extensions = []
            self.distribution.ext_modules = []

    def build_extension(self, ext):
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = _cmake_args(out_dir)
        _forget_other_generator(build_dir, _generator(args))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", str(os.cpu_count() or 2)],
                       cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("imagen_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    package_data={"imagen_fast": ["py.typed", "ops/gpu_choice.json", "eval/data/*.csv", "eval/serve/static/*",
                                  "assets/shapes-cascade/*.json", "assets/shapes-cascade/*.safetensors",
                                  "assets/shapes-cascade/*.md", "assets/shapes-cascade/training/*",
                                  "assets/shapes-cascade/eval/*"]},
)
