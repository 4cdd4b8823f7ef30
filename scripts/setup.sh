#!/usr/bin/env bash
# Sourced by the other scripts: picks the Python to use and installs manet_kernels
# into it. A Python that already has torch (an active virtualenv, or the system one
# on a GPU machine) is used as it is, and its torch is never replaced; otherwise
# ./.venv is made with torch 2.14.1. Exports PY.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
elif [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
elif python3 -c "import torch" 2>/dev/null; then
  PY="$(command -v python3)"
else
  python3 -m venv .venv
  PY="$PWD/.venv/bin/python"
fi
export PY

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.14.1"
fi
# Build, test and training tools; none of them pulls in torch. Already-installed ones
# (the GPU machine ships most) are kept as they are, and pip is not run at all when
# every one is there (it takes seconds even then).
if ! "$PY" - <<'PY'
import importlib.metadata as md, importlib.util as u, sys
mods = ("wheel numpy ninja pytest hypothesis expecttest pytest_benchmark sklearn matplotlib "
        "PIL tqdm tensorboard").split()
setuptools_ok = int(md.version("setuptools").split(".")[0]) >= 77  # PEP 639 license metadata
sys.exit(0 if setuptools_ok and all(u.find_spec(m) for m in mods) else 1)
PY
then
  "$PY" -m pip install -q "setuptools>=77" wheel numpy ninja pytest hypothesis expecttest \
    pytest-benchmark scikit-learn matplotlib pillow tqdm tensorboard
fi
# timm (tests/test_timm.py, manet-train --arch timm:<name>) with --no-deps, so that pip
# never replaces torch: torchvision pinned to the release built for this torch (0.<minor
# + 15>: 0.29 for torch 2.14), then the light dependencies of both (torchvision imports
# numpy and pillow), none of which pulls in torch. Skipped when all of them are
# importable (the GPU machine ships timm).
if ! "$PY" - <<'PY'
import importlib.util as u, sys
sys.exit(0 if all(u.find_spec(m) for m in
                  ("timm", "torchvision", "yaml", "huggingface_hub", "safetensors",
                   "numpy", "PIL")) else 1)
PY
then
  tv=$("$PY" -c "import torch; print('0.%d.*' % (int(torch.__version__.split('.')[1]) + 15))")
  # Optional for the package: a machine without a registry (the GPU machine) goes on
  # without timm, and its timm tests skip (.ci/run checks that CI has it).
  if ! { "$PY" -m pip install -q --no-deps "timm==1.0.31" "torchvision==$tv" &&
         "$PY" -m pip install -q pyyaml huggingface_hub safetensors numpy pillow; }; then
    echo "setup: could not install timm and torchvision $tv: timm models and tests unavailable"
  fi
fi
# CUDA kernels that nothing here can run would only cost build minutes: without a
# visible GPU build the CPU kernels alone, unless MANET_KERNELS_CUDA says otherwise
# (CI sets it to 1 so that every CUDA source is compiled).
if [ -z "${MANET_KERNELS_CUDA:-}" ] &&
   ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "setup: no GPU visible, building the CPU kernels only (MANET_KERNELS_CUDA=1 adds CUDA)"
  export MANET_KERNELS_CUDA=0
fi
# Rebuild only when a source, a build switch, torch or the Python changed (stamp in
# build/). `pip install -e .` would compile everything in a temporary directory each
# time, so pip only registers the package (editable, no extension: seconds) and
# build_ext --inplace compiles the library, keeping ninja's objects in build/ so that
# a changed source recompiles only what depends on it.
if "$PY" scripts/build_stamp.py check; then
  echo "setup: build up to date (build/manet_kernels.stamp), not rebuilding"
else
  # --no-build-isolation: use the setuptools here; --no-deps: never touch torch.
  MANET_KERNELS_NO_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  mkdir -p build
  rm -f manet_kernels/_C.*.so  # a library from other sources or switches must not survive
  if [ "${MANET_KERNELS_NO_EXT:-}" != "1" ]; then
    echo "setup: compiling the extension (log: build/build_ext.log)"
    if ! MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace > build/build_ext.log 2>&1; then
      tail -n 40 build/build_ext.log
      echo "setup: building the extension failed (whole log: build/build_ext.log)" >&2
      exit 1
    fi
  fi
  "$PY" scripts/build_stamp.py write
fi
"$PY" - <<'PY'
import importlib.metadata as md, torch, manet_kernels._ext as e
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "missing"
print(f"manet_kernels: torch {torch.__version__}, C++ extension: {e.HAS_EXT}, "
      f"CUDA kernels: {e.HAS_CUDA_KERNELS}, GPU: {torch.cuda.is_available()}, "
      f"timm {version('timm')}, torchvision {version('torchvision')}")
PY
