"""Builds libpartialfc with cargo (or takes a prebuilt one) and bundles it, with its header, inside the
`partialfc` package: the installed package needs no compiler, only ctypes.

- `pip install ./bindings/python`: runs `cargo build --release --locked --lib` in the repository
  (two levels up), honouring CARGO_TARGET_DIR.
- PARTIALFC_PREBUILT_LIB=/path/to/libpartialfc.so: bundles that library instead (no cargo); the
  header then comes from PARTIALFC_PREBUILT_HEADER or the repository's include/partialfc.h.
- `pip wheel ./bindings/python -w dist`: a wheel tagged py3-none-<platform> (the library does not
  depend on the Python version), installable where no Rust toolchain is.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LIBRARY = {"darwin": "libpartialfc.dylib", "win32": "partialfc.dll"}.get(sys.platform, "libpartialfc.so")


def built_library():
    prebuilt = os.environ.get("PARTIALFC_PREBUILT_LIB")
    if prebuilt:
        if not os.path.isfile(prebuilt):
            sys.exit(f"PARTIALFC_PREBUILT_LIB={prebuilt} is not a file")
        return prebuilt
    if not os.path.isfile(os.path.join(ROOT, "Cargo.toml")):
        sys.exit(f"no partialfc repository at {ROOT} to build the library from: set PARTIALFC_PREBUILT_LIB")
    cargo = shutil.which("cargo") or os.path.expanduser("~/.cargo/bin/cargo")
    if not os.path.exists(cargo):
        sys.exit("cargo is needed to build libpartialfc (https://rustup.rs), or set PARTIALFC_PREBUILT_LIB")
    subprocess.check_call([cargo, "build", "--release", "--locked", "--lib"], cwd=ROOT)
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target if os.path.isabs(target) else os.path.join(ROOT, target), "release", LIBRARY)


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "partialfc")
        os.makedirs(dest, exist_ok=True)
        shutil.copy2(built_library(), os.path.join(dest, LIBRARY))
        header = os.environ.get("PARTIALFC_PREBUILT_HEADER") or os.path.join(ROOT, "include", "partialfc.h")
        shutil.copy2(header, os.path.join(dest, "partialfc.h"))


class WithNativeLibrary(Distribution):
    """The bundled library makes the distribution platform-specific (installed to platlib)."""

    def has_ext_modules(self):
        return True


class PlatformWheel(bdist_wheel):
    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


setup(distclass=WithNativeLibrary, cmdclass={"build_py": BuildWithLibrary, "bdist_wheel": PlatformWheel})
