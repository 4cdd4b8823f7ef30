#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job. Until the training scripts land
# this is the mixed-attention benchmark on this machine's device.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  dev=cuda
else
  dev=cpu
fi
"$PY" benchmarks/bench_mixed_attention.py --device "$dev" "$@"
