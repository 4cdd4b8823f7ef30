"""Whether this checkout's build is up to date, so that scripts/setup.sh can skip it.

``python scripts/build_stamp.py check`` exits 0 when the package is installed (editable,
from this checkout), its library is in place (unless ``MANET_KERNELS_NO_EXT=1``) and
the stamp left by the last build matches; ``write`` records the stamp after a build.
The stamp hashes everything the build depends on: the contents of ``csrc/**``,
``setup.py`` and ``pyproject.toml``, the build switches, torch's version and the
Python. Contents, not times: a checkout or ``touch`` that changes nothing rebuilds
nothing. Standard library only, and torch is not imported (fast).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = os.path.join("build", "manet_kernels.stamp")
SWITCHES = ("MANET_KERNELS_CUDA", "TORCH_CUDA_ARCH_LIST", "MANET_KERNELS_NO_EXT", "CUDA_HOME",
            "CXX", "CC")


def _inputs(root: str) -> list[str]:
    files = glob.glob(os.path.join(root, "csrc", "**", "*"), recursive=True)
    files += [os.path.join(root, "setup.py"), os.path.join(root, "pyproject.toml")]
    return sorted(f for f in files if os.path.isfile(f))


def _torch_version() -> str:
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"
    return f"{dist.version} at {dist.locate_file('')}"


def fingerprint(root: str = ROOT, environ=os.environ) -> str:
    h = hashlib.sha256()
    for path in _inputs(root):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read() + b"\0")
    for var in SWITCHES:
        h.update(f"{var}={environ.get(var, '')}\0".encode())
    h.update(f"torch {_torch_version()}\0python {sys.version} {sys.executable}".encode())
    return h.hexdigest()


def stamp_matches(root: str = ROOT, environ=os.environ) -> bool:
    try:
        with open(os.path.join(root, STAMP)) as f:
            return f.read().strip() == fingerprint(root, environ)
    except OSError:
        return False


def write_stamp(root: str = ROOT, environ=os.environ) -> None:
    os.makedirs(os.path.join(root, os.path.dirname(STAMP)), exist_ok=True)
    with open(os.path.join(root, STAMP), "w") as f:
        f.write(fingerprint(root, environ) + "\n")


def installed_here(root: str = ROOT, environ=os.environ) -> bool:
    """manet_kernels imports from this checkout, with its library unless NO_EXT."""
    spec = importlib.util.find_spec("manet_kernels")
    pkg = os.path.join(root, "manet_kernels")
    if spec is None or spec.origin != os.path.join(pkg, "__init__.py"):
        return False
    return (environ.get("MANET_KERNELS_NO_EXT") == "1"
            or bool(glob.glob(os.path.join(pkg, "_C.*.so"))))


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        return 0 if installed_here() and stamp_matches() else 1
    if argv == ["write"]:
        write_stamp()
        return 0
    print("usage: build_stamp.py check|write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
