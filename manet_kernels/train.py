"""``python -m manet_kernels.train``: the same as ``manet-train`` (see manet_kernels.cli.train)."""

import sys

from manet_kernels.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
