#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: with no arguments, trains
# MANet-ResNet20 on the fused kernels on scikit-learn's bundled digits (16x16, 10
# epochs, cosine schedule; ~99% test accuracy; about a minute of training on 2 CPU cores, plus set-up),
# then writes attention-map figures. Output: runs/manet_resnet20/ (log.csv,
# summary.json, last.pt, best.pt, tb/, maps/). Arguments go to manet-train
# (see `python -m manet_kernels.train --help`), e.g. --data cifar10:PATH.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
"$PY" -m manet_kernels.train "$@"
